"""Small receipt classifiers and processors built offline, for examples, tests and benchmarks."""

import torch
from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaImageProcessor
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from ..configuration.configuration_receipt_vl import ReceiptVLConfig
from ..modeling.modeling_receipt_vl import ReceiptVLClassifier
from ..processing.processing_receipt_vl import ReceiptVLProcessor
from .configs import tiny_mllama_kwargs
from .mllama_tokenizer import mllama_tokenizer


def tiny_receipt_processor(tile_size: int = 32, max_image_tiles: int = 4, **processor_kwargs) -> ReceiptVLProcessor:
    """A receipt processor over the small offline Llama-3-style tokenizer; images are cut into tiles of
    `tile_size` pixels, up to `max_image_tiles` per image, normalised like Llama-3.2-Vision's (CLIP statistics)."""
    image_processor = MllamaImageProcessor(
        size={"height": tile_size, "width": tile_size},
        max_image_tiles=max_image_tiles,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )
    return ReceiptVLProcessor(image_processor, mllama_tokenizer(), **processor_kwargs)


def tiny_mllama_backbone_kwargs(processor: ReceiptVLProcessor, **overrides) -> dict:
    """`tiny_mllama_kwargs` matching the processor: its vocabulary, special tokens and tile size."""
    tokenizer = processor.tokenizer
    return tiny_mllama_kwargs(
        vocab_size=processor.image_token_id,
        image_token_index=processor.image_token_id,
        image_size=processor.image_processor.size["height"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **overrides,
    )


def tiny_mllama_model(
    processor: ReceiptVLProcessor, seed: int = 0, **backbone_overrides
) -> MllamaForConditionalGeneration:
    """A plain tiny random `MllamaForConditionalGeneration` over the processor's vocabulary, in eval mode."""
    torch.manual_seed(seed)
    config = MllamaConfig(**tiny_mllama_backbone_kwargs(processor, **backbone_overrides))
    return MllamaForConditionalGeneration(config).eval()


def tiny_receipt_model(
    processor: ReceiptVLProcessor, seed: int = 0, backbone_overrides: dict | None = None, **config_overrides
) -> ReceiptVLClassifier:
    """A tiny random receipt classifier (hidden 64, 2 decoder layers, head [64]) matching the processor, in eval
    mode; `config_overrides` set `ReceiptVLConfig` fields such as `pooling`."""
    settings = {"classifier_hidden_dims": [64], **config_overrides}
    backbone = tiny_mllama_backbone_kwargs(processor, **(backbone_overrides or {}))
    config = ReceiptVLConfig(**{**backbone, **processor.model_config_kwargs(), **settings})
    torch.manual_seed(seed)
    return ReceiptVLClassifier(config).eval()
