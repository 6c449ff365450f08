"""Cost of the registry and of the generic heads, per family, at each family's tiny offline configuration and at its
real widths.

1. `encode_images` + forward through `create_vlm`'s model against the same transformers model called directly (its
   image processor, then `get_image_features` or, for Mllama, the vision model and the projector; then the same
   forward). Goal: ratio ≤ 1.02.
2. Each head's forward against its bare backbone's forward on the same prompt and images:
   `VLMForImageClassification` (`pooling="multimodal"`: the backbone's hidden states + the head, no vocabulary
   projection; `pooling="vision"`: the image features only) and `VLMForTrajectory` (driving features spliced at
   placeholders, the `"mlp"` head) against `backbone(**inputs)`. Goal: ratio ≤ 1.05.
All variants alternate every repeat in one process; times are medians, and each ratio is given twice: the ratio of
the medians, and the median of the per-repeat ratios (the two runs of a repeat share the machine's state).

`--widths real` builds each family at the widths of its checkpoint's public config (`offline/public_configs/`: text
and vision hidden, intermediate, attention heads, head and projector sizes, text rope parameters) with the tiny
configuration's depth (2 decoder layers, 2 vision blocks), vocabulary and image geometry, so the tiny processor
still fits; random weights. `--widths both` runs the tiny and the real configuration of each family one after the
other in the same process.

    python benchmarks/bench_vlm_heads.py                  # the BENCHMARKS.md figures (CPU)
    python benchmarks/bench_vlm_heads.py --families llava qwen2-vl --repeats 50
    python benchmarks/bench_vlm_heads.py --widths both --repeats 10
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
from transformers import HfArgumentParser, PretrainedConfig

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
from vlmheads.offline.configs import public_config
from vlmheads.registry.vlms import resolve_vlm

TINY_DIR = Path(__file__).resolve().parents[1] / "offline" / "tiny"
# π0 is an action model without a text forward to compare against.
ACTION_MODELS = {"pi0"}
WIDTHS = ("tiny", "real", "both")
# Width attributes copied from the public config onto the tiny one's (sub-)configurations, where both have them.
WIDTH_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "embed_dim",
    "num_heads",
    "mlp_ratio",
    "out_hidden_size",
    "attention_heads",
    "projection_dim",
    "d_model",
    "encoder_ffn_dim",
    "decoder_ffn_dim",
    "encoder_attention_heads",
    "decoder_attention_heads",
)


@dataclass
class BenchmarkArguments:
    families: list[str] = field(default_factory=list, metadata={"help": "Default: every family with a tiny module."})
    repeats: int = field(default=30)
    warmup: int = field(default=3)
    batch_size: int = field(default=2)
    threads: int = field(default=0, metadata={"help": "torch threads; 0 keeps torch's default."})
    widths: str = field(
        default="tiny", metadata={"help": "tiny (hidden 64), real (the public config's widths, tiny depth) or both."}
    )

    def __post_init__(self) -> None:
        if self.widths not in WIDTHS:
            raise ValueError(f"--widths must be one of {WIDTHS}, got {self.widths!r}.")


def tiny_families() -> list[str]:
    return sorted(
        name
        for name in VLM_FAMILIES
        if name not in ACTION_MODELS and (TINY_DIR / f"{re.sub(r'[^a-z0-9]+', '_', name)}.py").is_file()
    )


def _copy_widths(target: PretrainedConfig, source: PretrainedConfig) -> None:
    for key in WIDTH_KEYS:
        value, current = getattr(source, key, None), getattr(target, key, None)
        if value is None or current is None:
            continue
        if isinstance(current, list) and len(current) != len(value):
            raise ValueError(f"{key}: the tiny config has {len(current)} stages, the public one {len(value)}.")
        setattr(target, key, value)


def real_width_config(name: str, tiny: PretrainedConfig) -> PretrainedConfig:
    """`tiny` with the widths of `name`'s checkpoint's public config; depth, vocabulary and image geometry stay."""
    _, checkpoint = resolve_vlm(name)
    real = tiny.__class__.from_dict(public_config(checkpoint))
    config = tiny.__class__.from_dict(tiny.to_dict())
    _copy_widths(config, real)
    text, real_text = config.get_text_config(), real.get_text_config()
    if text is not config:
        _copy_widths(text, real_text)
    if getattr(real_text, "rope_parameters", None) is not None:
        text.rope_parameters = real_text.rope_parameters
    vision = getattr(config, "vision_config", None)
    if vision is not None:
        _copy_widths(vision, real.vision_config)
        if getattr(vision, "intermediate_layers_indices", None) is not None:
            # Mllama's vision output stacks the last layer and the chosen intermediate ones.
            vision.vision_output_dim = vision.hidden_size * (len(vision.intermediate_layers_indices) + 1)
    return config.__class__.from_dict(config.to_dict())


def family_config(name: str, processor, width: str) -> PretrainedConfig:
    """The tiny configuration matching `processor`, at the tiny or the real widths."""
    tiny = tiny_vlm_config(name, processor=processor)
    return tiny if width == "tiny" else real_width_config(name, tiny)


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


def timings(runs: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds of each run per repeat; the runs alternate in order every repeat, so repeat i of each shares the
    machine's state at that moment."""
    times = {name: [] for name in runs}
    for repeat in range(warmup + repeats):
        order = list(runs) if repeat % 2 == 0 else list(reversed(runs))
        for name in order:
            start = time.perf_counter()
            runs[name]()
            if repeat >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def median_ms(times: list[float]) -> float:
    return 1000 * statistics.median(times)


def ratios(numerator: list[float], denominator: list[float]) -> str:
    """`numerator / denominator` as the ratio of the medians and as the median of the per-repeat ratios."""
    of_medians = statistics.median(numerator) / statistics.median(denominator)
    of_pairs = statistics.median(n / d for n, d in zip(numerator, denominator, strict=True))
    return f"{of_medians:.3f} · {of_pairs:.3f}"


def bench_family(name: str, args: BenchmarkArguments, width: str) -> dict[str, float | str]:
    processor = load_processor(name, tiny=True)
    model = create_vlm(name, config=family_config(name, processor, width))
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
    config = family_config(name, placeholders.processor, width)
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
        registry = timings(
            {
                "registry": lambda: (encode_images(model, processor, pictures), model(**batch)),
                "direct": lambda: (direct_image_features(model, processor, pictures), model(**batch)),
            },
            args.repeats,
            args.warmup,
        )
        heads = timings(
            {
                "backbone": lambda: model(**batch),
                "classification_multimodal": lambda: multimodal(**batch),
                "classification_vision": lambda: vision(**batch),
            },
            args.repeats,
            args.warmup,
        )
        driving_times = timings(
            {"backbone": lambda: driving_backbone(**plain_driving), "trajectory": lambda: trajectory(**driving)},
            args.repeats,
            args.warmup,
        )
    return {
        "text hidden": model.config.get_text_config().hidden_size,
        "registry ms": median_ms(registry["registry"]),
        "direct ms": median_ms(registry["direct"]),
        "registry ratio": ratios(registry["registry"], registry["direct"]),
        "backbone ms": median_ms(heads["backbone"]),
        "classifier ms": median_ms(heads["classification_multimodal"]),
        "classifier ratio": ratios(heads["classification_multimodal"], heads["backbone"]),
        "vision classifier ms": median_ms(heads["classification_vision"]),
        "driving backbone ms": median_ms(driving_times["backbone"]),
        "trajectory ms": median_ms(driving_times["trajectory"]),
        "trajectory ratio": ratios(driving_times["trajectory"], driving_times["backbone"]),
    }


def main() -> None:
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        "| family | widths (text hidden) | encode + forward: registry / direct ms | ratio (medians · pairs) "
        "| backbone ms | classifier (multimodal) ms | ratio (medians · pairs) "
        "| classifier (vision) ms | driving backbone ms | trajectory ms | ratio (medians · pairs) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    widths = ("tiny", "real") if args.widths == "both" else (args.widths,)
    for name, width in ((name, width) for name in args.families or tiny_families() for width in widths):
        t = bench_family(name, args, width)
        print(
            f"| {name} | {width} ({t['text hidden']}) | {t['registry ms']:.2f} / {t['direct ms']:.2f} "
            f"| {t['registry ratio']} | {t['backbone ms']:.2f} | {t['classifier ms']:.2f} | {t['classifier ratio']} "
            f"| {t['vision classifier ms']:.2f} | {t['driving backbone ms']:.2f} | {t['trajectory ms']:.2f} "
            f"| {t['trajectory ratio']} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
