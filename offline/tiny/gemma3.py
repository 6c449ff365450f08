"""Tiny Gemma 3: a small Gemma-3-style tokenizer, 32 x 32 pixel images seen by a SigLIP tower with patches of 4
(8 x 8 patches, average-pooled to 16 image tokens), hidden 64, 2 layers (one sliding-window, one global)."""

from tokenizers import Tokenizer
from transformers import Gemma3Config, Gemma3ImageProcessor, Gemma3Processor, PreTrainedTokenizerFast
from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD

from ..small_tokenizer import small_bpe_tokenizer_json

IMAGE_SIZE = 32
PATCH_SIZE = 4
IMAGE_SEQ_LENGTH = 16
# Gemma's first special tokens in their Gemma order (ids 0-3 there), the chat turn markers, then the image markers.
SPECIAL_TOKENS = (
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
)

# google/gemma-3-4b-it's chat format: a system message is folded into the first user turn, the assistant's role
# is "model", and an image stands as `<start_of_image>` (the processor expands it).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% if messages[0]['content'] is string %}{% set first_user_prefix = messages[0]['content'] + '\n\n' %}"
    "{% else %}{% set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' %}{% endif %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def tiny_processor() -> Gemma3Processor:
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(small_bpe_tokenizer_json(512, SPECIAL_TOKENS)),
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        add_bos_token=True,
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
        model_max_length=4096,
    )
    image_processor = Gemma3ImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=IMAGENET_STANDARD_MEAN,
        image_std=IMAGENET_STANDARD_STD,
    )
    return Gemma3Processor(image_processor, tokenizer, chat_template=CHAT_TEMPLATE, image_seq_length=IMAGE_SEQ_LENGTH)


def tiny_config(processor: Gemma3Processor, **overrides) -> Gemma3Config:
    tokenizer = processor.tokenizer
    hidden_size = 64
    kwargs = {
        "vision_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": processor.image_processor.size["height"],
            "patch_size": PATCH_SIZE,
            "vision_use_head": False,
        },
        "text_config": {
            "vocab_size": len(tokenizer),
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "sliding_window": 64,
            "layer_types": ["sliding_attention", "full_attention"],
            "max_position_embeddings": 1024,
            "bos_token_id": tokenizer.bos_token_id,
            # Like gemma-3-4b-it: generation stops at <eos> or at the end of the model's turn.
            "eos_token_id": [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")],
            "pad_token_id": tokenizer.pad_token_id,
        },
        "mm_tokens_per_image": processor.image_seq_length,
        "boi_token_index": tokenizer.boi_token_id,
        "eoi_token_index": tokenizer.eoi_token_id,
        "image_token_index": tokenizer.image_token_id,
    }
    return Gemma3Config(**{**kwargs, **overrides})
