"""A small byte-level BPE tokenizer built offline, for the tiny models of every family.

The families' real tokenizers cannot be downloaded here. This one is trained on a few hundred words about receipts
and photos; each family adds its own special tokens after the BPE tokens.
"""

import functools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

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
def small_bpe_tokenizer_json(vocab_size: int, special_tokens: tuple[str, ...]) -> str:
    """A byte-level BPE with `vocab_size` tokens trained on a few hundred offline words, then `special_tokens`.

    Any family's offline processor can sit on it: pass the family's special tokens, in the order their ids should
    take after the BPE tokens.
    """
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
    tokenizer.add_special_tokens(list(special_tokens))
    return tokenizer.to_str()
