"""Fine-tuning the Orion models with the Trainer: freezing, LoRA on the language model, trajectory metrics.

Freezing and LoRA are the helpers every family shares (`training/backbones.py`), with Orion's names.
"""

from collections.abc import Sequence

import numpy as np
from transformers import EvalPrediction, PreTrainedModel

from ..metrics import load_metric
from ..modeling.modeling_orion_qwen import OrionTrajectoryMixin
from .backbones import add_lora, freeze

__all__ = ["DRIVING_MODULES", "TrajectoryMetrics", "add_lora", "displacement_statistics", "freeze_backbone"]

DRIVING_MODULES = OrionTrajectoryMixin.head_modules


def freeze_backbone(model: PreTrainedModel, vision_tower: bool, language_model: bool) -> None:
    """Stops the gradients into the vision tower and/or the language model (decoder, embeddings and LM head)."""
    freeze(model, vision=vision_tower, projector=vision_tower, language=language_model)


def displacement_statistics(waypoints: np.ndarray) -> dict[str, list[float]]:
    """Per-coordinate mean and standard deviation of the per-step displacements of waypoints (N, T, D): the
    `displacement_mean` / `displacement_std` a `trajectory_head="flow"` configuration normalises with."""
    waypoints = np.asarray(waypoints, dtype=np.float64)
    if waypoints.ndim != 3 or len(waypoints) == 0:
        raise ValueError(f"waypoints must have shape (N, T, D) with N > 0, got {waypoints.shape}.")
    steps = np.diff(waypoints, axis=1, prepend=np.zeros_like(waypoints[:, :1]))
    std = steps.std(axis=(0, 1))
    return {"displacement_mean": steps.mean(axis=(0, 1)).tolist(), "displacement_std": np.maximum(std, 1e-3).tolist()}


class TrajectoryMetrics:
    """`compute_metrics` for the Trainer: L2 at 1 s / 2 s / 3 s, ADE and FDE of the predicted trajectories.

    The targets reach it when the TrainingArguments have `label_names=["ego_waypoints"]`.
    """

    def __init__(self, waypoint_hz: float = 2, horizons: Sequence[float] = (1, 2, 3), convention: str = "point"):
        self.metric = load_metric("trajectory_l2")
        self.settings = {"waypoint_hz": waypoint_hz, "horizons": tuple(horizons), "convention": convention}

    def __call__(self, prediction: EvalPrediction) -> dict[str, float]:
        targets = np.asarray(prediction.label_ids)
        outputs = prediction.predictions if isinstance(prediction.predictions, tuple) else (prediction.predictions,)
        trajectories = [np.asarray(output) for output in outputs if np.shape(output) == targets.shape]
        if len(trajectories) != 1:
            shapes = [np.shape(output) for output in outputs]
            raise ValueError(f"Expected one prediction shaped like the targets {targets.shape}, got {shapes}.")
        return self.compute(trajectories[0], targets)

    def compute(self, trajectories: np.ndarray, targets: np.ndarray) -> dict[str, float]:
        """Metrics of predicted trajectories (N, T, D) against the true ones (N, T, D)."""
        return self.metric.compute(predictions=trajectories, references=targets, **self.settings)
