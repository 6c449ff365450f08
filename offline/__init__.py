"""What working without the Hub needs: a real Qwen2 tokenizer, a small Llama-3-style tokenizer, tiny and real-size
configs, tiny Orion models and receipt classifiers."""

from .configs import (
    public_config,
    stored_public_configs,
    tiny_image_processor_kwargs,
    tiny_mllama_kwargs,
    tiny_qwen2_5_vl_kwargs,
    tiny_qwen2_vl_kwargs,
)
from .mllama_tokenizer import mllama_tokenizer
from .orion import ORION_BACKBONES, OrionBackbone, orion_backbone, tiny_orion_model, tiny_orion_processor
from .receipt import tiny_mllama_backbone_kwargs, tiny_mllama_model, tiny_receipt_model, tiny_receipt_processor
from .tokenizer import qwen2_vl_tokenizer

__all__ = [
    "ORION_BACKBONES",
    "OrionBackbone",
    "mllama_tokenizer",
    "orion_backbone",
    "public_config",
    "stored_public_configs",
    "qwen2_vl_tokenizer",
    "tiny_image_processor_kwargs",
    "tiny_mllama_backbone_kwargs",
    "tiny_mllama_kwargs",
    "tiny_mllama_model",
    "tiny_orion_model",
    "tiny_orion_processor",
    "tiny_qwen2_5_vl_kwargs",
    "tiny_qwen2_vl_kwargs",
    "tiny_receipt_model",
    "tiny_receipt_processor",
]
