"""Fine-tuning the Orion models with the Trainer: freezing, LoRA on the language model, trajectory metrics."""

from collections.abc import Sequence

import numpy as np
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import EvalPrediction, PreTrainedModel

from ..metrics import load_metric

DRIVING_MODULES = ("driving_embeddings", "trajectory_decoder")


def freeze_backbone(model: PreTrainedModel, vision_tower: bool, language_model: bool) -> None:
    """Stops the gradients into the vision tower and/or the language model (decoder, embeddings and LM head)."""
    if vision_tower:
        model.model.visual.requires_grad_(False)
    if language_model:
        model.model.language_model.requires_grad_(False)
        model.lm_head.requires_grad_(False)


def add_lora(
    model: PreTrainedModel,
    r: int = 16,
    alpha: int = 16,
    dropout: float = 0.05,
    target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
) -> PeftModel:
    """LoRA adapters on the language model's layers only (the vision tower has `q_proj`-like names too), with
    the driving projectors and the trajectory decoder kept fully trainable and saved (`modules_to_save`)."""
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=rf".*language_model.*\.({'|'.join(target_modules)})",
        modules_to_save=list(DRIVING_MODULES),
    )
    return get_peft_model(model, config)


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
