"""Orion driving models: Qwen2-VL / Qwen2.5-VL reading projected driving features, with a trajectory head.

Scene queries (B, Ns, Ds), history queries (B, Nh, Dh) and the CAN-bus vector (B, Dc) are projected to the
decoder width H and replace the embeddings of their placeholder tokens, as image features replace
`<|image_pad|>`. The decoder's last hidden state at `<ego_wp>` is the ego feature (B, H), which the trajectory
decoder turns into waypoints (B, T, 2).
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.modeling_outputs import MultimodalCausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils import can_return_tuple

from ..configuration.configuration_orion_qwen import OrionQwen2_5Config, OrionQwenConfig
from ..publishing import ModelCardMixin
from .heads import init_head_module
from .modeling_base import SelfContainedModelMixin
from .modeling_driving import DrivingHeadMixin

# Official checkpoints keep legacy key names (`model.layers.*`, `visual.*`); transformers renames them only for
# the classes it knows, so without this the backbone of a subclass would silently be re-initialised.
for _name, _parent in (
    ("OrionQwenForTrajectory", "Qwen2VLForConditionalGeneration"),
    ("OrionQwen2_5ForTrajectory", "Qwen2_5_VLForConditionalGeneration"),
):
    register_checkpoint_conversion_mapping(_name, get_checkpoint_conversion_mapping(_parent), overwrite=True)

DRIVING_INPUTS = ("scene_queries", "history_queries", "can_bus", "command", "ego_waypoints")


@dataclass
class OrionTrajectoryOutput(MultimodalCausalLMOutputWithPast):
    r"""
    trajectory (`torch.FloatTensor` of shape `(B, num_waypoints, waypoint_dim)`):
        Predicted ego waypoints of the commanded mode (of the only mode when `num_modes` is 1).
    trajectory_modes (`torch.FloatTensor` of shape `(B, num_modes, num_waypoints, waypoint_dim)`):
        The waypoints of every mode.
    ego_features (`torch.FloatTensor` of shape `(B, H)`):
        The decoder's last hidden state at the `<ego_wp>` token.
    waypoint_loss (`torch.FloatTensor`, *optional*):
        Waypoint regression loss, returned when `ego_waypoints` are given.
    lm_loss (`torch.FloatTensor`, *optional*):
        Language-model loss, returned when `labels` are given.
    """

    trajectory: torch.FloatTensor | None = None
    trajectory_modes: torch.FloatTensor | None = None
    ego_features: torch.FloatTensor | None = None
    waypoint_loss: torch.FloatTensor | None = None
    lm_loss: torch.FloatTensor | None = None


class OrionTrajectoryMixin(DrivingHeadMixin, ModelCardMixin, SelfContainedModelMixin):
    """The driving parts, shared by the Qwen2-VL and Qwen2.5-VL models: mix in before the transformers class."""

    auto_classes = ("AutoModel", "AutoModelForImageTextToText")
    model_card_template = "orion_qwen.md"
    model_card_tags = ("orion", "autonomous-driving", "trajectory-prediction")

    def __init__(self, config: OrionQwenConfig | OrionQwen2_5Config):
        config.check_driving_settings()
        super().__init__(config)
        self.build_driving_head(config.text_config.hidden_size)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if not init_head_module(module):
            super()._init_weights(module)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.FloatTensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        scene_queries: torch.FloatTensor | None = None,
        history_queries: torch.FloatTensor | None = None,
        can_bus: torch.FloatTensor | None = None,
        command: torch.LongTensor | None = None,
        ego_waypoints: torch.FloatTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> OrionTrajectoryOutput:
        r"""
        scene_queries (`torch.FloatTensor` of shape `(B, Ns, scene_query_dim)`, *optional*):
            Scene queries of the perception module, one row per `<scene>` token of each sample.
        history_queries (`torch.FloatTensor` of shape `(B, Nh, history_query_dim)`, *optional*):
            History queries, one row per `<history>` token of each sample.
        can_bus (`torch.FloatTensor` of shape `(B, can_bus_dim)`, *optional*):
            Ego CAN-bus state, for the one `<can_bus>` token of each sample.
        command (`torch.LongTensor` of shape `(B,)`, *optional*):
            Navigation command picking the trajectory mode; required when `num_modes` > 1.
        ego_waypoints (`torch.FloatTensor` of shape `(B, num_waypoints, waypoint_dim)`, *optional*):
            Target waypoints; adds the waypoint loss. A batch with `ego_waypoints` and no `labels` skips the
            full-vocabulary logits (`logits` is None): only the hidden states the trajectory head reads are computed.

        The trajectory is read at the prompt: a call that continues a non-empty cache (generation's decode steps)
        returns none. With `num_modes` > 1 and no `command`, `trajectory` is None and `trajectory_modes` holds them
        all.
        """
        if input_ids is None and any(value is not None for value in (scene_queries, history_queries, can_bus)):
            raise ValueError("The driving inputs need input_ids to find their placeholder tokens.")
        if ego_waypoints is not None and input_ids is None:
            raise ValueError("ego_waypoints need input_ids holding an <ego_wp> token.")
        # Qwen2.5-VL would silently fall back to 1-D positions for image tokens without the token types.
        has_vision = image_grid_thw is not None or video_grid_thw is not None
        if has_vision and mm_token_type_ids is None and position_ids is None:
            raise ValueError("Images and videos need mm_token_type_ids (the processor returns them) for M-RoPE.")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        reads_prompt = cache is None or cache.get_seq_length() == 0
        if input_ids is not None:
            self.check_driving_inputs(
                input_ids.shape[0], scene_queries, history_queries, can_bus, ego_waypoints, command
            )
            if labels is not None and labels.shape != input_ids.shape:
                raise ValueError(
                    f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}."
                )
            if inputs_embeds is None:
                inputs_embeds = self.get_input_embeddings()(input_ids)
            inputs_embeds = self.driving_embeddings(input_ids, inputs_embeds, scene_queries, history_queries, can_bus)

        outputs = self.model(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            pixel_values=pixel_values,
            pixel_values_videos=pixel_values_videos,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state

        ego_features = trajectory_modes = trajectory = trajectory_loss = None
        if input_ids is not None and self.config.ego_token_id is not None and reads_prompt:
            ego_features = self.ego_features(input_ids, hidden_states)
        if ego_features is not None:
            trajectory_modes, trajectory, trajectory_loss = self.trajectory_outputs(
                ego_features, command, ego_waypoints
            )
        elif ego_waypoints is not None:
            raise ValueError("ego_waypoints were given but input_ids hold no <ego_wp> token to read a trajectory at.")

        logits = None
        if labels is not None or ego_waypoints is None:
            logits = self.lm_head(slice_logits_to_keep(hidden_states, logits_to_keep))

        loss = lm_loss = None
        if trajectory_loss is not None:
            loss = self.config.waypoint_loss_weight * trajectory_loss
        if labels is not None:
            lm_loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
            loss = self.config.lm_loss_weight * lm_loss + (0 if loss is None else loss)

        return OrionTrajectoryOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=outputs.image_outputs,
            video_outputs=outputs.video_outputs,
            trajectory=trajectory,
            trajectory_modes=trajectory_modes,
            ego_features=ego_features,
            waypoint_loss=trajectory_loss,
            lm_loss=lm_loss,
        )

    def prepare_inputs_for_generation(self, *args, is_first_iteration: bool | None = False, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        # The driving features fill placeholders of the prompt; with a cache, decode steps feed only new tokens.
        if not is_first_iteration and model_inputs.get("use_cache", True):
            for name in DRIVING_INPUTS:
                model_inputs.pop(name, None)
        return model_inputs


class OrionQwenForTrajectory(OrionTrajectoryMixin, Qwen2VLForConditionalGeneration):
    """Qwen2-VL with projected driving features and a trajectory head reading the `<ego_wp>` token."""

    config: OrionQwenConfig
    model_card_tags = (*OrionTrajectoryMixin.model_card_tags, "qwen2_vl")


class OrionQwen2_5ForTrajectory(OrionTrajectoryMixin, Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL with projected driving features and a trajectory head reading the `<ego_wp>` token."""

    config: OrionQwen2_5Config
    model_card_tags = (*OrionTrajectoryMixin.model_card_tags, "qwen2_5_vl")
