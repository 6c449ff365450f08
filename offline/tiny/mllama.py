"""Tiny Mllama (Llama-3.2-Vision): the small offline Llama-3-style tokenizer, tiles of 32 pixels (up to 4 per
image), hidden 64, 2 decoder layers of which the last cross-attends."""

from transformers import MllamaConfig, MllamaImageProcessor, MllamaProcessor
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from ..configs import tiny_mllama_kwargs
from ..mllama_tokenizer import mllama_tokenizer

TILE_SIZE = 32
# What a Llama-3.2-Vision checkpoint's processor ships: the user and assistant turns of the Llama 3 format, an
# `<|image|>` where a message places an image. The tiny processor stands for that checkpoint, so it carries its own.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|image|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def tiny_processor() -> MllamaProcessor:
    image_processor = MllamaImageProcessor(
        size={"height": TILE_SIZE, "width": TILE_SIZE},
        max_image_tiles=4,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )
    return MllamaProcessor(image_processor, mllama_tokenizer(), chat_template=CHAT_TEMPLATE)


def tiny_config(processor: MllamaProcessor, **overrides) -> MllamaConfig:
    tokenizer = processor.tokenizer
    image_token_id = tokenizer.convert_tokens_to_ids(processor.image_token)
    kwargs = tiny_mllama_kwargs(
        vocab_size=image_token_id,
        image_token_index=image_token_id,
        image_size=processor.image_processor.size["height"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return MllamaConfig(**{**kwargs, **overrides})
