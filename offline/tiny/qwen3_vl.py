"""Tiny Qwen3-VL: the real Qwen2 tokenizer (Qwen3-VL keeps Qwen2-VL's vision token ids), 64 x 64 pixel images
with patches of 16 (4 image tokens after the 2 x 2 merge), hidden 64, 2 layers, one DeepStack vision layer."""

from transformers import Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLProcessor, Qwen3VLVideoProcessor
from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD

from ..tokenizer import qwen2_vl_tokenizer

PATCH_SIZE = 16
MERGE_SIZE = 2

# Qwen3-VL-Instruct's chat format: ChatML like Qwen2-VL's, but without a default system message.
QWEN3_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_processor() -> Qwen3VLProcessor:
    side = PATCH_SIZE * MERGE_SIZE
    image_processor = Qwen2VLImageProcessor(
        min_pixels=(2 * side) ** 2,
        max_pixels=(4 * side) ** 2,
        patch_size=PATCH_SIZE,
        merge_size=MERGE_SIZE,
        temporal_patch_size=2,
        image_mean=IMAGENET_STANDARD_MEAN,
        image_std=IMAGENET_STANDARD_STD,
    )
    return Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=qwen2_vl_tokenizer(),
        video_processor=Qwen3VLVideoProcessor(),
        chat_template=QWEN3_VL_CHAT_TEMPLATE,
    )


def tiny_config(processor: Qwen3VLProcessor, **overrides) -> Qwen3VLConfig:
    tokenizer = processor.tokenizer
    hidden_size = 64
    head_dim = 16
    kwargs = {
        "text_config": {
            "vocab_size": len(tokenizer),
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": 2,
            "num_attention_heads": hidden_size // head_dim,
            "num_key_value_heads": hidden_size // head_dim // 2,
            "head_dim": head_dim,
            "max_position_embeddings": 4096,
            # The sections of the (temporal, height, width) rotary frequencies sum to head_dim / 2.
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5000000.0,
                "mrope_section": [4, 2, 2],
                "mrope_interleaved": True,
            },
            "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        "vision_config": {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 4,
            "patch_size": processor.image_processor.patch_size,
            "spatial_merge_size": processor.image_processor.merge_size,
            "temporal_patch_size": processor.image_processor.temporal_patch_size,
            "out_hidden_size": hidden_size,
            # A 4 x 4 grid of learned position embeddings, interpolated to each image's patch grid.
            "num_position_embeddings": 16,
            "deepstack_visual_indexes": [0],
        },
        "image_token_id": processor.image_token_id,
        "video_token_id": processor.video_token_id,
        "vision_start_token_id": processor.vision_start_token_id,
        "vision_end_token_id": processor.vision_end_token_id,
        "tie_word_embeddings": True,
    }
    return Qwen3VLConfig(**{**kwargs, **overrides})
