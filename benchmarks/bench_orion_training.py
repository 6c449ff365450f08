"""What the Trainer and the collator cost, and what a training step holds in memory.

Throughput: `Trainer` + `OrionDataCollator` over driving records against a bare forward / backward / AdamW loop
over the same batches collated beforehand, on the same model, alternating in rounds so that machine noise hits
both. The bare loop clips gradients like the Trainer does. Goal: the Trainer's data path costs ≤ 5 %.

Memory: the peak of one training step (forward + backward) on the trajectory loss alone, with and without
activation checkpointing, and with the text answers' language-model loss, which needs the full-vocabulary logits.
The token embeddings are frozen for these, as in most fine-tuning; their dense gradient would dominate each peak.

    python benchmarks/bench_orion_training.py
"""

import statistics
import tempfile
import time
from dataclasses import dataclass, field

import torch
from measure import peak_memory
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments

from vlmheads.data.driving import ARRAY_FIELDS, synthetic_driving_dataset
from vlmheads.offline import orion_backbone, tiny_orion_processor
from vlmheads.processing.collator_orion_qwen import OrionDataCollator


@dataclass
class BenchmarkArguments:
    backbone: str = field(default="qwen2_vl")
    hidden_size: int = field(default=256)
    num_layers: int = field(default=4)
    num_scene_queries: int = field(default=32)
    num_history_queries: int = field(default=8)
    batch_size: int = field(default=16)
    steps: int = field(default=20, metadata={"help": "Timed steps per round, after the warm-up ones."})
    warmup_steps: int = field(default=3)
    rounds: int = field(default=5)
    seed: int = field(default=0)


class StepClock(TrainerCallback):
    """Wall-clock time of every optimizer step the Trainer ends."""

    def __init__(self):
        self.times = []

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())


def training_arguments(args: BenchmarkArguments, output_dir: str) -> TrainingArguments:
    return TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=args.batch_size,
        max_steps=args.warmup_steps + args.steps,
        learning_rate=1e-4,
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        seed=args.seed,
    )


def trainer_throughput(model, dataset, collator, training_args: TrainingArguments, args: BenchmarkArguments) -> float:
    clock = StepClock()
    Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=collator, callbacks=[clock]).train()
    elapsed = clock.times[-1] - clock.times[args.warmup_steps - 1]
    return args.steps * args.batch_size / elapsed


def bare_throughput(model, batches: list[dict], training_args: TrainingArguments, args: BenchmarkArguments) -> float:
    # The optimizer the Trainer builds from the same arguments (fused AdamW where torch has it).
    optimizer_class, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(training_args, model)
    optimizer = optimizer_class([p for p in model.parameters() if p.requires_grad], **optimizer_kwargs)
    model.train()
    for index, batch in enumerate(batches[: args.warmup_steps + args.steps]):
        if index == args.warmup_steps:
            start = time.perf_counter()
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    return args.steps * args.batch_size / (time.perf_counter() - start)


def step_memory(model, batch: dict, checkpointing: bool) -> int:
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    model.train()
    memory = peak_memory(lambda: model(**batch).loss.backward(), model.device.type)
    model.zero_grad(set_to_none=True)
    return memory


def main() -> None:
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses()
    classes = orion_backbone(args.backbone)
    processor = tiny_orion_processor(
        args.backbone, num_scene_queries=args.num_scene_queries, num_history_queries=args.num_history_queries
    )
    torch.manual_seed(args.seed)
    config = classes.config(
        **classes.tiny_kwargs(len(processor.tokenizer), args.hidden_size, args.num_layers),
        **processor.model_config_kwargs(),
    )
    model = classes.model(config).to("cuda" if torch.cuda.is_available() else "cpu")
    model.model.visual.requires_grad_(False)

    num_samples = (args.warmup_steps + args.steps) * args.batch_size
    queries = {"num_scene_queries": args.num_scene_queries, "num_history_queries": args.num_history_queries}
    dataset = synthetic_driving_dataset(num_samples, seed=args.seed, with_answers=True, **queries)
    dataset = dataset.with_format("numpy", columns=list(ARRAY_FIELDS), output_all_columns=True)
    collator = OrionDataCollator(processor, with_answers=False)
    records = [dataset[index] for index in range(num_samples)]
    batches = [
        {name: value.to(model.device) for name, value in collator(records[start : start + args.batch_size]).items()}
        for start in range(0, num_samples, args.batch_size)
    ]

    rates = {"trainer": [], "bare": []}
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = training_arguments(args, output_dir)
        for round_index in range(args.rounds + 1):
            trainer_rate = trainer_throughput(model, dataset, collator, training_args, args)
            bare_rate = bare_throughput(model, batches, training_args, args)
            if round_index:  # the first round warms both up and is not counted
                rates["trainer"].append(trainer_rate)
                rates["bare"].append(bare_rate)
    trainer_rate, bare_rate = statistics.median(rates["trainer"]), statistics.median(rates["bare"])

    # Frozen token embeddings, as in most fine-tuning: their dense gradient would otherwise dominate every peak.
    model.get_input_embeddings().requires_grad_(False)
    with_answers = OrionDataCollator(processor, with_answers=True)(records[: args.batch_size])
    with_answers = {name: value.to(model.device) for name, value in with_answers.items()}
    memory = {
        "trajectory loss": step_memory(model, batches[0], checkpointing=False),
        "trajectory loss, activation checkpointing": step_memory(model, batches[0], checkpointing=True),
        "trajectory + text loss (full-vocabulary logits)": step_memory(model, with_answers, checkpointing=False),
    }

    length = batches[0]["input_ids"].shape[1]
    print(
        f"{args.backbone}, hidden {args.hidden_size}, {args.num_layers} layers, vocabulary "
        f"{config.text_config.vocab_size}, batch {args.batch_size} x {length} tokens ({args.num_scene_queries} scene "
        f"+ {args.num_history_queries} history queries), {model.device.type} float32, median of {args.rounds} rounds "
        f"x {args.steps} steps"
    )
    print("| training loop | samples/s (median) | rounds |")
    print("|---|---|---|")
    for name, label in (
        ("trainer", "Trainer + OrionDataCollator"),
        ("bare", "bare loop, batches collated beforehand"),
    ):
        print(f"| {label} | {statistics.median(rates[name]):.1f} | {', '.join(f'{r:.1f}' for r in rates[name])} |")
    print(f"data path and Trainer cost: {100 * (1 - trainer_rate / bare_rate):.1f} % of the bare loop's throughput")
    print("| training step (forward + backward), token embeddings frozen | peak memory MiB |")
    print("|---|---|")
    for name, value in memory.items():
        print(f"| {name} | {value / 2**20:.1f} |")


if __name__ == "__main__":
    main()
