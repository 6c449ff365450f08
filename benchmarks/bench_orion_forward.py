"""Forward cost of OrionQwenForTrajectory against the plain Qwen2VLForConditionalGeneration it extends.

Both models share the backbone weights and run the same sequence length; the Orion model's sequence holds the
scene and history placeholders, one CAN-bus token and the `<ego_wp>` token, and it also projects the features and
runs the trajectory decoder. Timings alternate between the two models in one process so machine noise hits both.
Peak memory is the high-water mark of the tensors allocated during one forward (torch profiler, CPU), weights
excluded.

    python benchmarks/bench_orion_forward.py                       # the BENCHMARKS.md configuration
    python benchmarks/bench_orion_forward.py --device cuda --dtype bfloat16 --hidden_size 3584 --num_layers 28
"""

import statistics
import time
from dataclasses import dataclass, field

import torch
from measure import peak_memory
from transformers import HfArgumentParser, Qwen2VLConfig, Qwen2VLForConditionalGeneration

from vlmheads import OrionQwenConfig, OrionQwenForTrajectory

SCENE, HISTORY, CAN_BUS, EGO = 32000, 32001, 32002, 32003


@dataclass
class BenchmarkArguments:
    hidden_size: int = field(default=256)
    num_layers: int = field(default=4)
    num_scene_queries: int = field(default=256)
    num_history_queries: int = field(default=256)
    num_text_tokens: int = field(
        default=64, metadata={"help": "Text tokens, the CAN-bus and <ego_wp> tokens included."}
    )
    vocab_size: int = field(default=32004)
    batch_size: int = field(default=1)
    repeats: int = field(default=30)
    warmup: int = field(default=3)
    device: str = field(default="cpu")
    dtype: str = field(default="float32")
    seed: int = field(default=0)


def build_models(args: BenchmarkArguments) -> tuple[torch.nn.Module, torch.nn.Module]:
    head_dim = 64
    backbone = {
        "text_config": {
            "vocab_size": args.vocab_size,
            "hidden_size": args.hidden_size,
            "intermediate_size": 4 * args.hidden_size,
            "num_hidden_layers": args.num_layers,
            "num_attention_heads": args.hidden_size // head_dim,
            "num_key_value_heads": max(1, args.hidden_size // head_dim // 4),
            "rope_parameters": {"rope_type": "default", "mrope_section": [16, 8, 8]},
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 2,
        },
        "vision_config": {"depth": 1, "embed_dim": 64, "hidden_size": args.hidden_size, "num_heads": 4},
        "vision_start_token_id": 3,
        "vision_end_token_id": 4,
        "image_token_id": 5,
        "video_token_id": 6,
    }
    torch.manual_seed(args.seed)
    orion = OrionQwenForTrajectory(
        OrionQwenConfig(
            **backbone,
            num_scene_queries=args.num_scene_queries,
            num_history_queries=args.num_history_queries,
            scene_token_id=SCENE,
            history_token_id=HISTORY,
            can_bus_token_id=CAN_BUS,
            ego_token_id=EGO,
        )
    )
    plain = Qwen2VLForConditionalGeneration(Qwen2VLConfig(**backbone))
    plain.load_state_dict(orion.state_dict(), strict=False)
    dtype = getattr(torch, args.dtype)
    return plain.to(args.device, dtype).eval(), orion.to(args.device, dtype).eval()


def build_inputs(args: BenchmarkArguments) -> tuple[dict, dict]:
    generator = torch.Generator().manual_seed(args.seed)
    batch, text = args.batch_size, args.num_text_tokens - 2

    def fill(token_id: int, count: int) -> torch.Tensor:
        return torch.full((batch, count), token_id)

    words = torch.randint(10, 30000, (batch, text), generator=generator)
    orion_ids = torch.cat(
        [
            words[:, : text // 2],
            fill(SCENE, args.num_scene_queries),
            fill(HISTORY, args.num_history_queries),
            fill(CAN_BUS, 1),
            words[:, text // 2 :],
            fill(EGO, 1),
        ],
        dim=1,
    )
    plain_ids = torch.randint(10, 30000, orion_ids.shape, generator=generator)
    features = {
        "scene_queries": torch.randn(batch, args.num_scene_queries, 256, generator=generator),
        "history_queries": torch.randn(batch, args.num_history_queries, 256, generator=generator),
        "can_bus": torch.randn(batch, 89, generator=generator),
    }
    dtype = getattr(torch, args.dtype)
    features = {name: value.to(args.device, dtype) for name, value in features.items()}
    plain_inputs = {"input_ids": plain_ids.to(args.device), "use_cache": False}
    orion_inputs = {"input_ids": orion_ids.to(args.device), "use_cache": False, **features}
    return plain_inputs, orion_inputs


def timed_forward(model: torch.nn.Module, inputs: dict, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    model(**inputs)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses()
    plain, orion = build_models(args)
    plain_inputs, orion_inputs = build_inputs(args)
    times = {"plain": [], "orion": []}
    with torch.inference_mode():
        for _ in range(args.warmup):
            plain(**plain_inputs)
            orion(**orion_inputs)
        for repeat in range(args.repeats):
            order = [("plain", plain, plain_inputs), ("orion", orion, orion_inputs)]
            for name, model, inputs in order if repeat % 2 == 0 else order[::-1]:
                times[name].append(timed_forward(model, inputs, args.device))
        memory = {
            "plain": peak_memory(lambda: plain(**plain_inputs), args.device),
            "orion": peak_memory(lambda: orion(**orion_inputs), args.device),
        }

    length = orion_inputs["input_ids"].shape[1]
    print(
        f"hidden {args.hidden_size}, {args.num_layers} layers, vocab {args.vocab_size}, batch {args.batch_size}, "
        f"{length} tokens ({args.num_scene_queries} scene + {args.num_history_queries} history + "
        f"{args.num_text_tokens} text), {args.device} {args.dtype}, median of {args.repeats}"
    )
    print("| model | forward ms (median) | forward ms (min) | peak forward memory MiB |")
    print("|---|---|---|---|")
    for name, label in (("plain", "Qwen2VLForConditionalGeneration"), ("orion", "OrionQwenForTrajectory")):
        print(
            f"| {label} | {1000 * statistics.median(times[name]):.2f} | {1000 * min(times[name]):.2f} "
            f"| {memory[name] / 2**20:.1f} |"
        )
    time_ratio = statistics.median(times["orion"]) / statistics.median(times["plain"])
    # Each repeat times both models back to back, so a pair shares the machine's state at that moment.
    paired = statistics.median(orion / plain for orion, plain in zip(times["orion"], times["plain"], strict=True))
    print(f"time ratio (Orion / plain, medians): {time_ratio:.3f}")
    print(f"time ratio (median of the {args.repeats} back-to-back pairs): {paired:.3f}")
    print(f"peak memory ratio (Orion / plain): {memory['orion'] / memory['plain']:.3f}")


if __name__ == "__main__":
    main()
