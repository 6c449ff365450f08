"""Fine-tunes an Orion driving model with the Hugging Face Trainer and reports its planning metrics.

With no data files it trains a tiny model on the synthetic driving set, offline, in a few minutes on 2 CPU cores,
then compares it with the constant-velocity baseline and the untrained model, saves it with its code and model
card, reloads it with `AutoModel.from_pretrained(..., trust_remote_code=True)` and plots a few plans:

    python examples/train_orion.py

On a real checkpoint and your own records (schema in `vlmheads.data.driving`):

    python examples/train_orion.py --base_model /models/Qwen2-VL-7B-Instruct \
        --train_files train.parquet --eval_files val.parquet --num_scene_queries 512 --num_history_queries 16 \
        --lora --freeze_vision_tower --activation_checkpointing --output_dir outputs/orion-7b

The script runs unchanged under `accelerate launch --num_processes 2 --cpu` (DDP over gloo), `torchrun`, and
`accelerate launch --config_file <an FSDP config>`.
"""

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
from accelerate.utils import DistributedType
from transformers import (
    AutoConfig,
    AutoModel,
    AutoProcessor,
    HfArgumentParser,
    PreTrainedModel,
    ProcessorMixin,
    Trainer,
    TrainingArguments,
    set_seed,
)

from vlmheads.data.driving import (
    ARRAY_FIELDS,
    constant_velocity_waypoints,
    load_driving_dataset,
    synthetic_driving_dataset,
)
from vlmheads.offline import orion_backbone, tiny_orion_model, tiny_orion_processor
from vlmheads.processing.collator_orion_qwen import OrionDataCollator
from vlmheads.training.orion import TrajectoryMetrics, add_lora, freeze_backbone

METRICS = ("L2@1s", "L2@2s", "L2@3s", "ADE", "FDE")


@dataclass
class ModelArguments:
    base_model: str = field(
        default="tiny-qwen2_vl",
        metadata={
            "help": "A Qwen2-VL / Qwen2.5-VL or Orion checkpoint (folder or Hub id), or tiny-qwen2_vl / "
            "tiny-qwen2_5_vl for a tiny random model built offline."
        },
    )
    num_scene_queries: int = field(default=16, metadata={"help": "Scene query vectors per sample."})
    num_history_queries: int = field(default=4, metadata={"help": "History query vectors per sample."})
    num_modes: int = field(default=1, metadata={"help": "Trajectory modes, one per navigation command."})
    trajectory_hidden_dims: list[int] | None = field(
        default=None, metadata={"help": "Trajectory decoder widths; the config's default is [H // 2]."}
    )
    freeze_vision_tower: bool = field(default=False, metadata={"help": "Do not train the vision tower."})
    freeze_language_model: bool = field(default=False, metadata={"help": "Do not train the language model."})
    lora: bool = field(default=False, metadata={"help": "Train LoRA adapters on the language model instead."})
    lora_r: int = field(default=16)
    lora_alpha: int = field(default=16)
    lora_dropout: float = field(default=0.05)


@dataclass
class DataArguments:
    train_files: list[str] | None = field(default=None, metadata={"help": "parquet/json(l) driving records."})
    eval_files: list[str] | None = field(default=None, metadata={"help": "parquet/json(l) driving records."})
    num_train_samples: int = field(default=2048, metadata={"help": "Synthetic training samples (no files)."})
    num_eval_samples: int = field(default=256, metadata={"help": "Synthetic evaluation samples (no files)."})
    with_answers: bool = field(
        default=False, metadata={"help": "Also train the text answers (language-model loss on the full vocabulary)."}
    )
    num_plotted_samples: int = field(default=4, metadata={"help": "Evaluation samples drawn in the plot."})


@dataclass
class OrionTrainingArguments(TrainingArguments):
    """TrainingArguments whose defaults train the tiny offline demo in under a minute on 2 CPU cores."""

    output_dir: str = field(default="outputs/orion_demo")
    learning_rate: float = field(default=2e-3)
    num_train_epochs: float = field(default=8)
    warmup_steps: float = field(default=20)
    per_device_train_batch_size: int = field(default=32)
    per_device_eval_batch_size: int = field(default=64)
    logging_steps: float = field(default=10)
    save_strategy: str = field(default="no")
    # The driving columns are not all forward() arguments, and the waypoints are what the metrics compare.
    remove_unused_columns: bool = field(default=False)
    label_names: list[str] | None = field(default_factory=lambda: ["ego_waypoints"])
    # Frozen or unused parts (the vision tower of a text-only batch) must not stop DDP.
    ddp_find_unused_parameters: bool | None = field(default=True)

    def __post_init__(self):
        # Without CUDA, the Trainer runs DDP over gloo only with use_cpu; otherwise each torchrun process runs alone.
        self.use_cpu = self.use_cpu or not torch.cuda.is_available()
        super().__post_init__()


def build_model(args: ModelArguments, seed: int) -> tuple[ProcessorMixin, PreTrainedModel]:
    head = {"num_modes": args.num_modes}
    if args.trajectory_hidden_dims:
        head["trajectory_hidden_dims"] = args.trajectory_hidden_dims
    queries = {"num_scene_queries": args.num_scene_queries, "num_history_queries": args.num_history_queries}
    if args.base_model.startswith("tiny-"):
        backbone = args.base_model.removeprefix("tiny-")
        processor = tiny_orion_processor(backbone, **queries)
        return processor, tiny_orion_model(processor, backbone, seed=seed, **head)

    model_type = AutoConfig.from_pretrained(args.base_model).model_type
    classes = orion_backbone(model_type.removeprefix("orion_"))
    loaded = AutoProcessor.from_pretrained(args.base_model)
    if model_type.startswith("orion_"):
        return loaded, classes.model.from_pretrained(args.base_model)
    processor = classes.processor(loaded.image_processor, loaded.tokenizer, loaded.video_processor, **queries)
    model = classes.model.from_pretrained(args.base_model, **queries, **head)
    # The placeholder tokens may lie beyond the checkpoint's vocabulary: grow it before they are set.
    if len(processor.tokenizer) > model.config.text_config.vocab_size:
        model.resize_token_embeddings(len(processor.tokenizer))
    model.config.update(processor.model_config_kwargs())
    model.config.check_driving_settings()
    return processor, model


def load_data(args: DataArguments, seed: int, queries: dict[str, int]) -> tuple[datasets.Dataset, datasets.Dataset]:
    if args.train_files:
        if not args.eval_files:
            raise ValueError("--train_files needs --eval_files to measure the trained model on.")
        train, evaluation = load_driving_dataset(args.train_files), load_driving_dataset(args.eval_files)
    else:
        train = synthetic_driving_dataset(args.num_train_samples, seed=seed, with_answers=args.with_answers, **queries)
        evaluation = synthetic_driving_dataset(args.num_eval_samples, seed=seed + 1, **queries)
    # Arrays as numpy: the collator stacks them without walking nested Python lists.
    return tuple(
        dataset.with_format("numpy", columns=list(ARRAY_FIELDS), output_all_columns=True)
        for dataset in (train, evaluation)
    )


def metric_row(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    return {name: metrics[f"{prefix}_{name}"] for name in METRICS}


def plot_report(
    path: Path, trajectories: np.ndarray, targets: np.ndarray, baseline: np.ndarray, log_history: list[dict]
) -> None:
    """Predicted, true and constant-velocity plans of a few samples, and the training loss curve, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(1, len(trajectories) + 1, figsize=(3.2 * (len(trajectories) + 1), 3.6))
    for index, axis in enumerate(axes[:-1]):
        for name, plan, style in (
            ("true", targets[index], "k-o"),
            ("model", trajectories[index], "C0-s"),
            ("const. velocity", baseline[index], "C3--"),
        ):
            axis.plot(-plan[:, 1], plan[:, 0], style, label=name, markersize=3)
        axis.set_title(f"sample {index}")
        axis.set_xlabel("left ← y [m] → right")
        axis.set_aspect("equal", adjustable="datalim")
    axes[0].set_ylabel("x, forward [m]")
    axes[0].legend(fontsize=7)
    steps = [entry["step"] for entry in log_history if "loss" in entry]
    losses = [entry["loss"] for entry in log_history if "loss" in entry]
    axes[-1].plot(steps, losses, "C0-")
    axes[-1].set_title("training loss")
    axes[-1].set_xlabel("step")
    axes[-1].set_yscale("log")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = HfArgumentParser((ModelArguments, DataArguments, OrionTrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    logging.basicConfig(level=logging.INFO if training_args.should_log else logging.WARNING)
    set_seed(training_args.seed)

    processor, model = build_model(model_args, training_args.seed)
    freeze_backbone(model, model_args.freeze_vision_tower, model_args.freeze_language_model)
    if model_args.lora:
        model = add_lora(model, model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout)
    config = model.config
    queries = {"num_scene_queries": config.num_scene_queries, "num_history_queries": config.num_history_queries}
    train_dataset, eval_dataset = load_data(data_args, training_args.seed, queries)
    collator = OrionDataCollator(
        processor, config.num_waypoints, config.waypoint_dim, with_answers=data_args.with_answers
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        compute_metrics=TrajectoryMetrics(),
        processing_class=processor,
    )

    mode = trainer.accelerator.distributed_type
    fsdp_requested = bool(training_args.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if fsdp_requested and mode != DistributedType.FSDP:
        raise ValueError(
            f"FSDP was requested but accelerate runs this job as {mode.value}: it enables FSDP on GPUs and other "
            "accelerators only, not on CPU processes."
        )

    untrained = trainer.evaluate(metric_key_prefix="untrained")
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trained = trainer.evaluate(metric_key_prefix="trained")
    no_scene = trainer.evaluate(
        eval_dataset.map(lambda batch: {"scene_queries": np.zeros_like(batch["scene_queries"])}, batched=True),
        metric_key_prefix="no_scene",
    )

    if model_args.lora:
        model = trainer.model.merge_and_unload()
        if trainer.is_world_process_zero():
            model.save_pretrained(training_args.output_dir)
    else:
        trainer.save_model(training_args.output_dir)
    parallelism = mode.value if training_args.world_size > 1 else "one process"
    print(f"Process {training_args.process_index} of {training_args.world_size} finished training ({parallelism}).")
    if not trainer.is_world_process_zero():
        return
    processor.save_pretrained(training_args.output_dir)

    targets = np.stack(eval_dataset["ego_waypoints"])
    metrics = TrajectoryMetrics()
    table = {
        "constant velocity (CAN bus)": metrics.compute(constant_velocity_waypoints(eval_dataset["can_bus"]), targets),
        "untrained model": metric_row(untrained, "untrained"),
        "trained model": metric_row(trained, "trained"),
        "trained model, scene queries zeroed": metric_row(no_scene, "no_scene"),
    }
    print("\n| model | " + " | ".join(METRICS) + " |\n|---|" + "---|" * len(METRICS))
    for name, row in table.items():
        print(f"| {name} | " + " | ".join(f"{row[metric]:.3f}" for metric in METRICS) + " |")

    output_dir = Path(training_args.output_dir)
    samples = [eval_dataset[index] for index in range(data_args.num_plotted_samples)]
    batch = OrionDataCollator(processor, config.num_waypoints, config.waypoint_dim, with_answers=False)(samples)
    batch = {name: value.to(model.device) for name, value in batch.items()}
    model.eval()
    with torch.no_grad():
        planned = model(**batch).trajectory.float().cpu().numpy()
    plot_report(
        output_dir / "training_report.png",
        planned,
        targets[: len(samples)],
        constant_velocity_waypoints(eval_dataset["can_bus"][: len(samples)]),
        trainer.state.log_history,
    )
    model.write_model_card(output_dir, metrics=table, images=["training_report.png"])

    reloaded = AutoModel.from_pretrained(output_dir, trust_remote_code=True).to(model.device).eval()
    with torch.no_grad():
        replanned = reloaded(**batch).trajectory.float().cpu().numpy()
    if not np.allclose(replanned, planned, atol=1e-5):
        raise RuntimeError("The reloaded model does not plan like the trained one.")
    print(f"\nSaved to {output_dir} (model card, training_report.png); reloaded with AutoModel: same plans.")


if __name__ == "__main__":
    main()
