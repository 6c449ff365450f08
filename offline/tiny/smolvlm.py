"""Tiny SmolVLM: the small offline BPE with SmolVLM's image tokens, images resized to a longest edge of 128 pixels
and split into at most 2 x 2 tiles of 64 pixels plus the global image (4 image tokens each after the 2 x 2 pixel
shuffle), hidden 64, 2 layers."""

from tokenizers import Tokenizer
from transformers import (
    PreTrainedTokenizerFast,
    SmolVLMConfig,
    SmolVLMImageProcessor,
    SmolVLMProcessor,
    SmolVLMVideoProcessor,
)
from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

from ..small_tokenizer import small_bpe_tokenizer_json

TILE_SIZE = 64
PATCH_SIZE = 16
SCALE_FACTOR = 2
MAX_TILES_PER_SIDE = 2
# (64 / 16)^2 patches per tile, merged 2 x 2 by the pixel shuffle.
IMAGE_SEQ_LEN = (TILE_SIZE // PATCH_SIZE) ** 2 // SCALE_FACTOR**2

# SmolLM2's ChatML tokens, then the tokens SmolVLM adds: image markers, end of turn, one marker per tile position
# (the real checkpoints have rows and columns 1-6).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<fake_token_around_image>",
    "<image>",
    "<end_of_utterance>",
    "<global-img>",
    *(f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)),
)
IMAGE_SPECIAL_TOKENS = {
    "fake_image_token": "<fake_token_around_image>",
    "image_token": "<image>",
    "end_of_utterance_token": "<end_of_utterance>",
    "global_image_token": "<global-img>",
}


def tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A fresh small SmolLM2-style tokenizer: `vocab_size` BPE tokens, then ChatML and SmolVLM's tokens."""
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(small_bpe_tokenizer_json(vocab_size, SPECIAL_TOKENS)),
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        extra_special_tokens=IMAGE_SPECIAL_TOKENS,
        model_max_length=8192,
    )


def tiny_processor() -> SmolVLMProcessor:
    sizes = {
        "size": {"longest_edge": MAX_TILES_PER_SIDE * TILE_SIZE},
        "max_image_size": {"longest_edge": TILE_SIZE},
    }
    return SmolVLMProcessor(
        image_processor=SmolVLMImageProcessor(do_image_splitting=True, **sizes),
        tokenizer=tiny_tokenizer(),
        video_processor=SmolVLMVideoProcessor(**sizes),
        image_seq_len=IMAGE_SEQ_LEN,
        chat_template=DEFAULT_CHAT_TEMPLATE,
    )


def tiny_config(processor: SmolVLMProcessor, **overrides) -> SmolVLMConfig:
    tokenizer = processor.tokenizer
    kwargs = {
        "text_config": {
            "model_type": "llama",
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        "vision_config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": processor.image_processor.max_image_size["longest_edge"],
            "patch_size": PATCH_SIZE,
        },
        "scale_factor": SCALE_FACTOR,
        "image_token_id": processor.image_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    return SmolVLMConfig(**{**kwargs, **overrides})
