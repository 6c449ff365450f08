"""`VLMForTrajectory`: the Orion driving head on any registered VLM family.

Imports only torch, transformers and the other model-side files: this file ships as remote code.
"""

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel
from transformers.utils import ModelOutput, can_return_tuple

from ..configuration.configuration_driving import PLACEHOLDER_TOKEN_IDS
from ..configuration.configuration_vlm_trajectory import VLMTrajectoryConfig
from .modeling_driving import DrivingHeadMixin
from .modeling_vlm_heads import (
    DelegatedGeneration,
    VLMHeadPreTrainedModel,
    batch_size_of,
    check_image_tokens,
    sequence_states,
)


@dataclass
class VLMTrajectoryOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor`, *optional*):
        The waypoint loss (the flow-matching loss for `trajectory_head="flow"`), when `ego_waypoints` are given.
    trajectory (`torch.FloatTensor` of shape `(B, num_waypoints, waypoint_dim)`):
        Predicted ego waypoints of the commanded mode (of the only mode when `num_modes` is 1).
    trajectory_modes (`torch.FloatTensor` of shape `(B, num_modes, num_waypoints, waypoint_dim)`):
        The waypoints of every mode.
    ego_features (`torch.FloatTensor` of shape `(B, H)`):
        The backbone's last hidden state at the `<ego_wp>` token.
    """

    loss: torch.FloatTensor | None = None
    trajectory: torch.FloatTensor | None = None
    trajectory_modes: torch.FloatTensor | None = None
    ego_features: torch.FloatTensor | None = None


class VLMForTrajectory(DrivingHeadMixin, DelegatedGeneration, VLMHeadPreTrainedModel):
    """The Orion driving head on any registered VLM family.

    Scene queries (B, Ns, Ds), history queries (B, Nh, Dh) and the CAN-bus vector (B, Dc) are projected to the
    width H and replace the embeddings of their placeholder tokens (`DrivingEmbeddings`, shared with the Orion
    models); the backbone reads the prompt with its images (`sequence_states`), and its state at `<ego_wp>` (B, H)
    feeds the trajectory head (`"mlp"` or `"flow"`) → waypoints (B, T, D). The placeholders need token ids: add
    them to the family's processor with `DrivingPlaceholders` and pass `placeholders.model_config_kwargs()` to
    `from_backbone`, which grows the backbone's embeddings to cover them.
    """

    config: VLMTrajectoryConfig
    config_class = VLMTrajectoryConfig
    model_card_template = "vlm_trajectory.md"
    model_card_tags = ("autonomous-driving", "trajectory-prediction")

    def __init__(self, config: VLMTrajectoryConfig, backbone: PreTrainedModel | None = None):
        config.check_driving_settings()
        super().__init__(config, backbone)
        self.build_driving_head(config.hidden_size)
        self.post_init()

    @classmethod
    def prepare_backbone(cls, backbone: PreTrainedModel, config_kwargs: dict) -> None:
        """Grows the backbone's token embeddings (and output layer) to cover placeholder ids beyond its vocabulary,
        e.g. `DrivingPlaceholders(processor).model_config_kwargs()` after the tokenizer grew: as the Orion
        processors add their tokens, `from_backbone` makes room for them. The new rows start at the mean embedding."""
        token_ids = [config_kwargs[name] for name in PLACEHOLDER_TOKEN_IDS if config_kwargs.get(name) is not None]
        if token_ids and max(token_ids) >= backbone.get_input_embeddings().num_embeddings:
            backbone.resize_token_embeddings(max(token_ids) + 1)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        scene_queries: torch.FloatTensor | None = None,
        history_queries: torch.FloatTensor | None = None,
        can_bus: torch.FloatTensor | None = None,
        command: torch.LongTensor | None = None,
        ego_waypoints: torch.FloatTensor | None = None,
        **backbone_inputs,
    ) -> VLMTrajectoryOutput:
        r"""
        input_ids, attention_mask (`torch.LongTensor` of shape `(B, L)`):
            The prompt: expanded driving placeholders, one `<ego_wp>`, and the family's image tokens with images.
            Prompts without `<ego_wp>` (plain questions) give an output without trajectory.
        pixel_values (`torch.FloatTensor`, *optional*):
            Camera images as the family's processor returns them, its other outputs in `backbone_inputs`.
        scene_queries (`torch.FloatTensor` of shape `(B, Ns, scene_query_dim)`, *optional*):
            One row per `<scene>` token of each sample.
        history_queries (`torch.FloatTensor` of shape `(B, Nh, history_query_dim)`, *optional*):
            One row per `<history>` token of each sample.
        can_bus (`torch.FloatTensor` of shape `(B, can_bus_dim)`, *optional*):
            Ego CAN-bus state, for the one `<can_bus>` token of each sample.
        command (`torch.LongTensor` of shape `(B,)`, *optional*):
            Navigation command picking the trajectory mode; required to train when `num_modes` > 1.
        ego_waypoints (`torch.FloatTensor` of shape `(B, num_waypoints, waypoint_dim)`, *optional*):
            Target waypoints; adds the waypoint loss.
        """
        if input_ids is None:
            raise ValueError("input_ids are required: the trajectory is read at the prompt's <ego_wp> token.")
        batch_size = batch_size_of(input_ids=input_ids, attention_mask=attention_mask)
        self.check_driving_inputs(batch_size, scene_queries, history_queries, can_bus, ego_waypoints, command)
        check_image_tokens(self.config.backbone_config, input_ids, has_images=pixel_values is not None)
        inputs_embeds = self.get_input_embeddings()(input_ids)
        inputs_embeds = self.driving_embeddings(input_ids, inputs_embeds, scene_queries, history_queries, can_bus)
        if pixel_values is not None:
            backbone_inputs["pixel_values"] = pixel_values
        states = sequence_states(
            self.backbone,
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            **backbone_inputs,
        )
        ego_features = self.ego_features(input_ids, states)
        if ego_features is None:
            if ego_waypoints is not None:
                raise ValueError(
                    "ego_waypoints were given but input_ids hold no <ego_wp> token to read a trajectory at."
                )
            return VLMTrajectoryOutput(ego_features=None)
        trajectory_modes, trajectory, loss = self.trajectory_outputs(ego_features, command, ego_waypoints)
        if loss is not None:
            loss = self.config.waypoint_loss_weight * loss
        return VLMTrajectoryOutput(
            loss=loss, trajectory=trajectory, trajectory_modes=trajectory_modes, ego_features=ego_features
        )
