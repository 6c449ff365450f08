"""Tiny Orion models, processors and driving batches shared by the tests."""

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import (
    PretrainedConfig,
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from vlmheads.offline import ORION_BACKBONES, tiny_orion_model, tiny_orion_processor

NUM_SCENE, NUM_HISTORY = 4, 3
# Placeholder ids inside the 99-token vocabulary of the small random-id models.
SMALL_VOCAB = 99
SMALL_IDS = {"scene_token_id": 90, "history_token_id": 91, "can_bus_token_id": 92, "ego_token_id": 93}


@dataclass(frozen=True)
class Family:
    name: str
    config: type[PretrainedConfig]
    model: type[PreTrainedModel]
    processor: type
    plain_config: type[PretrainedConfig]
    plain_model: type[PreTrainedModel]
    tiny_kwargs: Any


PLAIN = {
    "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
    "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration),
}
FAMILIES = {
    name: Family(name, classes.config, classes.model, classes.processor, *PLAIN[name], classes.tiny_kwargs)
    for name, classes in ORION_BACKBONES.items()
}


def small_config(family: Family, **overrides) -> PretrainedConfig:
    """A tiny config over a 99-token vocabulary, with placeholders at ids 90-93."""
    settings = {"num_scene_queries": NUM_SCENE, "num_history_queries": NUM_HISTORY, **SMALL_IDS, **overrides}
    return family.config(**family.tiny_kwargs(SMALL_VOCAB), **settings)


def small_model(family: Family, seed: int = 0, **overrides) -> PreTrainedModel:
    torch.manual_seed(seed)
    return family.model(small_config(family, **overrides)).eval()


def driving_batch(
    config: PretrainedConfig, batch_size: int = 2, text_len: int = 6, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Token ids `text <scene>*Ns <history>*Nh <can_bus> text <ego_wp>` and matching driving features."""
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(10, 80, (batch_size, text_len), generator=generator)
    half = text_len // 2

    def fill(token_id: int, count: int) -> torch.Tensor:
        return torch.full((batch_size, count), token_id)

    input_ids = torch.cat(
        [
            text[:, :half],
            fill(config.scene_token_id, config.num_scene_queries),
            fill(config.history_token_id, config.num_history_queries),
            fill(config.can_bus_token_id, 1),
            text[:, half:],
            fill(config.ego_token_id, 1),
        ],
        dim=1,
    )
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "scene_queries": torch.randn(
            batch_size, config.num_scene_queries, config.scene_query_dim, generator=generator
        ),
        "history_queries": torch.randn(
            batch_size, config.num_history_queries, config.history_query_dim, generator=generator
        ),
        "can_bus": torch.randn(batch_size, config.can_bus_dim, generator=generator),
    }


def make_processor(family: Family, **kwargs) -> Any:
    """An Orion processor over the real (offline) Qwen2-VL tokenizer and small images."""
    return tiny_orion_processor(
        family.name, **{"num_scene_queries": NUM_SCENE, "num_history_queries": NUM_HISTORY, **kwargs}
    )


def real_vocab_model(family: Family, processor: Any, seed: int = 0, **overrides) -> PreTrainedModel:
    """A tiny model over the processor's full Qwen2-VL vocabulary."""
    return tiny_orion_model(processor, family.name, seed=seed, **overrides)


def driving_prompt(processor: Any, question: str = "Plan the ego trajectory.", image: bool = True) -> str:
    content = [{"type": "image"}] if image else []
    content += [
        {"type": "scene"},
        {"type": "history"},
        {"type": "can_bus"},
        {"type": "text", "text": question},
        {"type": "ego"},
    ]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def camera_image(seed: int, width: int = 56, height: int = 56) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def driving_features(batch_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "scene_queries": torch.randn(batch_size, NUM_SCENE, 256, generator=generator),
        "history_queries": torch.randn(batch_size, NUM_HISTORY, 256, generator=generator),
        "can_bus": torch.randn(batch_size, 89, generator=generator),
    }
