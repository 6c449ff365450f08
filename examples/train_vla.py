"""Fine-tunes a robot action model (VLA) on any VLM family with any action head, with the Hugging Face Trainer.

With no data files it trains a tiny random model of the family, offline, on the synthetic manipulation set, then
compares it with the mean-action baseline (and with the image blanked and the instruction swapped), saves it with
its code and reloads it with `AutoModel.from_pretrained(..., trust_remote_code=True)`:

    python examples/train_vla.py --family smolvlm --action_head flow

`--family pi0` trains transformers' π0 (`PI0ForConditionalGeneration`, as `create_vlm("pi0")` builds it, its own
flow-matching action expert; `--action_head` is not read) on the same records, its `PI0Processor` normalising the
state and actions with the training set's statistics; π0 reads the robot state, so the data must have one:

    python examples/train_vla.py --family pi0 --chunk_size 4 --train_files data/metaworld/data/*/*.parquet

On a real checkpoint and a LeRobot data set (a v2.1 or v3.0 folder as LeRobot lays it out, videos included, or
its Hub id; or parquet episode tables with `observation.images.*`, `observation.state`, `action`, `task`); the
last 20 % of the episodes are held out unless `--eval_files` is given. Schema: `vlmheads.data.manipulation`.

    python examples/train_vla.py --family smolvlm --base_model HuggingFaceTB/SmolVLM-256M-Instruct \
        --action_head tokens --train_files lerobot/svla_so100_pickplace --image_keys observation.images.top \
        --chunk_size 4 \
        --lora --freeze_vision --bf16 --output_dir outputs/vla-smolvlm
"""

# First: importing vlmheads quiets bitsandbytes' missing-kernels warning, which transformers' Trainer utilities
# would otherwise print through peft on every run.
import vlmheads  # noqa: F401

# isort: split
import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import datasets
import numpy as np
from PIL import Image
from transformers import AutoModel, HfArgumentParser, set_seed

from vlmheads.configuration.configuration_vla import POLICY_FAMILIES
from vlmheads.data.manipulation import (
    BACKGROUND,
    load_lerobot_dataset,
    load_lerobot_episodes,
    synthetic_manipulation_dataset,
)
from vlmheads.modeling.modeling_vla import VLAForActionPrediction
from vlmheads.processing.collator_vla import PI0DataCollator, VLADataCollator
from vlmheads.registry.vlms import create_vlm, load_processor, resolve_vlm
from vlmheads.training.cards import ModelCardTrainer
from vlmheads.training.runs import ScriptTrainingArguments, trainer_default
from vlmheads.training.vla import (
    ActionMetrics,
    action_errors,
    add_lora,
    freeze,
    make_room_for_action_bins,
    mean_action_baseline,
    normalization_statistics,
    predict_dataset_actions,
)


@dataclass
class ModelArguments:
    family: str = field(default="smolvlm", metadata={"help": "A registry name: a family (smolvlm, paligemma, ...)."})
    base_model: str | None = field(
        default=None, metadata={"help": "A checkpoint (folder or Hub id) of the family; default: a tiny random model."}
    )
    action_head: str = field(
        default="regression", metadata={"help": "regression, tokens or flow (not read by pi0, a complete policy)."}
    )
    chunk_size: int = field(default=1, metadata={"help": "Actions predicted per sample."})
    head_hidden_dims: list[int] | None = field(default=None, metadata={"help": "Head MLP widths (default 2H, 2H)."})
    flow_num_steps: int = field(default=10, metadata={"help": "Euler steps of the flow head (and of pi0)."})
    num_action_bins: int = field(default=256, metadata={"help": "Bins per action dimension of the tokens head."})
    freeze_vision: bool = field(default=False, metadata={"help": "Do not train the vision tower and projector."})
    lora: bool = field(default=False, metadata={"help": "Train LoRA adapters on the language model instead."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (with --lora)."})


@dataclass
class DataArguments:
    train_files: list[str] | None = field(
        default=None,
        metadata={
            "help": "A LeRobot data set (v2.1 or v3.0 folder with meta/, or a Hub data set id), or LeRobot parquet "
            "episode tables."
        },
    )
    eval_files: list[str] | None = field(
        default=None,
        metadata={"help": "The same for evaluation; default: the last --eval_fraction of the training episodes."},
    )
    eval_fraction: float = field(default=0.2, metadata={"help": "Share of the episodes held out without eval_files."})
    image_keys: list[str] | None = field(
        default=None, metadata={"help": "Camera features, in order (default: every image or video feature, sorted)."}
    )
    state_key: str = field(default="observation.state", metadata={"help": "The proprioceptive state feature."})
    action_key: str = field(default="action", metadata={"help": "The action feature."})
    num_train_samples: int = field(default=1024, metadata={"help": "Synthetic training samples (no files)."})
    num_eval_samples: int = field(default=128, metadata={"help": "Synthetic evaluation samples (no files)."})
    image_size: int = field(default=32, metadata={"help": "Side of the synthetic images in pixels."})
    grid_size: int = field(default=2, metadata={"help": "Cells per side of the synthetic table top."})
    with_state: bool = field(default=False, metadata={"help": "Synthetic samples with a gripper state."})


@dataclass
class VLATrainingArguments(ScriptTrainingArguments):
    """TrainingArguments whose defaults train the tiny offline demo in a few minutes on 2 CPU cores."""

    output_dir: str = trainer_default("output_dir", "outputs/vla_demo")
    learning_rate: float = trainer_default("learning_rate", 1e-3)
    num_train_epochs: float = trainer_default("num_train_epochs", 8)
    warmup_steps: float = trainer_default("warmup_steps", 0.1)
    per_device_train_batch_size: int = trainer_default("per_device_train_batch_size", 16)
    per_device_eval_batch_size: int = trainer_default("per_device_eval_batch_size", 64)
    logging_steps: float = trainer_default("logging_steps", 20)
    save_strategy: str = trainer_default("save_strategy", "no")
    # The records' columns are not forward() arguments, and the actions are what the metrics compare.
    remove_unused_columns: bool = trainer_default("remove_unused_columns", False)
    label_names: list[str] | None = trainer_default("label_names", default_factory=lambda: ["actions"])


def load_records(files: list[str], args: DataArguments, chunk_size: int, what: str) -> datasets.Dataset:
    """LeRobot parquet tables, or one LeRobot data set folder / Hub id, as manipulation records."""
    keys = {"image_keys": args.image_keys, "state_key": args.state_key, "action_key": args.action_key}
    if all(file.endswith(".parquet") for file in files):
        return load_lerobot_episodes(files, chunk_size, **keys)
    if len(files) != 1:
        raise ValueError(f"{what} takes parquet files or one LeRobot data set (folder or Hub id), got {files}.")
    return load_lerobot_dataset(files[0], chunk_size, what=what, **keys)


def hold_out_episodes(records: datasets.Dataset, fraction: float) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The last `fraction` of the episodes (at least one) held out, whole: no frame of them is trained on."""
    episodes = [record_id.rsplit("-frame-", 1)[0] for record_id in records["id"]]
    order = list(dict.fromkeys(episodes))
    if len(order) < 2 or not 0 < fraction < 1:
        raise ValueError(
            f"Holding out episodes needs 2 or more episodes and 0 < --eval_fraction < 1; got {len(order)}."
        )
    held = set(order[-max(1, round(fraction * len(order))) :])
    train = [index for index, episode in enumerate(episodes) if episode not in held]
    evaluation = [index for index, episode in enumerate(episodes) if episode in held]
    return records.select(train), records.select(evaluation)


def load_data(args: DataArguments, chunk_size: int, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    if args.train_files:
        train = load_records(args.train_files, args, chunk_size, "--train_files")
        if not args.eval_files:
            return hold_out_episodes(train, args.eval_fraction)
        return train, load_records(args.eval_files, args, chunk_size, "--eval_files")
    synthetic = {"image_size": args.image_size, "grid_size": args.grid_size, "chunk_size": chunk_size}
    synthetic["with_state"] = args.with_state
    return (
        synthetic_manipulation_dataset(args.num_train_samples, seed=seed, **synthetic),
        synthetic_manipulation_dataset(args.num_eval_samples, seed=seed + 1, **synthetic),
    )


def build_pi0(args: ModelArguments, train: datasets.Dataset, seed: int):
    """transformers' π0 as the registry builds it (tiny random, or `--base_model`) with `--chunk_size` and
    `--flow_num_steps`, and its processor normalising with the training set's statistics."""
    if "state" not in train.column_names:
        raise ValueError(f"{args.family} reads the robot state, and the training data has none (see --state_key).")
    processor = load_processor(args.family, pretrained=args.base_model, tiny=args.base_model is None)
    actions = np.stack(train.with_format("numpy")["actions"])
    statistics = normalization_statistics(actions, np.stack(train.with_format("numpy")["state"]))
    processor.actions_mean, processor.actions_std = statistics["action_mean"], statistics["action_std"]
    processor.state_mean, processor.state_std = statistics["state_mean"], statistics["state_std"]
    processor.chunk_size = args.chunk_size
    overrides = {"chunk_size": args.chunk_size, "num_inference_steps": args.flow_num_steps}
    if args.base_model is None:
        model = create_vlm(args.family, tiny=True, seed=seed, **overrides)
    else:
        model = create_vlm(args.family, pretrained=args.base_model, **overrides)
    widths = {"state": (len(processor.state_mean), model.config.max_state_dim)}
    widths["actions"] = (actions.shape[-1], model.config.max_action_dim)
    for name, (width, most) in widths.items():
        if width > most:
            raise ValueError(f"The {name} has {width} values; this {args.family} model reads at most {most}.")
    return processor, model


def build_model(args: ModelArguments, train: datasets.Dataset, seed: int):
    if args.family in POLICY_FAMILIES:
        return build_pi0(args, train, seed)
    processor = load_processor(args.family, pretrained=args.base_model, tiny=args.base_model is None)
    if args.base_model is None:
        backbone = create_vlm(args.family, tiny=True, seed=seed)
    else:
        backbone = create_vlm(args.family, pretrained=args.base_model)
    actions = np.stack(train.with_format("numpy")["actions"])
    states = np.stack(train.with_format("numpy")["state"]) if "state" in train.column_names else None
    head = {"action_head": args.action_head, "chunk_size": args.chunk_size, "action_dim": actions.shape[-1]}
    head["flow_num_steps"], head["num_action_bins"] = args.flow_num_steps, args.num_action_bins
    if args.head_hidden_dims:
        head["head_hidden_dims"] = args.head_hidden_dims
    if states is not None:
        head["state_dim"] = states.shape[-1]
    if args.action_head == "tokens":
        make_room_for_action_bins(backbone, processor.tokenizer, args.num_action_bins)
    model = VLAForActionPrediction.from_backbone(backbone, **head, **normalization_statistics(actions, states))
    if args.action_head == "tokens":
        model.check_action_bins(processor.tokenizer)
    return processor, model


def evaluation_table(model, collator, train, evaluation, batch_size: int, predict=None) -> dict[str, dict[str, float]]:
    """Held-out action errors of the mean-action baseline, the model, and the model with the image blanked or the
    instruction of another sample (`predict`: as `predict_dataset_actions` takes it)."""
    records = list(evaluation)
    targets = np.stack([np.asarray(record["actions"], dtype=np.float32) for record in records])
    baseline = mean_action_baseline(np.stack(train.with_format("numpy")["actions"]), len(records))
    blank = [
        {**record, "images": [Image.new("RGB", image.size, BACKGROUND) for image in record["images"]]}
        for record in records
    ]
    instructions = [record["instruction"] for record in records]
    swapped = [{**record, "instruction": instructions[(i + 1) % len(records)]} for i, record in enumerate(records)]
    table = {"mean-action baseline": action_errors(baseline, targets)}
    for name, inputs in (("trained model", records), ("image blanked", blank), ("instruction swapped", swapped)):
        predicted = predict_dataset_actions(model, collator, inputs, batch_size, predict=predict)
        table[name] = action_errors(predicted, targets)
    return table


def main() -> None:
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, VLATrainingArguments),
        description=__doc__.split("\n\n")[0]
        + " Data schema: vlmheads.data.manipulation (LeRobot v2.1/v3.0 folders, Hub ids or parquet tables).",
    )
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    logging.basicConfig(level=logging.INFO if training_args.should_log else logging.WARNING)
    set_seed(training_args.seed)
    resolve_vlm(model_args.family)
    policy = model_args.family in POLICY_FAMILIES

    train_dataset, eval_dataset = load_data(data_args, model_args.chunk_size, training_args.seed)
    processor, model = build_model(model_args, train_dataset, training_args.seed)
    freeze(model, vision=model_args.freeze_vision, projector=model_args.freeze_vision)
    trained = add_lora(model, r=model_args.lora_r, alpha=model_args.lora_r) if model_args.lora else model
    collator = (
        PI0DataCollator.for_processor(processor) if policy else VLADataCollator.for_model(processor, model.config)
    )
    trainer = ModelCardTrainer(
        model=trained,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        # π0's outputs are flow velocities, not actions: its held-out errors come from the sampled actions below.
        compute_metrics=None if policy else ActionMetrics(),
        processing_class=processor,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = trainer.evaluate()
    if model_args.lora:
        model = trainer.model.merge_and_unload()

    predict = partial(collator.sample_actions, model) if policy else None
    batch_size = training_args.per_device_eval_batch_size
    table = evaluation_table(model, collator, train_dataset, eval_dataset, batch_size, predict)
    for name, row in table.items():
        key = name.replace(" ", "_").replace("-", "_")
        metrics.update({f"{key}_{metric}": value for metric, value in row.items()})
    trainer.save_metrics("eval", metrics)
    label = model_args.family if policy else f"{model_args.family} x {model_args.action_head}"
    print(f"\n{label}: held-out errors ({'sample_actions' if policy else 'predict_actions'})")
    print("| inputs | action L1 | action MSE |\n|---|---|---|")
    for name, row in table.items():
        print(f"| {name} | {row['action_l1']:.4f} | {row['action_mse']:.4f} |")

    if not trainer.is_world_process_zero():
        return
    output_dir = Path(training_args.output_dir)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    records = [eval_dataset[index] for index in range(min(8, len(eval_dataset)))]
    before = predict_dataset_actions(model, collator, records, predict=predict)
    if policy:
        # The reloaded processor must bring the statistics back: the reloaded pair predicts alone.
        reloaded = create_vlm(model_args.family, pretrained=str(output_dir)).to(model.device)
        reloaded_collator = PI0DataCollator.for_processor(
            load_processor(model_args.family, pretrained=str(output_dir))
        )
        after = predict_dataset_actions(
            reloaded, reloaded_collator, records, predict=partial(reloaded_collator.sample_actions, reloaded)
        )
    else:
        datasets = [*(data_args.train_files or []), *(data_args.eval_files or [])] or ["synthetic manipulation set"]
        model.write_model_card(output_dir, metrics=table, model_row="trained model", datasets=datasets)
        reloaded = AutoModel.from_pretrained(output_dir, trust_remote_code=True).to(model.device)
        after = predict_dataset_actions(reloaded, collator, records)
    if not np.allclose(before, after, atol=1e-5):
        raise RuntimeError("The reloaded model does not act like the trained one.")
    print(f"\nSaved to {output_dir}; reloaded with {'create_vlm' if policy else 'AutoModel'}: same actions.")
    if training_args.push_to_hub:
        trainer.model = model  # the merged model when trained with LoRA
        trainer.push_to_hub()  # the vlmheads card above, not the Trainer's generic one


if __name__ == "__main__":
    main()
