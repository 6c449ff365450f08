"""Everything needed to work without the Hub: a real Qwen2 tokenizer, tiny random and public real-size configs."""

from .configs import (
    PUBLIC_CONFIGS,
    public_config,
    tiny_image_processor_kwargs,
    tiny_qwen2_5_vl_kwargs,
    tiny_qwen2_vl_kwargs,
)
from .tokenizer import qwen2_vl_tokenizer

__all__ = [
    "PUBLIC_CONFIGS",
    "public_config",
    "qwen2_vl_tokenizer",
    "tiny_image_processor_kwargs",
    "tiny_qwen2_5_vl_kwargs",
    "tiny_qwen2_vl_kwargs",
]
