"""Tiny Qwen2-VL: the real Qwen2-VL tokenizer, 56 x 56 pixel images (4 image tokens), hidden 64, 2 layers."""

from transformers import Qwen2VLConfig, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

from ..configs import tiny_image_processor_kwargs, tiny_qwen2_vl_kwargs
from ..tokenizer import QWEN2_VL_CHAT_TEMPLATE, qwen2_vl_tokenizer


def tiny_processor() -> Qwen2VLProcessor:
    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**tiny_image_processor_kwargs()),
        tokenizer=qwen2_vl_tokenizer(),
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )


def tiny_config(processor: Qwen2VLProcessor, **overrides) -> Qwen2VLConfig:
    return Qwen2VLConfig(**{**tiny_qwen2_vl_kwargs(len(processor.tokenizer)), **overrides})
