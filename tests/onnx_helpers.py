"""Tiny models, their ONNX exports and processor batches shared by the ONNX tests; each export is built once per
test session (in a temporary folder removed at exit)."""

import atexit
import copy
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from orion_helpers import FAMILIES, camera_image, driving_features, driving_prompt, make_processor, real_vocab_model
from vlm_helpers import family_batch, tiny_backbone, tiny_processor

from vlmheads.onnx_export import export_onnx

# The tiny processors turn each (small) image into 56 x 56 pixels: 4 image tokens.
TINY_IMAGE_SIZE = (56, 56)
# Plain backbones by their registry names, Orion models by their backbone.
PLAIN = {"qwen2_vl": "qwen2-vl", "qwen2_5_vl": "qwen2.5-vl", "smolvlm": "smolvlm"}
ORION = {"orion_qwen2_vl": "qwen2_vl", "orion_qwen2_5_vl": "qwen2_5_vl"}
QUESTIONS = ["Plan a careful route through the junction ahead.", "Go."]


@functools.cache
def tiny_model_and_processor(name: str) -> tuple[torch.nn.Module, object]:
    """A tiny random model (eval mode) and its processor, which pads on the left as generation wants."""
    if name in ORION:
        family = FAMILIES[ORION[name]]
        processor = make_processor(family)
        model = real_vocab_model(family, processor)
    else:
        model = tiny_backbone(PLAIN[name]).eval()
        processor = copy.deepcopy(tiny_processor(PLAIN[name]))
    processor.tokenizer.padding_side = "left"
    return model, processor


@functools.cache
def tiny_export(name: str, dtype: str = "float32") -> Path:
    """The ONNX export (vision graph at 56 x 56 included) of `tiny_model_and_processor(name)`."""
    model, processor = tiny_model_and_processor(name)
    out_dir = Path(tempfile.mkdtemp(prefix=f"onnx_{name}_{dtype}_"))
    atexit.register(shutil.rmtree, out_dir, ignore_errors=True)
    export_onnx(model, processor, out_dir, image_size=TINY_IMAGE_SIZE, dtype=dtype)
    return out_dir


def prompt_batch(name: str, images: bool = True, questions: list[str] = QUESTIONS) -> dict[str, torch.Tensor]:
    """Processor outputs (PyTorch tensors) of prompts of different lengths, left-padded, one image each."""
    _, processor = tiny_model_and_processor(name)
    if name not in ORION:
        return family_batch(
            PLAIN[name], questions, seeds=list(range(len(questions))) if images else None, processor=processor
        )
    prompts = [driving_prompt(processor, question, image=images) for question in questions]
    return dict(
        processor(
            images=[camera_image(seed) for seed in range(len(questions))] if images else None,
            text=prompts,
            padding=True,
            return_tensors="pt",
            **driving_features(len(questions)),
        )
    )


def to_numpy(batch: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: value.numpy() for name, value in batch.items()}
