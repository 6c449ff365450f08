"""Tiny Qwen2.5-VL: the real Qwen2 tokenizer, 56 x 56 pixel images (4 image tokens), hidden 64, 2 layers."""

from transformers import Qwen2_5_VLConfig, Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

from ..configs import tiny_image_processor_kwargs, tiny_qwen2_5_vl_kwargs
from ..tokenizer import QWEN2_VL_CHAT_TEMPLATE, qwen2_vl_tokenizer


def tiny_processor() -> Qwen2_5_VLProcessor:
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**tiny_image_processor_kwargs()),
        tokenizer=qwen2_vl_tokenizer(),
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )


def tiny_config(processor: Qwen2_5_VLProcessor, **overrides) -> Qwen2_5_VLConfig:
    return Qwen2_5_VLConfig(**{**tiny_qwen2_5_vl_kwargs(len(processor.tokenizer)), **overrides})
