"""Tiny PaliGemma: a small Gemma-style tokenizer, 32 x 32 pixel images seen by a SigLIP tower with patches of 8
(16 image tokens), hidden 64, 2 layers.

PaliGemma has no chat template: its processor puts the image tokens and `<bos>` before the prompt itself, and adds
the 1,024 `<locXXXX>` and 128 `<segXXX>` detection and segmentation tokens to the tokenizer.
"""

import math

from tokenizers import Tokenizer
from transformers import PaliGemmaConfig, PaliGemmaProcessor, PreTrainedTokenizerFast, SiglipImageProcessor
from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD

from ..small_tokenizer import small_bpe_tokenizer_json

IMAGE_SIZE = 32
PATCH_SIZE = 8
# Gemma's first special tokens in their Gemma order (ids 0-3 there), then PaliGemma's `<image>`.
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<image>")


def tiny_processor() -> PaliGemmaProcessor:
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(small_bpe_tokenizer_json(512, SPECIAL_TOKENS)),
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        model_max_length=4096,
    )
    image_processor = SiglipImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=IMAGENET_STANDARD_MEAN,
        image_std=IMAGENET_STANDARD_STD,
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
    )
    return PaliGemmaProcessor(image_processor, tokenizer)


def tiny_config(processor: PaliGemmaProcessor, **overrides) -> PaliGemmaConfig:
    tokenizer = processor.tokenizer
    image_size = processor.image_processor.size["height"]
    patch_size = image_size // math.isqrt(processor.image_seq_length)
    hidden_size = 64
    kwargs = {
        "vision_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": image_size,
            "patch_size": patch_size,
            "vision_use_head": False,
        },
        "text_config": {
            "model_type": "gemma",
            "vocab_size": len(tokenizer),
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": 2,
            # One key/value head like PaliGemma's; bitsandbytes' 4-bit layers on the CPU need output widths that
            # are multiples of 32, hence 2 heads of 32.
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 32,
            "max_position_embeddings": 1024,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        "image_token_index": processor.image_token_id,
        "projection_dim": hidden_size,
        "hidden_size": hidden_size,
    }
    return PaliGemmaConfig(**{**kwargs, **overrides})
