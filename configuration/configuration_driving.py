"""The driving settings shared by the Orion configurations and `VLMTrajectoryConfig`: query counts and widths, the
CAN-bus projector, the trajectory head and its loss, the placeholder token ids.

Imports only the standard library and the other configuration files: configurations import no torch.
"""

from dataclasses import dataclass

from .constants import HEAD_TRAJECTORY

WAYPOINT_LOSSES = ("l1", "smooth_l1", "mse")
TRAJECTORY_HEADS = ("mlp", "flow")
PLACEHOLDER_TOKEN_IDS = ("scene_token_id", "history_token_id", "can_bus_token_id", "ego_token_id")


@dataclass(kw_only=True, repr=False)
class OrionDrivingConfigMixin:
    r"""
    The driving settings shared by the Orion configurations. The decoder's hidden size H is always
    `text_config.hidden_size`.

    num_scene_queries (`int`, *optional*, defaults to 256):
        Scene query vectors per sample: the rows of `scene_queries` and the `<scene>` tokens a prompt expands to.
    scene_query_dim (`int`, *optional*, defaults to 256):
        Width of one scene query vector.
    num_history_queries (`int`, *optional*, defaults to 256):
        History query vectors per sample: the rows of `history_queries` and the `<history>` tokens.
    history_query_dim (`int`, *optional*, defaults to 256):
        Width of one history query vector.
    can_bus_dim (`int`, *optional*, defaults to 89):
        Width of the ego CAN-bus vector, which becomes one `<can_bus>` token.
    can_bus_hidden_dims (`list[int]`, *optional*):
        Hidden widths of the CAN-bus projector. Empty or `None` gives one `Linear(can_bus_dim, H)`; ORION uses
        `[1024]`.
    projector_hidden_act (`str`, *optional*, defaults to `"relu"`):
        Activation between the layers of a projector that has hidden layers.
    num_waypoints (`int`, *optional*, defaults to 6):
        Future ego waypoints the trajectory decoder predicts (6 at 2 Hz is 3 s).
    waypoint_dim (`int`, *optional*, defaults to 2):
        Coordinates per waypoint (x, y in the ego frame).
    num_modes (`int`, *optional*, defaults to 1):
        Trajectory modes. With more than one, `forward` takes a `command` (B,) that picks the mode, one per
        navigation command as in ORION, and the regression loss is taken on the commanded mode.
    trajectory_head (`str`, *optional*, defaults to `"mlp"`):
        `"mlp"`: an MLP regresses the per-step displacements (ORION's MLP baseline). `"flow"`: a generative planner,
        a flow-matching expert (π0's recipe) that samples them from noise in `flow_num_steps` Euler steps,
        conditioned on the `<ego_wp>` state and the command.
    trajectory_hidden_dims (`list[int]`, *optional*):
        Hidden widths of the trajectory decoder MLP (of the flow's velocity network); defaults to `[H // 2]`.
    trajectory_hidden_act (`str`, *optional*, defaults to `"gelu"`):
        Activation of the trajectory decoder MLP.
    flow_num_steps (`int`, *optional*, defaults to 10):
        Euler steps of the `"flow"` head's sampling.
    displacement_mean, displacement_std (`list[float]`, *optional*):
        Per-coordinate mean and standard deviation of the per-step waypoint displacements in the training set; the
        `"flow"` head works on displacements normalised with them (defaults: 0 and 1).
    waypoint_loss (`str`, *optional*, defaults to `"l1"`):
        Regression loss of the `"mlp"` head on the waypoints: `"l1"`, `"smooth_l1"` or `"mse"` (the `"flow"` head
        trains with its flow-matching loss).
    waypoint_loss_weight (`float`, *optional*, defaults to 1.0):
        Weight of the waypoint loss in `loss`.
    lm_loss_weight (`float`, *optional*, defaults to 1.0):
        Weight of the language-model loss in `loss` when `labels` are given.
    scene_token_id, history_token_id, can_bus_token_id, ego_token_id (`int`, *optional*):
        Ids of the placeholder tokens; `OrionQwenProcessor.model_config_kwargs()` returns them.
    base_model (`str`, *optional*):
        Hub id of the checkpoint the backbone weights came from, for the model card.
    """

    head_kind = HEAD_TRAJECTORY
    # The Trainer hands every other output to `compute_metrics`: keep only the trajectory.
    keys_to_ignore_at_inference = [
        "cache",
        "logits",
        "trajectory_modes",
        "ego_features",
        "waypoint_loss",
        "lm_loss",
        "hidden_states",
        "attentions",
        "image_outputs",
        "video_outputs",
    ]

    num_scene_queries: int = 256
    scene_query_dim: int = 256
    num_history_queries: int = 256
    history_query_dim: int = 256
    can_bus_dim: int = 89
    can_bus_hidden_dims: list[int] | None = None
    projector_hidden_act: str = "relu"
    num_waypoints: int = 6
    waypoint_dim: int = 2
    num_modes: int = 1
    trajectory_head: str = "mlp"
    trajectory_hidden_dims: list[int] | None = None
    trajectory_hidden_act: str = "gelu"
    flow_num_steps: int = 10
    displacement_mean: list[float] | None = None
    displacement_std: list[float] | None = None
    waypoint_loss: str = "l1"
    waypoint_loss_weight: float = 1.0
    lm_loss_weight: float = 1.0
    scene_token_id: int | None = None
    history_token_id: int | None = None
    can_bus_token_id: int | None = None
    ego_token_id: int | None = None
    base_model: str | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.can_bus_hidden_dims = list(self.can_bus_hidden_dims or [])
        if self.trajectory_hidden_dims is None:
            self.trajectory_hidden_dims = [self.text_config.hidden_size // 2]
        if self.displacement_mean is None:
            self.displacement_mean = [0.0] * self.waypoint_dim
        if self.displacement_std is None:
            self.displacement_std = [1.0] * self.waypoint_dim
        self.check_driving_settings()

    def check_driving_settings(self) -> None:
        """Raises a `ValueError` naming the first invalid driving setting.

        Runs at construction, and again when a model is built, because `from_pretrained(..., **kwargs)` sets
        attributes after construction.
        """
        sizes = ("num_scene_queries", "scene_query_dim", "num_history_queries", "history_query_dim", "can_bus_dim")
        for name in (*sizes, "num_waypoints", "waypoint_dim", "num_modes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}.")
        for name in ("can_bus_hidden_dims", "trajectory_hidden_dims"):
            if any(width < 1 for width in getattr(self, name)):
                raise ValueError(f"{name} must hold positive widths, got {getattr(self, name)}.")
        for name in ("projector_hidden_act", "trajectory_hidden_act"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must name an activation, got {getattr(self, name)!r}.")
        if self.trajectory_head not in TRAJECTORY_HEADS:
            raise ValueError(f"trajectory_head must be one of {TRAJECTORY_HEADS}, got {self.trajectory_head!r}.")
        if self.flow_num_steps < 1:
            raise ValueError(f"flow_num_steps must be a positive integer, got {self.flow_num_steps}.")
        for name in ("displacement_mean", "displacement_std"):
            if len(getattr(self, name)) != self.waypoint_dim:
                raise ValueError(
                    f"{name} needs one value per waypoint coordinate ({self.waypoint_dim}), got {getattr(self, name)}."
                )
        if any(not std > 0 for std in self.displacement_std):
            raise ValueError(f"displacement_std must hold positive values, got {self.displacement_std}.")
        if self.waypoint_loss not in WAYPOINT_LOSSES:
            raise ValueError(f"waypoint_loss must be one of {WAYPOINT_LOSSES}, got {self.waypoint_loss!r}.")
        for name in ("waypoint_loss_weight", "lm_loss_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}.")

        vocab_size = self.text_config.vocab_size
        claimed = {
            self.image_token_id: "image_token_id",
            self.video_token_id: "video_token_id",
            self.vision_start_token_id: "vision_start_token_id",
            self.vision_end_token_id: "vision_end_token_id",
        }
        for name in PLACEHOLDER_TOKEN_IDS:
            token_id = getattr(self, name)
            if token_id is None:
                continue
            if not 0 <= token_id < vocab_size:
                raise ValueError(f"{name}={token_id} is outside the vocabulary [0, {vocab_size}).")
            if token_id in claimed:
                raise ValueError(f"{name} and {claimed[token_id]} share the id {token_id}; each needs its own token.")
            claimed[token_id] = name
