"""Small Orion models and processors built offline, for demos, tests and benchmarks."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    PretrainedConfig,
    PreTrainedModel,
    ProcessorMixin,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

from ..configuration.configuration_orion_qwen import OrionQwen2_5Config, OrionQwenConfig
from ..modeling.modeling_orion_qwen import OrionQwen2_5ForTrajectory, OrionQwenForTrajectory
from ..processing.processing_orion_qwen import OrionQwen2_5Processor, OrionQwenProcessor
from .configs import tiny_image_processor_kwargs, tiny_qwen2_5_vl_kwargs, tiny_qwen2_vl_kwargs
from .tokenizer import qwen2_vl_tokenizer


@dataclass(frozen=True)
class OrionBackbone:
    """The Orion classes on one Qwen backbone, and the keyword arguments of a tiny random backbone config."""

    config: type[PretrainedConfig]
    model: type[PreTrainedModel]
    processor: type[ProcessorMixin]
    tiny_kwargs: Callable[..., dict[str, Any]]


ORION_BACKBONES = {
    "qwen2_vl": OrionBackbone(OrionQwenConfig, OrionQwenForTrajectory, OrionQwenProcessor, tiny_qwen2_vl_kwargs),
    "qwen2_5_vl": OrionBackbone(
        OrionQwen2_5Config, OrionQwen2_5ForTrajectory, OrionQwen2_5Processor, tiny_qwen2_5_vl_kwargs
    ),
}


def orion_backbone(name: str) -> OrionBackbone:
    if name not in ORION_BACKBONES:
        raise ValueError(f"backbone must be one of {sorted(ORION_BACKBONES)}, got {name!r}.")
    return ORION_BACKBONES[name]


def tiny_orion_processor(backbone: str = "qwen2_vl", **processor_kwargs) -> ProcessorMixin:
    """An Orion processor over the real Qwen2-VL tokenizer; camera images of 56 x 56 pixels give 4 image tokens."""
    return orion_backbone(backbone).processor(
        image_processor=Qwen2VLImageProcessor(**tiny_image_processor_kwargs()),
        tokenizer=qwen2_vl_tokenizer(),
        video_processor=Qwen2VLVideoProcessor(),
        **processor_kwargs,
    )


def tiny_orion_model(
    processor: ProcessorMixin, backbone: str = "qwen2_vl", seed: int = 0, **config_overrides
) -> PreTrainedModel:
    """A tiny random Orion model (hidden 64, 2 layers) over the processor's full vocabulary, in eval mode."""
    classes = orion_backbone(backbone)
    config = classes.config(
        **classes.tiny_kwargs(len(processor.tokenizer)), **processor.model_config_kwargs(), **config_overrides
    )
    torch.manual_seed(seed)
    return classes.model(config).eval()
