"""Configuration of `VLMForTrajectory`: the Orion driving head on a VLM backbone of any registered family."""

from huggingface_hub.dataclasses import strict
from transformers import PretrainedConfig

from .configuration_driving import OrionDrivingConfigMixin
from .configuration_vlm_heads import VLMHeadConfig


@strict
class VLMTrajectoryConfig(OrionDrivingConfigMixin, VLMHeadConfig):
    r"""
    Configuration of [`VLMForTrajectory`]: the backbone's configuration (`backbone_config`) plus the driving
    settings of [`OrionDrivingConfigMixin`] (query counts and widths, CAN-bus projector, trajectory head `"mlp"` or
    `"flow"`, placeholder token ids). The hidden size H is the backbone language model's. `generate()` answers in
    text through the backbone; the language-model loss weight is not used.

    Example:

    ```python
    >>> from vlmheads import VLMTrajectoryConfig, tiny_vlm_config

    >>> config = VLMTrajectoryConfig(backbone_config=tiny_vlm_config("gemma3"), num_scene_queries=4, scene_query_dim=8)
    >>> config.trajectory_head
    'mlp'
    ```
    """

    model_type = "vlm_trajectory"

    @property
    def text_config(self) -> PretrainedConfig:
        """The backbone language model's configuration: H is its `hidden_size`, its vocabulary holds the ids."""
        return self.backbone_config.get_text_config()

    # The backbone's own special tokens, which no driving placeholder may reuse (None where the family has none).
    @property
    def image_token_id(self) -> int | None:
        backbone = self.backbone_config
        return getattr(backbone, "image_token_id", None) or getattr(backbone, "image_token_index", None)

    @property
    def video_token_id(self) -> int | None:
        return getattr(self.backbone_config, "video_token_id", None)

    @property
    def vision_start_token_id(self) -> int | None:
        return getattr(self.backbone_config, "vision_start_token_id", None)

    @property
    def vision_end_token_id(self) -> int | None:
        return getattr(self.backbone_config, "vision_end_token_id", None)
