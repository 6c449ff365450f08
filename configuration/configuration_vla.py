"""Configuration of the robot action model (VLA) on any registered VLM family."""

import math

from huggingface_hub.dataclasses import strict

from .configuration_vlm_heads import VLMHeadConfig
from .constants import HEAD_ACTIONS

ACTION_HEADS = ("regression", "tokens", "flow")
# Families that are complete robot policies already, with their own action expert: a head on them makes no sense.
POLICY_FAMILIES = ("pi0",)
STATISTICS = ("action_mean", "action_std", "action_low", "action_high", "state_mean", "state_std")


@strict
class VLAConfig(VLMHeadConfig):
    r"""
    Configuration of `VLAForActionPrediction`: camera image(s) + instruction (+ robot state) → an action chunk.

    action_dim (`int`, *optional*, defaults to 7):
        Width of one action (e.g. end-effector deltas x, y, z, roll, pitch, yaw and the gripper).
    chunk_size (`int`, *optional*, defaults to 1):
        Actions predicted per sample (ACT-style chunking): outputs have shape (B, chunk_size, action_dim).
    state_dim (`int`, *optional*, defaults to 0):
        Width of the proprioceptive state `state` (B, state_dim); 0 means the model takes no state.
    action_head (`str`, *optional*, defaults to `"regression"`):
        `"regression"`: an MLP on the pooled VLM state, L1 loss. `"tokens"`: RT-2 / OpenVLA discretised actions,
        each normalised action dimension a token among the last `num_action_bins` ids of the language model's
        vocabulary, trained with the language-model loss and predicted with `generate`. `"flow"`: a flow-matching
        action expert conditioned on the pooled VLM state (π0's recipe), sampled in `flow_num_steps` Euler steps.
    head_hidden_dims (`list[int]`, *optional*):
        Hidden widths of the regression MLP (of the flow head's velocity network); defaults to `[2 * H, 2 * H]`.
    head_hidden_act (`str`, *optional*, defaults to `"gelu"`):
        Activation of those MLPs and of the state projector.
    num_action_bins (`int`, *optional*, defaults to 256):
        Bins per action dimension of the `"tokens"` head.
    flow_num_steps (`int`, *optional*, defaults to 10):
        Euler integration steps of the `"flow"` head's sampling.
    action_mean, action_std (`list[float]`, *optional*):
        Per-dimension mean and standard deviation of the training actions; the `"regression"` and `"flow"` heads
        work on actions normalised with them (defaults: 0 and 1).
    action_low, action_high (`list[float]`, *optional*):
        Per-dimension range of the `"tokens"` head's bins (OpenVLA: the 1st and 99th percentiles of the training
        actions): [low, high] is cut into `num_action_bins` equal bins, values outside are clipped (defaults: -1, 1).
    state_mean, state_std (`list[float]`, *optional*):
        Per-dimension mean and standard deviation of the training states, which the model normalises with
        (defaults: 0 and 1).
    """

    model_type = "vla"
    head_kind = HEAD_ACTIONS
    # The Trainer hands every other output to `compute_metrics`: keep only the actions.
    keys_to_ignore_at_inference = ["logits", "action_loss", "pooled_state", "cache", "hidden_states", "attentions"]

    action_dim: int = 7
    chunk_size: int = 1
    state_dim: int = 0
    action_head: str = "regression"
    head_hidden_dims: list[int] | None = None
    head_hidden_act: str = "gelu"
    num_action_bins: int = 256
    flow_num_steps: int = 10
    action_mean: list[float] | None = None
    action_std: list[float] | None = None
    action_low: list[float] | None = None
    action_high: list[float] | None = None
    state_mean: list[float] | None = None
    state_std: list[float] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.backbone_config.model_type in POLICY_FAMILIES:
            raise ValueError(
                f"backbone_config is a {self.backbone_config.model_type!r} model, a complete robot policy with its "
                "own action expert and no language-model head: train it as it is (e.g. PI0ForConditionalGeneration)."
            )
        if self.head_hidden_dims is None:
            self.head_hidden_dims = [2 * self.hidden_size, 2 * self.hidden_size]
        defaults = {
            "action_mean": (0.0, self.action_dim),
            "action_std": (1.0, self.action_dim),
            "action_low": (-1.0, self.action_dim),
            "action_high": (1.0, self.action_dim),
            "state_mean": (0.0, self.state_dim),
            "state_std": (1.0, self.state_dim),
        }
        for name, (value, width) in defaults.items():
            if getattr(self, name) is None and width >= 0:
                setattr(self, name, [value] * width)
            elif getattr(self, name) is not None:
                setattr(self, name, [float(entry) for entry in getattr(self, name)])
        self.check_action_settings()

    def check_action_settings(self) -> None:
        """Raises a `ValueError` naming the first invalid action setting.

        Runs at construction, and again when a model is built, because `from_pretrained(..., **kwargs)` sets
        attributes after construction.
        """
        if self.action_head not in ACTION_HEADS:
            raise ValueError(f"action_head must be one of {list(ACTION_HEADS)}, got {self.action_head!r}.")
        for name in ("action_dim", "chunk_size", "flow_num_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}.")
        if self.state_dim < 0:
            raise ValueError(f"state_dim must be 0 (no state) or positive, got {self.state_dim}.")
        if self.num_action_bins < 2:
            raise ValueError(f"num_action_bins must be at least 2, got {self.num_action_bins}.")
        if not self.head_hidden_dims or any(width < 1 for width in self.head_hidden_dims):
            raise ValueError(f"head_hidden_dims must be positive widths, got {self.head_hidden_dims}.")
        if not isinstance(self.head_hidden_act, str) or not self.head_hidden_act:
            raise ValueError(f"head_hidden_act must name an activation, got {self.head_hidden_act!r}.")
        for name in STATISTICS:
            values = getattr(self, name)
            width = self.state_dim if name.startswith("state") else self.action_dim
            if len(values) != width:
                raise ValueError(f"{name} must hold {width} values (one per dimension), got {len(values)}.")
            if not all(math.isfinite(value) for value in values):
                raise ValueError(f"{name} must be finite, got {values}.")
        for name in ("action_std", "state_std"):
            if any(value <= 0 for value in getattr(self, name)):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")
        if any(high <= low for low, high in zip(self.action_low, self.action_high, strict=True)):
            raise ValueError(
                f"action_high must exceed action_low in every dimension, got {self.action_low} and {self.action_high}."
            )
