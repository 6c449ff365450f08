"""A small Llama-3-style tokenizer for the Mllama models, built offline.

The real Llama 3 tokenizer cannot be downloaded here. This one is a byte-level BPE trained on a few hundred words
about receipts and photos, with the Llama 3 special tokens that Mllama's processor and chat template use. Like in
Llama-3.2-Vision, `<|image|>` is the last id, one past the text vocabulary, so a model built over it has
`text_config.vocab_size = len(tokenizer) - 1` and `image_token_index = len(tokenizer) - 1`.
"""

import functools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

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

_CORPUS = """
How many receipts are in this photo? There are no receipts in the photo. There is one receipt on the table.
There are two receipts, three receipts or more on the desk. Count the receipts in the image and answer with a number.
What is the total amount on the receipt? The total is 12.50 dollars, paid by card, tax included, thank you.
Which store printed this receipt? The store name is at the top: market, bakery, coffee shop, pharmacy, grocery.
What is the date on the receipt? The date is printed below the address, next to the time and the cashier.
Describe the photo: a white paper slip with printed lines of text, items, prices, a subtotal, a total and a barcode.
The background is a wooden table, a kitchen counter, a car seat, a bag, a notebook, keys, a phone and a pen.
A receipt is a long narrow strip of paper; it may be folded, rotated, crumpled, torn or partly covered.
Classify the image: zero, one, two or more. The answer is 0, 1 or 2 or more. Yes, no, maybe, unknown.
Item quantity price discount change cash visa mastercard subtotal total tax tip invoice order number table guest.
Monday Tuesday Wednesday Thursday Friday Saturday Sunday January February March April May June July August.
September October November December morning evening receipt receipts photo photos image images paper papers.
Please read the text and tell me what you see. I see a receipt with black text on white paper in good light.
The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 10 11 12 20 50 99 100 2024 2025 $ % # @ & * ( ) : ; .
user assistant system you are a helpful assistant that reads receipts and answers questions about photos.
"""


@functools.cache
def _mllama_tokenizer_json(vocab_size: int) -> str:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.strip().splitlines(), trainer=trainer)
    tokenizer.add_special_tokens([*LLAMA3_SPECIAL_TOKENS, IMAGE_TOKEN])
    return tokenizer.to_str()


def mllama_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerBase:
    """A fresh small Llama-3-style tokenizer: `vocab_size` BPE tokens, the Llama 3 special tokens, then `<|image|>`.

    Like the Llama 3 tokenizer it adds no special tokens by itself: prompts carry `<|begin_of_text|>` (the
    chat template and `MllamaProcessor` put it there).
    """
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_mllama_tokenizer_json(vocab_size)),
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        model_max_length=131072,
    )
