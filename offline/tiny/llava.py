"""Tiny LLaVA-1.5: a small Llama-style tokenizer, 32 x 32 pixel images seen by a CLIP tower with patches of 8
(16 image tokens once the CLS token is dropped), hidden 64, 2 layers."""

from tokenizers import Tokenizer
from transformers import CLIPImageProcessor, LlavaConfig, LlavaProcessor, PreTrainedTokenizerFast
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from ..small_tokenizer import small_bpe_tokenizer_json

IMAGE_SIZE = 32
PATCH_SIZE = 8
# Llama's special tokens, then LLaVA-1.5's `<image>` and `<pad>` (ids 32000 and 32001 in llava-hf/llava-1.5-7b-hf).
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<image>", "<pad>")

# llava-hf/llava-1.5-7b-hf's chat format: "USER: <image>\n<prompt> ASSISTANT:", images before the text of a turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'text') %}{{ item['text'] + ' ' }}{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def tiny_processor() -> LlavaProcessor:
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(small_bpe_tokenizer_json(512, SPECIAL_TOKENS)),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        add_bos_token=True,
        model_max_length=4096,
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )
    # Like llava-1.5: the CLIP tower adds a CLS token (+1) that the "default" strategy drops again (-1).
    return LlavaProcessor(
        image_processor,
        tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def tiny_config(processor: LlavaProcessor, **overrides) -> LlavaConfig:
    tokenizer = processor.tokenizer
    image_size = processor.image_processor.crop_size["height"]
    kwargs = {
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": image_size,
            "patch_size": processor.patch_size,
            "projection_dim": 32,
        },
        "text_config": {
            "model_type": "llama",
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 1024,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        "image_token_index": processor.image_token_id,
        "image_seq_length": (image_size // processor.patch_size) ** 2,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": processor.vision_feature_select_strategy,
        "pad_token_id": tokenizer.pad_token_id,
    }
    return LlavaConfig(**{**kwargs, **overrides})
