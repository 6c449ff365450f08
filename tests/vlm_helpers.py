"""Shared helpers of the family suite: the families under test, their tiny models and processors, prompts, images."""

import copy
import functools
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlmheads.modeling.families import VLM_FAMILIES
from vlmheads.processing.processing_driving_placeholders import DrivingPlaceholders
from vlmheads.registry.vlms import create_vlm, load_processor, tiny_vlm_config

TINY_DIR = Path(__file__).resolve().parents[1] / "offline" / "tiny"
# π0 is an action model (no language-model head, no text generation, a state input): the VLA suite tests it.
ACTION_MODELS = {"pi0"}


def _module_name(family_name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", family_name)


# Every registered family that has a tiny offline module: adding a module adds the family to the suite.
FAMILY_NAMES = sorted(
    name for name in VLM_FAMILIES if name not in ACTION_MODELS and (TINY_DIR / f"{_module_name(name)}.py").is_file()
)
IMAGE_SIZE = 64
NUM_SCENE_QUERIES = 3
NUM_HISTORY_QUERIES = 2
DRIVING_SIZES = {"scene_query_dim": 8, "history_query_dim": 6, "can_bus_dim": 5, "num_waypoints": 3}


def driving_features(seed: int) -> dict[str, torch.Tensor]:
    """One driving sample's tensors for the tiny trajectory heads: scene (3, 8), history (2, 6), CAN bus (5,)."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "scene_queries": torch.randn(NUM_SCENE_QUERIES, DRIVING_SIZES["scene_query_dim"], generator=generator),
        "history_queries": torch.randn(NUM_HISTORY_QUERIES, DRIVING_SIZES["history_query_dim"], generator=generator),
        "can_bus": torch.randn(DRIVING_SIZES["can_bus_dim"], generator=generator),
    }


def _randomised(model: torch.nn.Module) -> torch.nn.Module:
    # Some families initialise a weight to zero (Gemma 3's image projection), which would make every image the same.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim > 1 and not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return model


@functools.cache
def _tiny_backbone(name: str) -> torch.nn.Module:
    return _randomised(create_vlm(name, tiny=True))


def tiny_backbone(name: str) -> torch.nn.Module:
    """A fresh copy of the family's tiny random model (built once per session)."""
    return copy.deepcopy(_tiny_backbone(name))


@functools.cache
def tiny_processor(name: str):
    """The family's tiny processor, built once per session; tests must not change it."""
    return load_processor(name, tiny=True)


@functools.cache
def driving_processor(name: str) -> DrivingPlaceholders:
    """A tiny processor of the family with the driving placeholders added (to its own copy of the tokenizer)."""
    return DrivingPlaceholders(copy.deepcopy(tiny_processor(name)), NUM_SCENE_QUERIES, NUM_HISTORY_QUERIES)


def tiny_image(seed: int, size: int = IMAGE_SIZE, channels: int = 3) -> Image.Image:
    """A random RGB (or greyscale, `channels=1`) image, `size` pixels square."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels)


def prompt(processor, text: str, image: bool = True) -> str:
    """A user turn with `text` (and one image): the processor's chat template where it has one; PaliGemma and
    Florence-2 processors place the image tokens themselves."""
    if getattr(processor, "chat_template", None) is None:
        return text
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def family_batch(name: str, texts: list[str], seeds: list[int] | None = None, processor=None) -> dict:
    """Processor outputs for prompts, each with one tiny image (`seeds`; None: text only)."""
    processor = processor or tiny_processor(name)
    inner = getattr(processor, "processor", processor)
    prompts = [prompt(inner, text, image=seeds is not None) for text in texts]
    images = None if seeds is None else [[tiny_image(seed)] for seed in seeds]
    kwargs = {"padding": True, "return_tensors": "pt"}
    batch = dict(processor(text=prompts, images=images, **kwargs))
    # PaliGemma's processor adds next-token labels; the heads take class labels.
    batch.pop("labels", None)
    return batch


def driving_batch(name: str, batch_size: int = 2, images: bool = True, seed: int = 0) -> dict:
    """A driving batch for `VLMForTrajectory`: prompts with the placeholders and images, features, waypoints."""
    generator = torch.Generator().manual_seed(seed)
    placeholders = driving_processor(name)
    inner = placeholders.processor
    text = "Drive. <scene> <history> <can_bus> Plan: <ego_wp>"
    prompts = [prompt(inner, text, image=images) for _ in range(batch_size)]
    batch = dict(
        placeholders(
            text=prompts,
            images=[[tiny_image(seed + index)] for index in range(batch_size)] if images else None,
            scene_queries=torch.randn(batch_size, NUM_SCENE_QUERIES, 8, generator=generator),
            history_queries=torch.randn(batch_size, NUM_HISTORY_QUERIES, 6, generator=generator),
            can_bus=torch.randn(batch_size, 5, generator=generator),
            padding=True,
        )
    )
    batch.pop("labels", None)
    batch["ego_waypoints"] = torch.randn(batch_size, 3, 2, generator=generator).cumsum(1)
    return batch


@functools.cache
def _trajectory_backbone(name: str) -> torch.nn.Module:
    processor = driving_processor(name).processor
    config = tiny_vlm_config(name, processor=processor)
    # Mllama's language-model vocabulary ends before its image token: widen it to the added placeholders.
    text_config = config.get_text_config()
    text_config.vocab_size = max(text_config.vocab_size, len(processor.tokenizer))
    return _randomised(create_vlm(name, config=config))


def trajectory_backbone(name: str) -> torch.nn.Module:
    """A fresh tiny backbone whose vocabulary covers the driving placeholder tokens (built once per session)."""
    return copy.deepcopy(_trajectory_backbone(name))
