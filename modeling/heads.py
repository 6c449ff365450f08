"""Heads and input adapters shared by the vlmheads models.

Imports only torch and transformers: this file ships as remote code with every saved model.
"""

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F
from transformers import initialization as init
from transformers.activations import ACT2FN


class FanInLinear(nn.Linear):
    """A `Linear` layer of an MLP head, initialised like PyTorch does (uniform, scaled by fan-in).

    transformers' normal(0, 0.02) suits residual transformer layers but leaves a stack of small layers nearly
    linear and slow to train: models route these layers to `init_fan_in_` from their `_init_weights`.
    """

    def init_fan_in_(self) -> None:
        """Like `reset_parameters`, through transformers' init functions, which leave loaded weights alone."""
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(self.in_features)
        init.uniform_(self.bias, -bound, bound)


class MLP(nn.Sequential):
    """`Linear` layers `in_features → *hidden_dims → out_features` with an activation between them.

    (..., in_features) → (..., out_features).
    """

    def __init__(self, in_features: int, hidden_dims: Sequence[int], out_features: int, hidden_act: str):
        widths = [in_features, *hidden_dims, out_features]
        layers: list[nn.Module] = [FanInLinear(widths[0], widths[1])]
        for width_in, width_out in zip(widths[1:-1], widths[2:], strict=True):
            layers += [ACT2FN[hidden_act], FanInLinear(width_in, width_out)]
        super().__init__(*layers)


def splice_features(
    inputs_embeds: torch.Tensor,
    input_ids: torch.LongTensor,
    token_id: int,
    features: torch.Tensor,
    name: str,
    token: str,
) -> torch.Tensor:
    """Replaces the embeddings of the `token_id` placeholders with `features`, row by row, like image tokens.

    `inputs_embeds` (B, L, H), `input_ids` (B, L), `features` (B, N, H): every sample must hold exactly N placeholders.
    Returns new embeddings (B, L, H); `name` and `token` only word the error.
    """
    mask = input_ids == token_id
    per_sample = mask.sum(dim=1)
    expected = features.shape[1]
    if (per_sample != expected).any():
        raise ValueError(
            f"{name} has {expected} rows per sample but input_ids hold {per_sample.tolist()} {token} tokens per "
            f"sample; the processor expands one {token} into as many tokens as there are rows."
        )
    features = features.to(inputs_embeds.device, inputs_embeds.dtype)
    return inputs_embeds.masked_scatter(mask.unsqueeze(-1), features)


class TrajectoryDecoder(nn.Module):
    """Decodes one feature vector per sample into `num_modes` trajectories of `num_waypoints` points.

    The MLP predicts per-step displacements; their cumulative sum gives waypoints relative to the ego origin.
    Input (B, H) → output (B, num_modes, num_waypoints, waypoint_dim).
    """

    def __init__(
        self,
        in_features: int,
        hidden_dims: Sequence[int],
        num_modes: int,
        num_waypoints: int,
        waypoint_dim: int,
        hidden_act: str,
    ):
        super().__init__()
        self.trajectory_shape = (num_modes, num_waypoints, waypoint_dim)
        self.mlp = MLP(in_features, hidden_dims, num_modes * num_waypoints * waypoint_dim, hidden_act)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        steps = self.mlp(features).view(features.shape[0], *self.trajectory_shape)
        return steps.cumsum(dim=2)


def select_mode(trajectories: torch.Tensor, command: torch.LongTensor) -> torch.Tensor:
    """Picks each sample's commanded mode: `trajectories` (B, M, T, D), `command` (B,) → (B, T, D)."""
    return trajectories[torch.arange(trajectories.shape[0], device=trajectories.device), command]


def waypoint_loss(predicted: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean regression loss between waypoints (B, T, D); `kind` is "l1", "smooth_l1" or "mse"."""
    losses = {"l1": F.l1_loss, "smooth_l1": F.smooth_l1_loss, "mse": F.mse_loss}
    return losses[kind](predicted.float(), target.float())


def check_tensor(name: str, tensor: torch.Tensor, expected: Sequence[int | None], layout: str) -> None:
    """Raises a `ValueError` unless `tensor` has the `expected` shape (None: any size) and only finite values.

    `layout` names the dimensions in the message, e.g. "(B, Ns, Ds)".
    """
    shape = tuple(tensor.shape)
    matches = len(shape) == len(expected) and all(
        size is None or got == size for got, size in zip(shape, expected, strict=True)
    )
    if not matches:
        wanted = tuple("*" if size is None else size for size in expected)
        raise ValueError(f"{name} must have shape {layout} = {wanted}, got {shape}.")
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains NaN or inf values.")


class ClassificationHead(nn.Module):
    """An MLP classifier on one pooled feature vector per sample: (B, in_features) → logits (B, num_labels).

    Each hidden layer is `Linear` → optional `BatchNorm1d` → activation → `Dropout`; the last layer is a plain
    `Linear`. Backbone-agnostic: the model decides what it pools.
    """

    def __init__(
        self,
        in_features: int,
        hidden_dims: Sequence[int],
        num_labels: int,
        dropout_rates: Sequence[float],
        batch_norm: bool,
        activation: str,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        widths = [in_features, *hidden_dims]
        for width_in, width_out, rate in zip(widths[:-1], widths[1:], dropout_rates, strict=True):
            layers.append(nn.Linear(width_in, width_out))
            if batch_norm:
                layers.append(nn.BatchNorm1d(width_out))
            layers += [ACT2FN[activation], nn.Dropout(rate)]
        self.hidden = nn.Sequential(*layers)
        self.out_proj = nn.Linear(widths[-1], num_labels)
        self.batch_norm = batch_norm

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.batch_norm and self.training and features.shape[0] < 2:
            raise ValueError(
                "The classifier's batch norm needs at least 2 samples per training batch, got 1: raise the batch size "
                "or set classifier_batch_norm=False."
            )
        # The backbone may run in another dtype (bf16) than the head (fp32 under k-bit training).
        first_weight = (self.hidden[0] if len(self.hidden) else self.out_proj).weight
        if first_weight.is_floating_point():
            features = features.to(first_weight.device, first_weight.dtype)
        return self.out_proj(self.hidden(features))


def masked_mean(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `features` (B, N, H) over the positions where `mask` (B, N) is true: (B, H).

    Every sample needs at least one valid position.
    """
    mask = mask.to(torch.bool)
    counts = mask.sum(dim=1, keepdim=True)
    if (counts == 0).any():
        raise ValueError(f"Each sample needs at least one valid position to pool; valid counts are {counts.tolist()}.")
    weights = mask.unsqueeze(-1).to(features.dtype)
    return (features * weights).sum(dim=1) / counts.to(features.dtype)


def last_token_state(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Hidden state at each sample's last non-padding token: `hidden_states` (B, L, H) → (B, H).

    Works for left and right padding; without `attention_mask` it is the last position.
    """
    batch_size, length = hidden_states.shape[:2]
    if attention_mask is None:
        return hidden_states[:, -1]
    mask = attention_mask.to(hidden_states.device).bool()
    if not mask.any(dim=1).all():
        raise ValueError(
            f"Each sample needs at least one non-padding token; attention_mask rows sum to {mask.sum(1)}."
        )
    last = (mask * torch.arange(length, device=hidden_states.device)).amax(dim=1)
    return hidden_states[torch.arange(batch_size, device=hidden_states.device), last]
