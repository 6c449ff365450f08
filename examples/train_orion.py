"""Fine-tunes an Orion driving model with the Hugging Face Trainer and reports its planning metrics.

With no data files it trains a tiny model on the synthetic driving set, offline (its time: the README's demo),
then compares it with the constant-velocity baseline and the untrained model, saves it with its code and model
card, reloads it with `AutoModel.from_pretrained(..., trust_remote_code=True)` and plots a few plans:

    python examples/train_orion.py

On a real checkpoint and your own records (schema in `vlmheads.data.driving`):

    python examples/train_orion.py --base_model /models/Qwen2-VL-7B-Instruct \
        --train_files train.parquet --eval_files val.parquet --num_scene_queries 512 --num_history_queries 16 \
        --lora --freeze_vision_tower --activation_checkpointing --output_dir outputs/orion-7b

The script runs unchanged under `torchrun --nproc_per_node 2` and `accelerate launch --multi_gpu --num_processes 2`
(DDP; over gloo on CPUs, where the script sets `use_cpu`), and under `accelerate launch --config_file <an FSDP
config>` on GPUs. `accelerate launch --cpu --num_processes 2` starts a single process in accelerate 1.15 (its
multi-CPU mode needs MPI).

`--report_to tensorboard` (events in `<output_dir>/runs/`) or `--report_to trackio` (`pip install -e
".[tracking]"` in a clone) also receive the comparison table and the report plot; the metrics land in
`<output_dir>/{train,eval,all}_results.json` through `trainer.save_metrics`.
"""

# First: importing vlmheads quiets bitsandbytes' missing-kernels warning, which transformers' Trainer utilities
# would otherwise print through peft on every run.
import vlmheads  # noqa: F401

# isort: split
import dataclasses
import logging
import os
import tempfile
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
from vlmheads.training.cards import ModelCardTrainer
from vlmheads.training.orion import TrajectoryMetrics, add_lora, displacement_statistics, freeze_backbone
from vlmheads.training.runs import ScriptTrainingArguments, trainer_default
from vlmheads.training.tracking import log_report, prepare_tracking

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
    num_scene_queries: int | None = field(
        default=None,
        metadata={"help": "Scene query vectors per sample (default: the records' count with --train_files, else 16)."},
    )
    num_history_queries: int | None = field(
        default=None,
        metadata={
            "help": "History query vectors per sample (default: the records' count with --train_files, else 4)."
        },
    )
    num_modes: int = field(default=1, metadata={"help": "Trajectory modes, one per navigation command."})
    trajectory_head: str = field(
        default="mlp",
        metadata={
            "help": "mlp (ORION's MLP baseline) or flow (a generative flow-matching planner).",
            "choices": ["mlp", "flow"],
        },
    )
    compare_flow_planner: bool | None = field(
        default=None,
        metadata={
            "help": "Also fine-tune the same backbone with trajectory_head=flow on the same data and add its row to "
            "the table. Default: on for the tiny offline models, off for checkpoints."
        },
    )
    trajectory_hidden_dims: list[int] | None = field(
        default=None, metadata={"help": "Trajectory decoder widths; the config's default is [H // 2]."}
    )
    freeze_vision_tower: bool = field(default=False, metadata={"help": "Do not train the vision tower."})
    freeze_language_model: bool = field(default=False, metadata={"help": "Do not train the language model."})
    lora: bool = field(default=False, metadata={"help": "Train LoRA adapters on the language model instead."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (with --lora)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scale numerator: updates scale by alpha / r."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA path."})


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
class OrionTrainingArguments(ScriptTrainingArguments):
    """TrainingArguments whose defaults train the tiny offline demo."""

    output_dir: str = trainer_default("output_dir", "outputs/orion_demo")
    learning_rate: float = trainer_default("learning_rate", 2e-3)
    num_train_epochs: float = trainer_default("num_train_epochs", 8)
    warmup_steps: float = trainer_default("warmup_steps", 20)
    per_device_train_batch_size: int = trainer_default("per_device_train_batch_size", 32)
    per_device_eval_batch_size: int = trainer_default("per_device_eval_batch_size", 64)
    logging_steps: float = trainer_default("logging_steps", 10)
    save_strategy: str = trainer_default("save_strategy", "no")
    # The driving columns are not all forward() arguments, and the waypoints are what the metrics compare.
    remove_unused_columns: bool = trainer_default("remove_unused_columns", False)
    label_names: list[str] | None = trainer_default("label_names", default_factory=lambda: ["ego_waypoints"])
    # Frozen or unused parts (the vision tower of a text-only batch) must not stop DDP.
    ddp_find_unused_parameters: bool | None = trainer_default("ddp_find_unused_parameters", True)


def build_model(
    args: ModelArguments, seed: int, widths: dict[str, int] | None = None, **head
) -> tuple[ProcessorMixin, PreTrainedModel]:
    """The processor and the model; `head` sets trajectory-head fields of a new Orion configuration (an Orion
    checkpoint keeps its own), `widths` its input widths (`scene_query_dim`, `history_query_dim`, `can_bus_dim`)."""
    head = {"num_modes": args.num_modes, **(widths or {}), **head}
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
        model = classes.model.from_pretrained(args.base_model)
        if model.config.trajectory_head != head.get("trajectory_head", model.config.trajectory_head):
            raise ValueError(
                f"{args.base_model} has trajectory_head={model.config.trajectory_head!r}; fine-tune it with "
                f"--trajectory_head {model.config.trajectory_head}."
            )
        return loaded, model
    processor = classes.processor(loaded.image_processor, loaded.tokenizer, loaded.video_processor, **queries)
    model = classes.model.from_pretrained(args.base_model, **queries, **head)
    # The placeholder tokens may lie beyond the checkpoint's vocabulary: grow it before they are set.
    if len(processor.tokenizer) > model.config.text_config.vocab_size:
        model.resize_token_embeddings(len(processor.tokenizer))
    model.config.update(processor.model_config_kwargs())
    model.config.check_driving_settings()
    return processor, model


def record_sizes(files: list[str]) -> dict[str, int]:
    """Query counts and widths of the driving records in `files`, read from the first record: `num_scene_queries`,
    `scene_query_dim`, `num_history_queries`, `history_query_dim`, `can_bus_dim`."""
    first = load_driving_dataset(files).with_format("numpy")[0]
    scene, history = np.asarray(first["scene_queries"]), np.asarray(first["history_queries"])
    return {
        "num_scene_queries": scene.shape[0],
        "scene_query_dim": scene.shape[1],
        "num_history_queries": history.shape[0],
        "history_query_dim": history.shape[1],
        "can_bus_dim": np.asarray(first["can_bus"]).shape[0],
    }


def settle_sizes(args: ModelArguments, data_args: DataArguments) -> dict[str, int]:
    """Fills the query counts the arguments leave unset from the records (or the synthetic defaults, 16 and 4),
    refuses counts that disagree with the records, and returns the records' input widths for the configuration."""
    if not data_args.train_files:
        args.num_scene_queries = args.num_scene_queries or 16
        args.num_history_queries = args.num_history_queries or 4
        return {}
    sizes = record_sizes(data_args.train_files)
    for name in ("num_scene_queries", "num_history_queries"):
        given = getattr(args, name)
        if given is not None and given != sizes[name]:
            raise ValueError(f"--{name} {given}, but the records in --train_files hold {sizes[name]}.")
        setattr(args, name, sizes[name])
    return {name: sizes[name] for name in ("scene_query_dim", "history_query_dim", "can_bus_dim")}


def model_queries(args: ModelArguments) -> dict[str, int]:
    """Scene and history queries per sample: an Orion checkpoint's own, otherwise the arguments'."""
    queries = {"num_scene_queries": args.num_scene_queries, "num_history_queries": args.num_history_queries}
    if not args.base_model.startswith("tiny-"):
        config = AutoConfig.from_pretrained(args.base_model)
        if config.model_type.startswith("orion_"):
            queries = {name: getattr(config, name) for name in queries}
    return queries


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
    """Predicted, true and constant-velocity plans of a few samples (none or more), and the training loss curve, as
    a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, grid = plt.subplots(1, len(trajectories) + 1, figsize=(3.2 * (len(trajectories) + 1), 3.6), squeeze=False)
    axes = grid[0]
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
    if len(trajectories):
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


def prepare_for_training(model: PreTrainedModel, args: ModelArguments) -> PreTrainedModel:
    """Freezes the parts the arguments name, and puts LoRA adapters on the language model when asked."""
    freeze_backbone(model, args.freeze_vision_tower, args.freeze_language_model)
    if args.lora:
        model = add_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout)
    return model


def orion_trainer(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    args: TrainingArguments,
    train_dataset: datasets.Dataset,
    eval_dataset: datasets.Dataset,
    with_answers: bool,
) -> ModelCardTrainer:
    config = model.config
    return ModelCardTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=OrionDataCollator(
            processor, config.num_waypoints, config.waypoint_dim, with_answers=with_answers
        ),
        compute_metrics=TrajectoryMetrics(),
        processing_class=processor,
    )


def train_flow_planner(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
    train_dataset: datasets.Dataset,
    eval_dataset: datasets.Dataset,
    statistics: dict[str, list[float]],
) -> dict[str, float]:
    """Fine-tunes the same backbone with the generative planner (`trajectory_head="flow"`) on the same data and
    settings, and returns its evaluation row. It trains in a scratch folder and is not saved."""
    set_seed(training_args.seed)
    processor, model = build_model(model_args, training_args.seed, trajectory_head="flow", **statistics)
    model = prepare_for_training(model, model_args)
    with tempfile.TemporaryDirectory() as scratch:
        flow_args = dataclasses.replace(
            training_args, output_dir=scratch, save_strategy="no", report_to=[], push_to_hub=False
        )
        trainer = orion_trainer(model, processor, flow_args, train_dataset, eval_dataset, data_args.with_answers)
        trainer.train()
        return metric_row(trainer.evaluate(metric_key_prefix="eval_flow"), "eval_flow")


def phase(training_args: TrainingArguments, title: str) -> None:
    """A heading before each phase of the run (main process only)."""
    if training_args.process_index == 0:
        print(f"\n== {title}", flush=True)


def main() -> None:
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, OrionTrainingArguments),
        description=__doc__.split("\n\n")[0]
        + " Record schema: vlmheads.data.driving (python -m pydoc vlmheads.data.driving).",
    )
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    logging.basicConfig(level=logging.INFO if training_args.should_log else logging.WARNING)
    set_seed(training_args.seed)

    phase(training_args, "Data and model")
    widths = settle_sizes(model_args, data_args)
    train_dataset, eval_dataset = load_data(data_args, training_args.seed, model_queries(model_args))
    if not 0 <= data_args.num_plotted_samples <= len(eval_dataset):
        raise ValueError(
            f"--num_plotted_samples {data_args.num_plotted_samples}: expected 0 to {len(eval_dataset)}, the number of "
            "evaluation samples."
        )
    # The flow planner samples displacements normalised with the training set's statistics.
    statistics = displacement_statistics(np.stack(train_dataset["ego_waypoints"]))
    head = {"trajectory_head": model_args.trajectory_head}
    if model_args.trajectory_head == "flow":
        head.update(statistics)
    processor, model = build_model(model_args, training_args.seed, widths, **head)
    model = prepare_for_training(model, model_args)
    config = model.config
    prepare_tracking(training_args)
    trainer = orion_trainer(model, processor, training_args, train_dataset, eval_dataset, data_args.with_answers)

    mode = trainer.accelerator.distributed_type
    fsdp_requested = bool(training_args.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if fsdp_requested and mode != DistributedType.FSDP:
        raise ValueError(
            f"FSDP was requested but accelerate runs this job as {mode.value}: it enables FSDP on GPUs and other "
            "accelerators only, not on CPU processes."
        )

    phase(training_args, "Evaluating the untrained model")
    untrained = trainer.evaluate(metric_key_prefix="eval_untrained")
    phase(training_args, "Training")
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    phase(training_args, "Evaluating the trained model (and with the scene queries zeroed)")
    trained = trainer.evaluate(metric_key_prefix="eval_trained")
    no_scene = trainer.evaluate(
        eval_dataset.map(lambda batch: {"scene_queries": np.zeros_like(batch["scene_queries"])}, batched=True),
        metric_key_prefix="eval_no_scene",
    )
    compare_flow = model_args.compare_flow_planner
    if compare_flow is None:
        compare_flow = model_args.base_model.startswith("tiny-")
    flow_row = None
    if compare_flow and config.trajectory_head != "flow":
        phase(training_args, "Training and evaluating the flow planner on the same data")
        flow_row = train_flow_planner(
            model_args, data_args, training_args, train_dataset, eval_dataset, {**widths, **statistics}
        )

    phase(training_args, "Saving, reloading with AutoModel, plotting")
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
    baseline_plans = constant_velocity_waypoints(np.stack(eval_dataset["can_bus"]))
    metrics = TrajectoryMetrics()
    table = {
        "constant velocity (CAN bus)": metrics.compute(baseline_plans, targets),
        "untrained model": metric_row(untrained, "eval_untrained"),
        "trained model": metric_row(trained, "eval_trained"),
        "trained model, scene queries zeroed": metric_row(no_scene, "eval_no_scene"),
    }
    if flow_row is not None:
        table["trained flow planner (trajectory_head=flow)"] = flow_row
    print("\n| model | " + " | ".join(METRICS) + " |\n|---|" + "---|" * len(METRICS))
    for name, row in table.items():
        print(f"| {name} | " + " | ".join(f"{row[metric]:.3f}" for metric in METRICS) + " |")
    trainer.save_metrics("train", train_result.metrics)
    baseline = {
        f"eval_constant_velocity_{name}": value for name, value in table["constant velocity (CAN bus)"].items()
    }
    trainer.save_metrics("eval", {**untrained, **trained, **no_scene, **baseline})

    output_dir = Path(training_args.output_dir)
    # The reload check below plans at least one sample, even when none is plotted.
    plotted = data_args.num_plotted_samples
    samples = [eval_dataset[index] for index in range(max(plotted, 1))]
    batch = OrionDataCollator(processor, config.num_waypoints, config.waypoint_dim, with_answers=False)(samples)
    batch = {name: value.to(model.device) for name, value in batch.items()}
    model.eval()
    # A flow planner samples from noise: the same seed gives the same plans.
    torch.manual_seed(training_args.seed)
    with torch.no_grad():
        planned = model(**batch).trajectory.float().cpu().numpy()
    plot_report(
        output_dir / "training_report.png",
        planned[:plotted],
        targets[:plotted],
        baseline_plans[:plotted],
        trainer.state.log_history,
    )
    log_report(trainer, table, [output_dir / "training_report.png"])
    datasets = [*(data_args.train_files or []), *(data_args.eval_files or [])] or ["synthetic driving set"]
    model.write_model_card(
        output_dir, metrics=table, model_row="trained model", datasets=datasets, images=["training_report.png"]
    )

    reloaded = AutoModel.from_pretrained(output_dir, trust_remote_code=True).to(model.device).eval()
    torch.manual_seed(training_args.seed)
    with torch.no_grad():
        replanned = reloaded(**batch).trajectory.float().cpu().numpy()
    if not np.allclose(replanned, planned, atol=1e-5):
        raise RuntimeError("The reloaded model does not plan like the trained one.")
    print(f"\nSaved to {output_dir} (model card, training_report.png); reloaded with AutoModel: same plans.")
    if training_args.push_to_hub:
        trainer.model = model  # the merged model when trained with LoRA
        trainer.push_to_hub()  # the vlmheads card above, not the Trainer's generic one


if __name__ == "__main__":
    main()
