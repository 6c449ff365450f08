"""Heads and input adapters shared by the vlmheads models.

Imports only torch and transformers: this file ships as remote code with every saved model.
"""

import math
from collections.abc import Sequence
from types import SimpleNamespace

import torch
from torch import nn
from torch.nn import functional as F
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.models.pi0.modeling_pi0 import PI0TimestepEmbeddings


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


def init_head_module(module: nn.Module) -> bool:
    """The one initialisation policy of every vlmheads head: fan-in init for head MLP layers, π0's sinusoid
    frequencies for flow time embeddings, configured statistics for flow planners. Models call it first in
    `_init_weights`; returns whether it handled `module` (otherwise the backbone's own init applies)."""
    if isinstance(module, FanInLinear):
        module.init_fan_in_()
        return True
    if isinstance(module, PI0TimestepEmbeddings):
        init.copy_(module.sinusoid_freq, module.compute_freqs(module.config))
        return True
    if isinstance(module, FlowTrajectoryDecoder):
        module.init_statistics_()
        return True
    return False


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


class FlowTrajectoryDecoder(nn.Module):
    """A generative planner: flow matching over the per-step displacements of `num_modes` trajectories.

    Each mode is one navigation command; with several modes the command enters the condition as a one-hot vector.
    Displacements are normalised with `displacement_mean` / `displacement_std` (per coordinate, from the training
    set); their cumulative sum gives waypoints relative to the ego origin, as in `TrajectoryDecoder`.
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
        num_steps: int,
        displacement_mean: Sequence[float],
        displacement_std: Sequence[float],
    ):
        super().__init__()
        self.num_modes = num_modes
        command_dim = num_modes if num_modes > 1 else 0
        self.flow = FlowMatchingHead(
            in_features + command_dim, waypoint_dim, num_waypoints, hidden_dims, num_steps, hidden_act
        )
        # Set from the config, not saved: the buffers are rebuilt from these values whenever weights are initialised.
        self.displacement_statistics = (list(displacement_mean), list(displacement_std))
        self.register_buffer("displacement_mean", torch.tensor(displacement_mean, dtype=torch.float32), False)
        self.register_buffer("displacement_std", torch.tensor(displacement_std, dtype=torch.float32), False)

    def init_statistics_(self) -> None:
        """Writes the configured displacement statistics into the buffers (they are not part of the weights)."""
        mean, std = self.displacement_statistics
        init.copy_(self.displacement_mean, torch.tensor(mean))
        init.copy_(self.displacement_std, torch.tensor(std))

    def _condition(self, features: torch.Tensor, command: torch.Tensor | None) -> torch.Tensor:
        if self.num_modes == 1:
            return features
        return torch.cat([features, F.one_hot(command, self.num_modes).to(features.dtype)], dim=1)

    def forward(self, features: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Samples one trajectory per mode from `noise` (B, T, D) (default: standard normal, shared by the modes)."""
        batch_size = features.shape[0]
        if noise is None:
            noise = torch.randn(batch_size, *self.flow.action_shape, device=features.device)
        modes = []
        for mode in range(self.num_modes):
            command = torch.full((batch_size,), mode, dtype=torch.long, device=features.device)
            steps = self.flow.sample(self._condition(features, command), noise)
            modes.append(steps * self.displacement_std + self.displacement_mean)
        return torch.stack(modes, dim=1).cumsum(dim=2)

    def loss(self, features: torch.Tensor, target: torch.Tensor, command: torch.Tensor | None) -> torch.Tensor:
        """Flow-matching loss of the commanded mode's waypoints `target` (B, T, D)."""
        steps = torch.diff(target.float(), dim=1, prepend=torch.zeros_like(target[:, :1]).float())
        normalised = (steps - self.displacement_mean) / self.displacement_std
        return self.flow.loss(self._condition(features, command), normalised)


def trajectory_decoder(config, in_features: int) -> TrajectoryDecoder | FlowTrajectoryDecoder:
    """The trajectory head a driving configuration asks for (`config.trajectory_head` "mlp" or "flow"), reading
    `in_features` (B, H) and returning `num_modes` trajectories (B, M, T, D)."""
    sizes = (config.num_modes, config.num_waypoints, config.waypoint_dim, config.trajectory_hidden_act)
    if config.trajectory_head == "flow":
        return FlowTrajectoryDecoder(
            in_features,
            config.trajectory_hidden_dims,
            *sizes,
            config.flow_num_steps,
            config.displacement_mean,
            config.displacement_std,
        )
    return TrajectoryDecoder(in_features, config.trajectory_hidden_dims, *sizes)


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


class FlowMatchingHead(nn.Module):
    """A flow-matching action expert conditioned on one feature vector per sample, following π0's recipe.

    Training draws a time t from Beta(1.5, 1) (scaled into (0.001, 1)), mixes `x_t = t * noise + (1 - t) * actions`
    and regresses the velocity `noise - actions`; sampling integrates from pure noise at t = 1 to t = 0 with
    `num_steps` Euler steps. The time embedding is π0's sinusoidal one (`PI0TimestepEmbeddings`); the velocity
    network is an MLP over the flattened noisy chunk, the time embedding and the condition.
    Condition (B, C) → action chunk (B, chunk_size, action_dim).
    """

    def __init__(
        self,
        condition_dim: int,
        action_dim: int,
        chunk_size: int,
        hidden_dims: Sequence[int],
        num_steps: int = 10,
        hidden_act: str = "silu",
        time_dim: int = 64,
        time_beta: tuple[float, float] = (1.5, 1.0),
        time_scale: float = 0.999,
        time_offset: float = 0.001,
        min_period: float = 4e-3,
        max_period: float = 4.0,
    ):
        super().__init__()
        if num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer, got {num_steps}.")
        self.action_shape = (chunk_size, action_dim)
        self.num_steps = num_steps
        self.time_beta, self.time_scale, self.time_offset = time_beta, time_scale, time_offset
        time_settings = SimpleNamespace(
            dit_config=SimpleNamespace(hidden_size=time_dim), min_period=min_period, max_period=max_period
        )
        self.time_embedding = PI0TimestepEmbeddings(time_settings)
        flat = chunk_size * action_dim
        self.velocity = MLP(flat + time_dim + condition_dim, hidden_dims, flat, hidden_act)

    def forward(self, condition: torch.Tensor, noisy_actions: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        """Velocity (B, T, D) at `noisy_actions` (B, T, D) and `time` (B,), given `condition` (B, C)."""
        weight = self.velocity[0].weight
        features = torch.cat(
            [
                noisy_actions.flatten(1).to(weight.dtype),
                self.time_embedding(time.float()).to(weight.dtype),
                condition.to(weight.dtype),
            ],
            dim=1,
        )
        return self.velocity(features).view(-1, *self.action_shape)

    def sample_time(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """Training times (B,) from π0's shifted Beta distribution."""
        alpha, beta = (torch.tensor(value, dtype=torch.float32) for value in self.time_beta)
        time = torch.distributions.Beta(alpha, beta).sample((batch_size,))
        return (time * self.time_scale + self.time_offset).to(device)

    def loss(
        self,
        condition: torch.Tensor,
        actions: torch.Tensor,
        noise: torch.Tensor | None = None,
        time: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean squared error of the predicted velocity for target `actions` (B, T, D)."""
        actions = actions.float()
        noise = torch.randn_like(actions) if noise is None else noise.float()
        time = self.sample_time(actions.shape[0], actions.device) if time is None else time.float()
        noisy = time[:, None, None] * noise + (1 - time[:, None, None]) * actions
        return F.mse_loss(self(condition, noisy, time).float(), noise - actions)

    @torch.no_grad()
    def sample(
        self, condition: torch.Tensor, noise: torch.Tensor | None = None, num_steps: int | None = None
    ) -> torch.Tensor:
        """An action chunk (B, T, D) integrated from `noise` (default: standard normal) in `num_steps` Euler steps."""
        num_steps = num_steps or self.num_steps
        batch_size = condition.shape[0]
        actions = (
            torch.randn(batch_size, *self.action_shape, device=condition.device) if noise is None else noise.float()
        )
        step = -1.0 / num_steps
        for index in range(num_steps):
            time = torch.full((batch_size,), 1.0 + index * step, device=condition.device)
            actions = actions + step * self(condition, actions, time).float()
        return actions


class DrivingEmbeddings(nn.Module):
    """Projects driving features to the decoder width H and puts them in place of their placeholder tokens.

    Scene queries (B, Ns, scene_query_dim) and history queries (B, Nh, history_query_dim) go through a `Linear`,
    the CAN-bus vector (B, can_bus_dim) through an `MLP`, each into as many placeholder tokens as it has rows. Also
    holds the learned embedding of the `<ego_wp>` token, so that the driving parts train as one module. `config`
    holds the sizes (`scene_query_dim`, `history_query_dim`, `can_bus_dim`, `can_bus_hidden_dims`,
    `projector_hidden_act`) and the placeholder ids (`scene_token_id`, `history_token_id`, `can_bus_token_id`,
    `ego_token_id`), which are read at each call: they may be set after the embeddings grow.
    """

    def __init__(self, config, hidden_size: int):
        super().__init__()
        self.scene_projector = nn.Linear(config.scene_query_dim, hidden_size)
        self.history_projector = nn.Linear(config.history_query_dim, hidden_size)
        self.can_bus_projector = MLP(
            config.can_bus_dim, config.can_bus_hidden_dims, hidden_size, config.projector_hidden_act
        )
        self.ego_embedding = nn.Embedding(1, hidden_size)
        self.config = config

    def forward(
        self,
        input_ids: torch.LongTensor,
        inputs_embeds: torch.Tensor,
        scene_queries: torch.Tensor | None = None,
        history_queries: torch.Tensor | None = None,
        can_bus: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`input_ids` (B, L), `inputs_embeds` (B, L, H) → embeddings (B, L, H) with the driving tokens filled in."""
        can_bus_rows = None if can_bus is None else can_bus.unsqueeze(1)
        for name, features, projector in (
            ("scene_queries", scene_queries, self.scene_projector),
            ("history_queries", history_queries, self.history_projector),
            ("can_bus", can_bus_rows, self.can_bus_projector),
        ):
            kind = name.removesuffix("_queries")
            token_id = getattr(self.config, f"{kind}_token_id")
            if features is None:
                if token_id is not None and (input_ids == token_id).any():
                    raise ValueError(f"input_ids hold {kind} placeholder tokens (id {token_id}) but {name} is None.")
                continue
            if token_id is None:
                raise ValueError(f"{name} was given but config.{kind}_token_id is not set.")
            projected = projector(features.to(inputs_embeds.dtype))
            inputs_embeds = splice_features(
                inputs_embeds, input_ids, token_id, projected, name, f"{kind} placeholder (id {token_id})"
            )
        if self.config.ego_token_id is not None:
            ego_mask = (input_ids == self.config.ego_token_id).unsqueeze(-1)
            inputs_embeds = torch.where(ego_mask, self.ego_embedding.weight[0].to(inputs_embeds.dtype), inputs_embeds)
        return inputs_embeds


def check_activations(config, names: Sequence[str]) -> None:
    """Raises a `ValueError` unless each configuration field in `names` names one of transformers' activations.

    Models check it when they are built: configurations import no torch, and the activation table needs it.
    """
    for name in names:
        if getattr(config, name) not in ACT2FN:
            raise ValueError(f"{name} must be one of transformers' activations, got {getattr(config, name)!r}.")


def tiled_image_features(
    vision_model: nn.Module,
    projector: nn.Module,
    pixel_values: torch.Tensor,
    aspect_ratio_ids: torch.Tensor,
    aspect_ratio_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected image features of a tiling vision tower (Mllama's) and where they are valid.

    `pixel_values` (B, I, T, C, S, S) → vision model (B, I, T, P, D_v) → projector (B, I, T, P, H) → features
    (B, I * T * P, H) and a mask (B, I * T * P): padding images (`aspect_ratio_ids` 0) and padding tiles
    (`aspect_ratio_mask` 0) are masked out.
    """
    vision_states = vision_model(
        pixel_values=pixel_values, aspect_ratio_ids=aspect_ratio_ids, aspect_ratio_mask=aspect_ratio_mask
    ).last_hidden_state
    projected = projector(vision_states)
    batch_size, num_images, num_tiles, num_patches, hidden_size = projected.shape
    valid_tiles = aspect_ratio_mask.bool() & (aspect_ratio_ids != 0).unsqueeze(-1)
    valid = valid_tiles.unsqueeze(-1).expand(-1, -1, -1, num_patches)
    return projected.reshape(batch_size, -1, hidden_size), valid.reshape(batch_size, -1)
