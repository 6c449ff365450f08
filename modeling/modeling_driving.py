"""The driving head shared by the Orion models and `VLMForTrajectory`: projected driving features in place of their
placeholder tokens, the input checks, the ego feature at `<ego_wp>`, mode selection and the trajectory loss.

Each model runs its own backbone over the spliced embeddings; the mixin does the rest.
Imports only torch, transformers and the other model-side files: this file ships as remote code.
"""

from typing import ClassVar

import torch

from ..configuration.constants import HEAD_TRAJECTORY, TASK_TRAJECTORY_PREDICTION
from .heads import DrivingEmbeddings, check_activations, check_tensor, select_mode, trajectory_decoder, waypoint_loss


class DrivingHeadMixin:
    """The driving head: mix in before the model's base class, build it with `build_driving_head` in `__init__`,
    check the inputs with `check_driving_inputs`, fill the placeholders with `self.driving_embeddings`, and read the
    trajectory at `<ego_wp>` with `ego_features` and `trajectory_outputs`."""

    head_kind = HEAD_TRAJECTORY
    pipelines: ClassVar[dict[str, str]] = {
        TASK_TRAJECTORY_PREDICTION: "..processing.pipeline_orion_trajectory.OrionTrajectoryPipeline"
    }
    pipeline_tag = "robotics"
    # The waypoint loss is a per-batch mean: the Trainer must average it over gradient accumulation itself.
    accepts_loss_kwargs = False
    # The modules the head adds to the backbone: trained in full under LoRA, kept in full precision.
    head_modules: ClassVar[tuple[str, ...]] = ("driving_embeddings", "trajectory_decoder")

    def build_driving_head(self, hidden_size: int) -> None:
        """Sets `self.driving_embeddings` (features → width H at their placeholders) and `self.trajectory_decoder`
        ((B, H) → (B, num_modes, num_waypoints, waypoint_dim))."""
        config = self.config
        config.check_driving_settings()
        check_activations(config, ("projector_hidden_act", "trajectory_hidden_act"))
        self.driving_embeddings = DrivingEmbeddings(config, hidden_size)
        self.trajectory_decoder = trajectory_decoder(config, hidden_size)

    def check_driving_inputs(
        self,
        batch_size: int,
        scene_queries: torch.Tensor | None = None,
        history_queries: torch.Tensor | None = None,
        can_bus: torch.Tensor | None = None,
        ego_waypoints: torch.Tensor | None = None,
        command: torch.LongTensor | None = None,
    ) -> None:
        """Raises a `ValueError` naming the first driving input of the wrong shape or values.

        `command` (B,) picks a mode in `[0, num_modes)`; a one-mode model takes none, as the pipeline and the server
        refuse it. Training a multi-mode model (`ego_waypoints` given) needs `command`.
        """
        config = self.config
        expected = {
            "scene_queries": (scene_queries, (batch_size, None, config.scene_query_dim), "(B, Ns, scene_query_dim)"),
            "history_queries": (
                history_queries,
                (batch_size, None, config.history_query_dim),
                "(B, Nh, history_query_dim)",
            ),
            "can_bus": (can_bus, (batch_size, config.can_bus_dim), "(B, can_bus_dim)"),
            "ego_waypoints": (
                ego_waypoints,
                (batch_size, config.num_waypoints, config.waypoint_dim),
                "(B, num_waypoints, waypoint_dim)",
            ),
        }
        for name, (tensor, shape, layout) in expected.items():
            if tensor is not None:
                check_tensor(name, tensor, shape, layout)
        if command is not None:
            if config.num_modes == 1:
                raise ValueError("command selects a trajectory mode, but this model has num_modes=1.")
            check_tensor("command", command, (batch_size,), "(B,)")
            if command.is_floating_point() or command.min() < 0 or command.max() >= config.num_modes:
                raise ValueError(
                    f"command must hold integer mode indices in [0, {config.num_modes}), got {command.tolist()}."
                )
        elif ego_waypoints is not None and config.num_modes > 1:
            raise ValueError(f"command (B,) is required to train a model with num_modes={config.num_modes}.")

    def ego_features(self, input_ids: torch.LongTensor, states: torch.Tensor) -> torch.Tensor | None:
        """The state (B, H) at each prompt's `<ego_wp>` in `states` (B, L, H), or None when no prompt holds one (a
        plain question)."""
        ego_id = self.config.ego_token_id
        if ego_id is None:
            raise ValueError("config.ego_token_id is not set: add the placeholders with DrivingPlaceholders.")
        ego_mask = input_ids == ego_id
        per_sample = ego_mask.sum(dim=1)
        if not per_sample.any():
            return None
        if (per_sample != 1).any():
            raise ValueError(
                f"Each sample needs exactly one <ego_wp> token; input_ids hold {per_sample.tolist()} (id {ego_id})."
            )
        return states[ego_mask]

    def trajectory_outputs(
        self,
        ego_features: torch.Tensor,
        command: torch.LongTensor | None = None,
        ego_waypoints: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Every mode's waypoints (B, M, T, D), the commanded (or only) mode's (B, T, D) or None without a command,
        and with `ego_waypoints` the unweighted waypoint loss (the flow-matching loss for the `"flow"` head)."""
        trajectory_modes = self.trajectory_decoder(ego_features)
        trajectory = None
        if self.config.num_modes == 1:
            trajectory = trajectory_modes[:, 0]
        elif command is not None:
            trajectory = select_mode(trajectory_modes, command)
        loss = None
        if ego_waypoints is not None:
            if self.config.trajectory_head == "flow":
                loss = self.trajectory_decoder.loss(ego_features, ego_waypoints, command)
            else:
                loss = waypoint_loss(trajectory, ego_waypoints, self.config.waypoint_loss)
        return trajectory_modes, trajectory, loss
