"""Tiny receipt classifiers, processors, photos and batches shared by the receipt tests."""

import numpy as np
import torch
from PIL import Image

from vlmheads import ReceiptVLClassifier, ReceiptVLProcessor
from vlmheads.offline import tiny_mllama_model, tiny_receipt_model, tiny_receipt_processor

TILE = 32


def make_processor(**kwargs) -> ReceiptVLProcessor:
    """A receipt processor over the small offline tokenizer; tiles of 32 pixels, up to 4 per image."""
    return tiny_receipt_processor(tile_size=TILE, **kwargs)


def make_model(processor: ReceiptVLProcessor, seed: int = 0, **config_overrides) -> ReceiptVLClassifier:
    """A tiny random classifier whose cross-attention gates and head are not near zero, so that the image and the
    prompt visibly change its logits (fresh Mllama cross-attention gates are 0)."""
    model = tiny_receipt_model(processor, seed=seed, **config_overrides)
    wake_up(model, seed)
    return model


def make_plain_mllama(processor: ReceiptVLProcessor, seed: int = 0):
    model = tiny_mllama_model(processor, seed=seed)
    wake_up(model, seed)
    return model


def wake_up(model: torch.nn.Module, seed: int) -> None:
    """Opens the cross-attention gates and widens the head's output layer of a random model."""
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                parameter.copy_(torch.full_like(parameter, 0.8))
            elif name.startswith("classifier.out_proj"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator))


def photo(seed: int, width: int = 48, height: int = 40) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def photo_file(folder, seed: int, width: int = 48, height: int = 40, suffix: str = "png") -> str:
    path = folder / f"photo_{seed}.{suffix}"
    photo(seed, width, height).save(path)
    return str(path)


def question_prompt(processor: ReceiptVLProcessor, question: str, images: int = 1) -> str:
    content = [{"type": "image"}] * images + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def batch(processor: ReceiptVLProcessor, multimodal: bool, sizes=((48, 40), (30, 90)), **kwargs) -> dict:
    """A batch of photos of different sizes and aspect ratios, with the classification prompt when asked."""
    images = [photo(seed, *size) for seed, size in enumerate(sizes)]
    text = [processor.classification_prompt()] * len(images) if multimodal else None
    return processor(images=images, text=text, padding=True, return_tensors="pt", **kwargs)
