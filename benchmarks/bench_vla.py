"""Our three VLA action heads and transformers' π0 side by side: same synthetic set, same steps, same batches.

Each model trains `--steps` AdamW steps on the synthetic manipulation set (`vlmheads.data.manipulation`; chunks of
`--chunk_size` actions), then predicts the held-out set: action L1 against the mean-action baseline's, and the
wall time to predict one action chunk (batch 1, median over repeats) and per chunk at batch `--batch_size`.

- `regression`, `tokens`, `flow`: `VLAForActionPrediction` on the tiny offline backbone of `--family`;
- `pi0`: `PI0ForConditionalGeneration` at its tiny offline configuration (`vlmheads.offline.tiny.pi0`: PaliGemma
  of width 64, 2 layers, Gemma action expert of width 64), its processor normalising with the same statistics and
  the state at zero (the synthetic gripper starts at the centre), sampled with `--flow_num_steps` Euler steps.

    python benchmarks/bench_vla.py                    # the BENCHMARKS.md configuration (CPU)
    python benchmarks/bench_vla.py --device cuda --steps 1000
"""

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import HfArgumentParser

from vlmheads.data.manipulation import synthetic_manipulation_dataset
from vlmheads.modeling.modeling_vla import VLAForActionPrediction
from vlmheads.processing.collator_vla import VLADataCollator
from vlmheads.registry.vlms import create_vlm, load_processor
from vlmheads.training.vla import (
    action_errors,
    make_room_for_action_bins,
    mean_action_baseline,
    normalization_statistics,
    predict_dataset_actions,
)

HEADS = ("regression", "tokens", "flow")


@dataclass
class BenchmarkArguments:
    family: str = field(default="paligemma", metadata={"help": "Backbone family of our heads (tiny offline)."})
    steps: int = field(default=300, metadata={"help": "Training steps of every model."})
    batch_size: int = field(default=16)
    learning_rate: float = field(default=1e-3)
    num_train_samples: int = field(default=1024)
    num_eval_samples: int = field(default=128)
    chunk_size: int = field(default=4, metadata={"help": "Actions per chunk (the tiny π0's chunk size)."})
    flow_num_steps: int = field(default=10, metadata={"help": "Euler steps of our flow head and of π0."})
    timing_repeats: int = field(default=20)
    device: str = field(default="cpu")
    seed: int = field(default=0)
    models: list[str] = field(default_factory=lambda: [*HEADS, "pi0"])


def train(model: torch.nn.Module, loss_of: Callable[[dict], torch.Tensor], batches: dict, args) -> float:
    """`args.steps` AdamW steps on random batches of the pre-collated training tensors; returns seconds per step."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.learning_rate, total_steps=args.steps)
    generator = torch.Generator().manual_seed(args.seed)
    size = next(iter(batches.values())).shape[0]
    start = time.perf_counter()
    for _ in range(args.steps):
        index = torch.randint(0, size, (args.batch_size,), generator=generator)
        loss = loss_of({name: value[index].to(args.device) for name, value in batches.items()})
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
    synchronize(args.device)
    return (time.perf_counter() - start) / args.steps


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def chunk_times(predict: Callable[[int], object], args) -> tuple[float, float]:
    """Milliseconds per action chunk: median of batch-1 calls, and of batch-`batch_size` calls per sample."""
    times = {}
    for batch_size in (1, args.batch_size):
        predict(batch_size)
        runs = []
        for _ in range(args.timing_repeats):
            synchronize(args.device)
            start = time.perf_counter()
            predict(batch_size)
            synchronize(args.device)
            runs.append(time.perf_counter() - start)
        times[batch_size] = statistics.median(runs) * 1000 / batch_size
    return times[1], times[args.batch_size]


def our_head(action_head: str, train_set, eval_records, statistics_, args) -> dict[str, float]:
    processor = load_processor(args.family, tiny=True)
    backbone = create_vlm(args.family, tiny=True, seed=args.seed)
    if action_head == "tokens":
        make_room_for_action_bins(backbone, processor.tokenizer)
    torch.manual_seed(args.seed)
    model = VLAForActionPrediction.from_backbone(
        backbone,
        action_head=action_head,
        action_dim=2,
        chunk_size=args.chunk_size,
        flow_num_steps=args.flow_num_steps,
        **statistics_,
    ).to(args.device)
    collator = VLADataCollator.for_model(processor, model.config)
    seconds = train(model, lambda batch: model(**batch).loss, collator(list(train_set)), args)
    predicted = predict_dataset_actions(model, collator, eval_records, args.batch_size)
    prompt_only = VLADataCollator.for_model(processor, model.config, with_actions=False)

    def predict(batch_size: int) -> None:
        batch = {name: value.to(args.device) for name, value in prompt_only(eval_records[:batch_size]).items()}
        model.predict_actions(**batch)

    return {"predicted": predicted, "step_seconds": seconds, "times": chunk_times(predict, args)}


def pi0(train_set, eval_records, statistics_, args) -> dict[str, float]:
    processor = load_processor("pi0", tiny=True)
    if processor.chunk_size != args.chunk_size:
        raise ValueError(
            f"The tiny π0 predicts chunks of {processor.chunk_size}: pass --chunk_size {processor.chunk_size}."
        )
    processor.actions_mean, processor.actions_std = statistics_["action_mean"], statistics_["action_std"]
    processor.state_mean, processor.state_std = [0.0, 0.0], [1.0, 1.0]
    model = create_vlm("pi0", tiny=True, seed=args.seed, num_inference_steps=args.flow_num_steps).to(args.device)

    def inputs(records, with_actions: bool) -> dict[str, torch.Tensor]:
        actions = np.stack([np.asarray(record["actions"], dtype=np.float32) for record in records])
        batch = processor(
            images=[list(record["images"]) for record in records],
            text=[record["instruction"] for record in records],
            state=np.zeros((len(records), 2), dtype=np.float32),
            actions=actions if with_actions else None,
        )
        return dict(batch)

    seconds = train(model, lambda batch: model(**batch).loss, inputs(list(train_set), True), args)
    model.eval()
    mean, std = torch.tensor(statistics_["action_mean"]), torch.tensor(statistics_["action_std"])

    def sample(records) -> np.ndarray:
        batch = {name: value.to(args.device) for name, value in inputs(records, False).items()}
        with torch.no_grad():
            normalized = model.sample_actions(**batch)[..., :2].float().cpu()
        return (normalized * std + mean).numpy()

    torch.manual_seed(args.seed)
    predicted = np.concatenate(
        [
            sample(eval_records[start : start + args.batch_size])
            for start in range(0, len(eval_records), args.batch_size)
        ]
    )
    return {
        "predicted": predicted,
        "step_seconds": seconds,
        "times": chunk_times(lambda batch_size: sample(eval_records[:batch_size]), args),
    }


def main() -> None:
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses()
    torch.manual_seed(args.seed)
    settings = {"chunk_size": args.chunk_size, "image_size": 56}
    train_set = synthetic_manipulation_dataset(args.num_train_samples, seed=args.seed, **settings)
    eval_records = list(synthetic_manipulation_dataset(args.num_eval_samples, seed=args.seed + 1, **settings))
    train_actions = np.stack(train_set.with_format("numpy")["actions"])
    targets = np.stack([np.asarray(record["actions"]) for record in eval_records])
    statistics_ = normalization_statistics(train_actions)
    baseline = action_errors(mean_action_baseline(train_actions, len(eval_records)), targets)["action_l1"]

    rows = {}
    for name in args.models:
        if name == "pi0":
            result = pi0(train_set, eval_records, statistics_, args)
        else:
            result = our_head(name, train_set, eval_records, statistics_, args)
        result["l1"] = action_errors(result["predicted"], targets)["action_l1"]
        rows[name] = result
        print(f"{name}: held-out L1 {result['l1']:.4f} (baseline {baseline:.4f})", flush=True)

    print(
        f"\n{args.steps} steps of batch {args.batch_size}, chunks of {args.chunk_size} x 2 actions, "
        f"{args.num_eval_samples} held-out samples, {args.device}, {torch.get_num_threads()} threads\n"
    )
    print(
        "| model | held-out action L1 | vs mean-action baseline | train step (ms) | ms / chunk, batch 1 | "
        f"ms / chunk, batch {args.batch_size} |"
    )
    print("|---|---|---|---|---|---|")
    print(f"| mean-action baseline | {baseline:.4f} | 1.00 | | | |")
    for name, result in rows.items():
        label = "π0 (`PI0ForConditionalGeneration`, tiny)" if name == "pi0" else f"`{name}` head on {args.family}"
        single, batched = result["times"]
        print(
            f"| {label} | {result['l1']:.4f} | {result['l1'] / baseline:.2f} | {result['step_seconds'] * 1000:.0f} | "
            f"{single:.1f} | {batched:.2f} |"
        )


if __name__ == "__main__":
    main()
