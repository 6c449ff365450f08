"""Fine-tunes an image classifier (`VLMForImageClassification`) on any VLM family with the Hugging Face Trainer.

Your photos go in one folder per class; the folder names are the labels (or give them, in id order, with
`--labels`). A Hub data set id with `image` and `label` columns works in place of the folder. Without `--data_dir`
the script trains on the synthetic receipt set (classes "0", "1", "2 or more"). Without `--base_model` it builds a
tiny random model of the family offline, so the whole loop runs on a CPU:

    python examples/train_classifier.py --family smolvlm --output_dir outputs/classifier
    # your own classes: photos/cat/*.jpg, photos/dog/*.jpg, ...
    python examples/train_classifier.py --family smolvlm --data_dir photos --output_dir outputs/pets
    # a real checkpoint, the head on the image features alone (the language model does not run)
    python examples/train_classifier.py --family qwen2-vl-2b --base_model Qwen/Qwen2-VL-2B-Instruct \
        --data_dir photos --freeze_backbone --bf16 --output_dir outputs/pets-2b

The folder gets the model with its code, the processor, the model card (held-out accuracy and macro-F1 beside the
majority class, the confusion matrix) and `eval_results.json`; `pipeline("image-classification", model=folder,
trust_remote_code=True)` loads it. Data schema: `vlmheads.data.receipts.load_image_folder`.
"""

# First: importing vlmheads quiets bitsandbytes' missing-kernels warning, which transformers' Trainer utilities
# would otherwise print through peft on every run.
import vlmheads  # noqa: F401

# isort: split
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
from transformers import HfArgumentParser, set_seed

from vlmheads import VLMForImageClassification, create_vlm, load_processor
from vlmheads.data.receipts import RECEIPT_CLASSES, load_image_folder, majority_rate, random_split, synthetic_receipts
from vlmheads.data.sources import local_or_hub
from vlmheads.registry.vlms import resolve_vlm
from vlmheads.training.backbones import add_lora, freeze
from vlmheads.training.cards import ModelCardTrainer
from vlmheads.training.classification import (
    ClassificationMetrics,
    ImageClassificationCollator,
    confusion_matrix,
    majority_class_row,
    print_confusion_matrix,
    save_confusion_matrix,
)
from vlmheads.training.runs import ScriptTrainingArguments, trainer_default


@dataclass
class ClassifierArguments:
    family: str = field(default="smolvlm", metadata={"help": "A registry name: a family (smolvlm, llava, ...)."})
    base_model: str | None = field(
        default=None, metadata={"help": "A checkpoint (folder or Hub id) of the family; default: a tiny random model."}
    )
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Photos in one folder per class (the folder names are the labels), or a Hub data set id with "
            "image and label columns. Unset: the synthetic receipt set."
        },
    )
    labels: list[str] | None = field(
        default=None,
        metadata={"help": "The class names in id order (default: the class folders, sorted). Must match the folders."},
    )
    num_synthetic: int = field(default=120, metadata={"help": "Size of the synthetic set (a multiple of 3)."})
    dataset_seed: int = field(default=0, metadata={"help": "Seed of the synthetic photos and of the held-out split."})
    eval_fraction: float = field(default=0.2, metadata={"help": "Share of the photos held out for evaluation."})
    pooling: str = field(
        default="vision",
        metadata={
            "help": "vision (image features alone) or multimodal (image + prompt).",
            "choices": ["vision", "multimodal"],
        },
    )
    prompt: str = field(default="", metadata={"help": "The prompt after the image with multimodal pooling."})
    classifier_hidden_dims: list[int] = field(
        default_factory=lambda: [256], metadata={"help": "Widths of the head's hidden layers."}
    )
    freeze_backbone: bool = field(default=False, metadata={"help": "Train only the head (and LoRA adapters)."})
    lora: bool = field(default=False, metadata={"help": "LoRA adapters on the language model; the head trains fully."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (with --lora)."})


@dataclass
class ClassifierTrainingArguments(ScriptTrainingArguments):
    """`TrainingArguments` whose defaults train the tiny offline model on a CPU."""

    output_dir: str = trainer_default("output_dir", "outputs/classifier")
    num_train_epochs: float = trainer_default("num_train_epochs", 6)
    per_device_train_batch_size: int = trainer_default("per_device_train_batch_size", 16)
    learning_rate: float = trainer_default("learning_rate", 1e-3)
    logging_steps: float = trainer_default("logging_steps", 10)
    save_strategy: str = trainer_default("save_strategy", "no")
    # The collator reads the `image` column, which the Trainer would otherwise drop as unknown to forward().
    remove_unused_columns: bool = trainer_default("remove_unused_columns", False)


def load_data(args: ClassifierArguments) -> tuple[datasets.Dataset, datasets.Dataset, list[str]]:
    """Training and held-out photos (stratified split) and the class names in id order."""
    if args.data_dir is None:
        if args.labels and list(args.labels) != list(RECEIPT_CLASSES):
            raise ValueError(
                f"--labels {args.labels} need --data_dir: the synthetic set's classes are {RECEIPT_CLASSES}."
            )
        dataset = synthetic_receipts(args.num_synthetic, seed=args.dataset_seed)
    else:
        dataset = load_image_folder(args.data_dir, args.labels)
    names = dataset.features["label"].names
    train, held_out = random_split(dataset, args.eval_fraction, seed=args.dataset_seed)
    return train, held_out, names


def build_model(args: ClassifierArguments, labels: list[str], seed: int):
    """The family's processor and a new classifier head on its backbone."""
    resolve_vlm(args.family)
    if args.base_model is None:
        processor = load_processor(args.family, tiny=True)
        backbone = create_vlm(args.family, tiny=True, seed=seed)
    else:
        checkpoint = str(local_or_hub(args.base_model, "--base_model"))
        processor = load_processor(args.family, pretrained=checkpoint)
        backbone = create_vlm(args.family, pretrained=checkpoint)
    model = VLMForImageClassification.from_backbone(
        backbone,
        id2label=dict(enumerate(labels)),
        pooling=args.pooling,
        classifier_hidden_dims=args.classifier_hidden_dims,
    )
    if args.freeze_backbone:
        freeze(model, vision=True, projector=True, language=True)
    elif args.pooling == "vision":
        # The head reads the image features: the language model gets no gradient.
        freeze(model, language=True)
    return processor, model


def main() -> None:
    parser = HfArgumentParser(
        (ClassifierArguments, ClassifierTrainingArguments),
        description=__doc__.split("\n\n")[0] + " Data schema: vlmheads.data.receipts.load_image_folder.",
    )
    args, training_args = parser.parse_args_into_dataclasses()
    set_seed(training_args.seed)
    train_set, eval_set, labels = load_data(args)
    processor, model = build_model(args, labels, training_args.seed)
    trained = add_lora(model, r=args.lora_r, alpha=2 * args.lora_r) if args.lora else model
    metrics = ClassificationMetrics(len(labels))
    trainer = ModelCardTrainer(
        model=trained,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=ImageClassificationCollator(processor, model.family, args.pooling, args.prompt),
        compute_metrics=metrics,
        processing_class=processor,
    )
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    prediction = trainer.predict(eval_set)
    if not trainer.is_world_process_zero():
        return
    classifier = trainer.model.merge_and_unload() if args.lora else model

    predicted, references = np.argmax(prediction.predictions, axis=-1), prediction.label_ids
    table = {
        "fine-tuned": metrics.compute(predicted, references),
        "majority class": majority_class_row(metrics, train_set["label"], references),
    }
    output_dir = Path(training_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    confusion = confusion_matrix(references, predicted, len(labels))
    save_confusion_matrix(confusion, labels, output_dir / "confusion_matrix.png")
    classifier.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    classifier.write_model_card(
        output_dir,
        metrics=table,
        model_row="fine-tuned",
        datasets=[args.data_dir or "synthetic receipts"],
        images=["confusion_matrix.png"],
    )
    trainer.save_metrics("train", train_result.metrics)
    trainer.save_metrics(
        "eval", {f"{row}_{name}": value for row, values in table.items() for name, value in values.items()}
    )

    print_confusion_matrix(confusion, labels)
    print(
        f"{args.family} classifier, labels {labels}: held-out accuracy {table['fine-tuned']['accuracy']:.3f} "
        f"(majority class of the training set: {majority_rate(np.asarray(train_set['label'])):.3f}), macro-F1 "
        f"{table['fine-tuned']['macro_f1']:.3f}"
    )
    print(f"Saved the model, processor, model card and confusion matrix to {output_dir}")
    if training_args.push_to_hub:
        trainer.model = classifier
        trainer.push_to_hub()  # the vlmheads card above, not the Trainer's generic one


if __name__ == "__main__":
    main()
