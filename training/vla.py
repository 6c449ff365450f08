"""Fine-tuning the robot action model (VLA) with the Trainer: normalisation statistics, room for the action bins,
action metrics and the mean-action baseline.

Freezing and LoRA are the helpers every family shares (`training/backbones.py`).
"""

from collections.abc import Callable, Sequence

import numpy as np
import torch
from transformers import EvalPrediction, PreTrainedModel, PreTrainedTokenizerBase

from ..modeling.modeling_vla import protected_token_ids
from .backbones import add_lora, freeze

__all__ = [
    "ActionMetrics",
    "action_errors",
    "add_lora",
    "freeze",
    "make_room_for_action_bins",
    "mean_action_baseline",
    "normalization_statistics",
    "predict_dataset_actions",
]


def normalization_statistics(
    actions: np.ndarray | Sequence,
    states: np.ndarray | Sequence | None = None,
    quantiles: tuple[float, float] = (1, 99),
) -> dict[str, list[float]]:
    """The `VLAConfig` statistics of a training set: `actions` (N, T, D) or (N, D), `states` (N, S) or None.

    Mean and standard deviation per dimension (`action_mean`, `action_std`, `state_mean`, `state_std`; a constant
    dimension gets std 1), and the `"tokens"` head's bin range `action_low` / `action_high`: the `quantiles`
    percentiles (OpenVLA's 1st and 99th), widened where they coincide. Pass the result to the config or to
    `VLAForActionPrediction.from_backbone(..., **statistics)`.
    """
    actions = np.asarray(actions, dtype=np.float64)
    if actions.ndim not in (2, 3) or actions.shape[0] == 0:
        raise ValueError(f"actions must have shape (N, T, D) or (N, D) with N > 0, got {actions.shape}.")
    if not np.isfinite(actions).all():
        raise ValueError("actions contain NaN or inf values.")
    flat = actions.reshape(-1, actions.shape[-1])
    low, high = np.percentile(flat, quantiles, axis=0)
    same = high - low < 1e-6
    statistics = {
        "action_mean": flat.mean(axis=0),
        "action_std": _safe_std(flat),
        "action_low": np.where(same, low - 1, low),
        "action_high": np.where(same, high + 1, high),
    }
    if states is not None:
        states = np.asarray(states, dtype=np.float64)
        if states.ndim != 2 or states.shape[0] != actions.shape[0]:
            raise ValueError(f"states must have shape (N={actions.shape[0]}, S), got {states.shape}.")
        if not np.isfinite(states).all():
            raise ValueError("states contain NaN or inf values.")
        statistics["state_mean"], statistics["state_std"] = states.mean(axis=0), _safe_std(states)
    return {name: [float(value) for value in values] for name, values in statistics.items()}


def _safe_std(values: np.ndarray) -> np.ndarray:
    std = values.std(axis=0)
    return np.where(std < 1e-6, 1.0, std)


def make_room_for_action_bins(
    backbone: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, num_bins: int = 256
) -> int:
    """Grows the backbone's vocabulary, if needed, so that its last `num_bins` ids hold no special token.

    The `"tokens"` head's bins are the last ids of the vocabulary: they may take over ordinary text tokens, but
    not a special or added token of the tokenizer or an id the config names (image, bos, eos, pad). When such a
    token sits among the last `num_bins` ids (many tokenizers add their special tokens at the end), the embeddings
    grow to `highest protected id + 1 + num_bins` rows (new rows initialised at the mean embedding). Call it on
    the backbone before `VLAForActionPrediction.from_backbone`; returns the vocabulary size.
    """
    vocab_size = backbone.get_output_embeddings().weight.shape[0]
    protected = [*protected_token_ids(backbone.config).values(), *tokenizer.all_special_ids]
    protected += list(tokenizer.added_tokens_decoder)
    needed = max(protected, default=-1) + 1 + num_bins
    if needed > vocab_size:
        backbone.resize_token_embeddings(needed, mean_resizing=True)
        vocab_size = needed
    return vocab_size


def action_errors(predicted: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Mean absolute and mean squared error of actions (N, T, D), plus the L1 of the first action of each chunk."""
    predicted, target = np.asarray(predicted, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if predicted.shape != target.shape:
        raise ValueError(f"predicted actions have shape {predicted.shape} but the targets {target.shape}.")
    difference = predicted - target
    return {
        "action_l1": float(np.abs(difference).mean()),
        "action_mse": float((difference**2).mean()),
        "first_action_l1": float(np.abs(difference[:, 0]).mean()),
    }


def mean_action_baseline(train_actions: np.ndarray, num_samples: int) -> np.ndarray:
    """The baseline that ignores the inputs: the mean training action chunk (T, D), repeated (num_samples, T, D)."""
    mean = np.asarray(train_actions, dtype=np.float64).mean(axis=0)
    return np.repeat(mean[None], num_samples, axis=0)


class ActionMetrics:
    """`compute_metrics` for the Trainer: `action_l1`, `action_mse` and `first_action_l1` of the predicted actions.

    The targets reach it when the TrainingArguments have `label_names=["actions"]`. For the `"tokens"` head the
    Trainer's predictions are teacher-forced (each bin given the true previous ones); `predict_actions` decodes.
    """

    def __call__(self, prediction: EvalPrediction) -> dict[str, float]:
        targets = np.asarray(prediction.label_ids)
        outputs = prediction.predictions if isinstance(prediction.predictions, tuple) else (prediction.predictions,)
        actions = [np.asarray(output) for output in outputs if np.shape(output) == targets.shape]
        if len(actions) != 1:
            shapes = [np.shape(output) for output in outputs]
            raise ValueError(f"Expected one prediction shaped like the target actions {targets.shape}, got {shapes}.")
        return action_errors(actions[0], targets)


def predict_dataset_actions(
    model: PreTrainedModel,
    collator,
    records: Sequence,
    batch_size: int = 32,
    seed: int = 0,
    predict: Callable[[dict], torch.Tensor] | None = None,
) -> np.ndarray:
    """`model.predict_actions` over manipulation records, batch by batch: (N, chunk_size, action_dim).

    The flow head's noise is seeded by `seed`, so repeated calls give the same actions. `predict(batch)` replaces
    `model.predict_actions(**batch)` (π0: `PI0DataCollator.sample_actions`).
    """
    model.eval()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    predicted = []
    try:
        for start in range(0, len(records), batch_size):
            batch = collator([records[index] for index in range(start, min(start + batch_size, len(records)))])
            batch.pop("actions", None)
            batch = {name: value.to(model.device) for name, value in batch.items()}
            actions = predict(batch) if predict is not None else model.predict_actions(**batch)
            predicted.append(actions.float().cpu().numpy())
    finally:
        torch.random.set_rng_state(generator_state)
    return np.concatenate(predicted)
