"""Tiny InternVL (InternVL3-hf): the small offline BPE with InternVL's image tokens, 56 x 56 pixel tiles (4 image
tokens per tile after the 2 x 2 pixel shuffle, up to 4 tiles and a thumbnail per image), hidden 64, 2 layers."""

from tokenizers import Tokenizer
from transformers import (
    GotOcr2ImageProcessor,
    InternVLConfig,
    InternVLProcessor,
    InternVLVideoProcessor,
    PreTrainedTokenizerFast,
)
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..small_tokenizer import small_bpe_tokenizer_json

TILE_SIZE = 56
PATCH_SIZE = 14
DOWNSAMPLE_RATIO = 0.5
# (56 / 14)^2 patches, merged 2 x 2 by the pixel shuffle.
IMAGE_SEQ_LENGTH = int((TILE_SIZE // PATCH_SIZE) ** 2 * DOWNSAMPLE_RATIO**2)

# Qwen2's ChatML tokens, then InternVL's image markers (the names InternVLProcessor reads off the tokenizer).
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>")
IMAGE_SPECIAL_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}

# InternVL3-hf's chat format: ChatML, one <IMG_CONTEXT> line per image (the processor expands it per tile).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A fresh small Qwen2-style tokenizer: `vocab_size` BPE tokens, ChatML tokens, then InternVL's image tokens."""
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(small_bpe_tokenizer_json(vocab_size, SPECIAL_TOKENS)),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=IMAGE_SPECIAL_TOKENS,
        model_max_length=8192,
    )


def tiny_processor() -> InternVLProcessor:
    size = {"height": TILE_SIZE, "width": TILE_SIZE}
    image_processor = GotOcr2ImageProcessor(
        size=size,
        crop_to_patches=True,
        min_patches=1,
        max_patches=4,
        image_mean=IMAGENET_DEFAULT_MEAN,
        image_std=IMAGENET_DEFAULT_STD,
    )
    return InternVLProcessor(
        image_processor=image_processor,
        tokenizer=tiny_tokenizer(),
        video_processor=InternVLVideoProcessor(size=size),
        image_seq_length=IMAGE_SEQ_LENGTH,
        chat_template=CHAT_TEMPLATE,
    )


def tiny_config(processor: InternVLProcessor, **overrides) -> InternVLConfig:
    tokenizer = processor.tokenizer
    tile_size = processor.image_processor.size["height"]
    kwargs = {
        "text_config": {
            "model_type": "qwen2",
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "bos_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        "vision_config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "attention_bias": True,
            "image_size": tile_size,
            "patch_size": PATCH_SIZE,
        },
        "image_token_id": processor.image_token_id,
        "image_seq_length": processor.image_seq_length,
        "downsample_ratio": DOWNSAMPLE_RATIO,
    }
    return InternVLConfig(**{**kwargs, **overrides})
