"""The models `python -m vlmheads.serve` serves: a saved folder, or the embedded tiny Orion model."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModel, AutoProcessor

EMBEDDED_MODEL_ID = "vlmheads-tiny-orion"
EMBEDDED_SCENE_QUERIES, EMBEDDED_HISTORY_QUERIES = 8, 4


def spread_weights(model: torch.nn.Module, std: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Redraws every matrix of a random model from N(0, std²). Freshly initialised tiny models (std 0.02) answer
    every prompt with the same token; wider weights make different prompts give different answers."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim >= 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return model


def embedded_tiny_model(
    seed: int = 0, backbone: str = "qwen2_vl", processor: Any = None
) -> tuple[torch.nn.Module, Any]:
    """A tiny random Orion model (hidden 64, 2 layers, the real Qwen2-VL tokenizer; on Qwen2-VL unless `backbone`
    says "qwen2_5_vl") and its processor, with 8 scene and 4 history queries, named EMBEDDED_MODEL_ID; built in
    code, nothing downloaded. A `processor` made by an earlier call is reused (a fresh copy of the same model).
    The offline builders are imported here, so that serving a saved folder never imports them."""
    from ..offline import tiny_orion_model, tiny_orion_processor

    if processor is None:
        processor = tiny_orion_processor(
            backbone, num_scene_queries=EMBEDDED_SCENE_QUERIES, num_history_queries=EMBEDDED_HISTORY_QUERIES
        )
    model = spread_weights(tiny_orion_model(processor, backbone, seed=seed), seed=seed)
    # The id a LoRA adapter trained on this model records as its base (peft's `base_model_name_or_path`).
    model.name_or_path = model.config.name_or_path = EMBEDDED_MODEL_ID
    return model, processor


def load_model_folder(path: str, trust_remote_code: bool = False) -> tuple[torch.nn.Module, Any]:
    """A saved model folder (e.g. `outputs/orion_demo`). vlmheads' own model types load from the installed package;
    a folder whose type only its own code defines runs that code only with `trust_remote_code` (the server's
    `--trust-remote-code`), else a `ValueError` says so."""
    try:
        model = AutoModel.from_pretrained(path, trust_remote_code=trust_remote_code).eval()
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as error:
        if trust_remote_code or "trust_remote_code" not in str(error):
            raise
        raise ValueError(
            f"{path} holds a model type that vlmheads does not register: serving it runs the folder's own code. "
            "Pass --trust-remote-code if you trust that code."
        ) from error
    return model, processor
