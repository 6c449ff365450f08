"""Cost of the registry and of the generic heads, per family, at each family's tiny offline configuration.

1. `encode_images` + forward through `create_vlm`'s model against the same transformers model called directly (its
   image processor, then `get_image_features` or, for Mllama, the vision model and the projector; then the same
   forward). Goal: ratio ≤ 1.02.
2. Each head's forward against its bare backbone's forward on the same prompt and images:
   `VLMForImageClassification` (`pooling="multimodal"`: the backbone's hidden states + the head, no vocabulary
   projection; `pooling="vision"`: the image features only) and `VLMForTrajectory` (driving features spliced at
   placeholders, the `"mlp"` head) against `backbone(**inputs)`. Goal: ratio ≤ 1.05.
All variants alternate every repeat in one process; figures are medians.

    python benchmarks/bench_vlm_heads.py                  # the BENCHMARKS.md figures (CPU)
    python benchmarks/bench_vlm_heads.py --families llava qwen2-vl --repeats 50
"""

import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import HfArgumentParser

from vlmheads import (
    DrivingPlaceholders,
    VLMForImageClassification,
    VLMForTrajectory,
    create_vlm,
    encode_images,
    load_processor,
    tiny_vlm_config,
)
from vlmheads.modeling.families import VLM_FAMILIES, family_of, get_module

TINY_DIR = Path(__file__).resolve().parents[1] / "offline" / "tiny"
# π0 is an action model without a text forward to compare against.
ACTION_MODELS = {"pi0"}


@dataclass
class BenchmarkArguments:
    families: list[str] = field(default_factory=list, metadata={"help": "Default: every family with a tiny module."})
    repeats: int = field(default=30)
    warmup: int = field(default=3)
    batch_size: int = field(default=2)
    threads: int = field(default=0, metadata={"help": "torch threads; 0 keeps torch's default."})


def tiny_families() -> list[str]:
    return sorted(
        name
        for name in VLM_FAMILIES
        if name not in ACTION_MODELS and (TINY_DIR / f"{re.sub(r'[^a-z0-9]+', '_', name)}.py").is_file()
    )


def images(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(count)]


def prompt(processor, text: str) -> str:
    if getattr(processor, "chat_template", None) is None:
        return text
    content = [{"type": "image"}, {"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def direct_image_features(model, processor, pictures: list[Image.Image]) -> torch.Tensor:
    """What a user of the transformers class writes without vlmheads."""
    family = family_of(model.config)
    outputs = processor.image_processor(images=[[picture] for picture in pictures], return_tensors="pt")
    inputs = {name: outputs[name] for name in family.image_inputs}
    if not hasattr(model.model, "get_image_features"):
        states = get_module(model, family.vision_tower)(**inputs).last_hidden_state
        return get_module(model, family.projector)(states)
    return model.model.get_image_features(**inputs).pooler_output


def median_ms(runs: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, float]:
    times = {name: [] for name in runs}
    for repeat in range(warmup + repeats):
        order = list(runs) if repeat % 2 == 0 else list(reversed(runs))
        for name in order:
            start = time.perf_counter()
            runs[name]()
            if repeat >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(values) for name, values in times.items()}


def bench_family(name: str, args: BenchmarkArguments) -> dict[str, float]:
    processor = load_processor(name, tiny=True)
    model = create_vlm(name, tiny=True)
    pictures = images(args.batch_size)
    batch = dict(
        processor(
            text=[prompt(processor, "What is shown?")] * args.batch_size,
            images=[[picture] for picture in pictures],
            padding=True,
            return_tensors="pt",
        )
    )
    batch.pop("labels", None)
    placeholders = DrivingPlaceholders(load_processor(name, tiny=True), num_scene_queries=4, num_history_queries=4)
    config = tiny_vlm_config(name, processor=placeholders.processor)
    text_config = config.get_text_config()
    text_config.vocab_size = max(text_config.vocab_size, len(placeholders.processor.tokenizer))
    driving_backbone = create_vlm(name, config=config)
    trajectory = VLMForTrajectory.from_backbone(
        driving_backbone, scene_query_dim=16, history_query_dim=16, can_bus_dim=8, **placeholders.model_config_kwargs()
    ).eval()
    driving_prompt = prompt(placeholders.processor, "<scene><history><can_bus> Plan: <ego_wp>")
    driving = dict(
        placeholders(
            text=[driving_prompt] * args.batch_size,
            images=[[picture] for picture in pictures],
            scene_queries=torch.randn(args.batch_size, 4, 16),
            history_queries=torch.randn(args.batch_size, 4, 16),
            can_bus=torch.randn(args.batch_size, 8),
            padding=True,
        )
    )
    driving.pop("labels", None)
    plain_driving = {
        key: value for key, value in driving.items() if key not in ("scene_queries", "history_queries", "can_bus")
    }
    multimodal = VLMForImageClassification.from_backbone(model, num_labels=3, pooling="multimodal").eval()
    vision = VLMForImageClassification.from_backbone(model, num_labels=3, pooling="vision").eval()
    with torch.inference_mode():
        registry = median_ms(
            {
                "registry": lambda: (encode_images(model, processor, pictures), model(**batch)),
                "direct": lambda: (direct_image_features(model, processor, pictures), model(**batch)),
            },
            args.repeats,
            args.warmup,
        )
        heads = median_ms(
            {
                "backbone": lambda: model(**batch),
                "classification_multimodal": lambda: multimodal(**batch),
                "classification_vision": lambda: vision(**batch),
            },
            args.repeats,
            args.warmup,
        )
        driving_times = median_ms(
            {"backbone": lambda: driving_backbone(**plain_driving), "trajectory": lambda: trajectory(**driving)},
            args.repeats,
            args.warmup,
        )
    return {
        "encode+forward registry": registry["registry"],
        "encode+forward direct": registry["direct"],
        "backbone": heads["backbone"],
        "classification multimodal": heads["classification_multimodal"],
        "classification vision": heads["classification_vision"],
        "driving backbone": driving_times["backbone"],
        "trajectory": driving_times["trajectory"],
    }


def main() -> None:
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        "| family | encode + forward: registry / direct ms | ratio | backbone ms | classifier (multimodal) ms | ratio "
        "| classifier (vision) ms | driving backbone ms | trajectory ms | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.families or tiny_families():
        t = bench_family(name, args)
        print(
            f"| {name} | {t['encode+forward registry']:.2f} / {t['encode+forward direct']:.2f} "
            f"| {t['encode+forward registry'] / t['encode+forward direct']:.3f} | {t['backbone']:.2f} "
            f"| {t['classification multimodal']:.2f} | {t['classification multimodal'] / t['backbone']:.3f} "
            f"| {t['classification vision']:.2f} | {t['driving backbone']:.2f} | {t['trajectory']:.2f} "
            f"| {t['trajectory'] / t['driving backbone']:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
