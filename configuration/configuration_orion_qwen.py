"""Configurations of the Orion driving models on Qwen2-VL and Qwen2.5-VL."""

from huggingface_hub.dataclasses import strict
from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

from .configuration_driving import OrionDrivingConfigMixin
from .remote_code import SelfContainedCodeMixin


@strict
class OrionQwenConfig(SelfContainedCodeMixin, OrionDrivingConfigMixin, Qwen2VLConfig):
    r"""
    Configuration of [`OrionQwenForTrajectory`]: a Qwen2-VL configuration plus the driving settings of
    [`OrionDrivingConfigMixin`].

    Example:

    ```python
    >>> from vlmheads import OrionQwenConfig

    >>> # ORION as released: 512 scene + 16 history queries, a two-layer CAN-bus MLP, one mode per command
    >>> config = OrionQwenConfig(
    ...     num_scene_queries=512, num_history_queries=16, can_bus_hidden_dims=[1024], num_modes=6
    ... )
    ```
    """

    model_type = "orion_qwen2_vl"
    auto_classes = ("AutoConfig",)


@strict
class OrionQwen2_5Config(SelfContainedCodeMixin, OrionDrivingConfigMixin, Qwen2_5_VLConfig):
    r"""
    Configuration of [`OrionQwen2_5ForTrajectory`]: a Qwen2.5-VL configuration plus the driving settings of
    [`OrionDrivingConfigMixin`].
    """

    model_type = "orion_qwen2_5_vl"
    auto_classes = ("AutoConfig",)
