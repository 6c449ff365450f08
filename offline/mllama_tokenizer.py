"""A small Llama-3-style tokenizer for the Mllama models, built offline.

The real Llama 3 tokenizer cannot be downloaded here. This one is a byte-level BPE trained on a few hundred words
about receipts and photos, with the Llama 3 special tokens that Mllama's processor and chat template use. Like in
Llama-3.2-Vision, `<|image|>` is the last id, one past the text vocabulary, so a model built over it has
`text_config.vocab_size = len(tokenizer) - 1` and `image_token_index = len(tokenizer) - 1`.
"""

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .small_tokenizer import small_bpe_tokenizer_json

LLAMA3_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|finetune_right_pad_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
)
IMAGE_TOKEN = "<|image|>"


def mllama_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerBase:
    """A fresh small Llama-3-style tokenizer: `vocab_size` BPE tokens, the Llama 3 special tokens, then `<|image|>`.

    Like the Llama 3 tokenizer it adds no special tokens by itself: prompts carry `<|begin_of_text|>` (the
    chat template and `MllamaProcessor` put it there).
    """
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(
            small_bpe_tokenizer_json(vocab_size, (*LLAMA3_SPECIAL_TOKENS, IMAGE_TOKEN))
        ),
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        model_max_length=131072,
    )
