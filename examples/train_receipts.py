"""Fine-tunes a receipt classifier (classes "0", "1", "2 or more" receipts) on Mllama with the Trainer.

The model starts from a plain Mllama checkpoint (`MllamaForConditionalGeneration`, e.g. Llama-3.2-11B-Vision):
every backbone weight loads, only the classification head is new. Without `--model_name_or_path` the script
builds a tiny random Mllama offline (nothing is downloaded) and trains it on the synthetic receipt set, which shows
the whole loop on a CPU (its measured time: README). Held-out accuracy and macro-F1 come from local `evaluate`
modules; the confusion matrix is saved as a PNG and put in the model card with the metrics.

    # offline: tiny random Mllama, synthetic receipts
    python examples/train_receipts.py --output_dir outputs/receipts
    # the same on two processes (DDP; gloo on CPUs). `accelerate launch --cpu --num_processes 2` also runs the
    # script, but accelerate 1.15 starts one process for --cpu (its multi-CPU mode needs MPI).
    accelerate launch --multi_gpu --num_processes 2 examples/train_receipts.py --output_dir outputs/receipts
    # with TensorBoard (events in outputs/receipts/runs/) or Trackio: pip install -e ".[tracking]" in a clone
    python examples/train_receipts.py --output_dir outputs/receipts --report_to tensorboard
    # Llama-3.2-11B-Vision on your photos (one folder per class: data/0, data/1, "data/2 or more"), QLoRA
    python examples/train_receipts.py --model_name_or_path meta-llama/Llama-3.2-11B-Vision --data_dir data \
        --load_in_4bit --lora --bf16 --per_device_train_batch_size 2 --gradient_accumulation_steps 8 \
        --learning_rate 1e-4 --num_train_epochs 3 --output_dir outputs/receipts-11b
"""

# First: importing vlmheads quiets bitsandbytes' missing-kernels warning, which transformers' Trainer utilities
# would otherwise print through peft on every run.
import vlmheads  # noqa: F401

# isort: split
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import (
    BitsAndBytesConfig,
    HfArgumentParser,
    IntervalStrategy,
    MllamaProcessor,
    TrainingArguments,
)

from vlmheads import ReceiptVLClassifier, ReceiptVLProcessor
from vlmheads.data.receipts import (
    RECEIPT_CLASSES,
    load_image_folder,
    majority_rate,
    random_split,
    synthetic_receipts,
)
from vlmheads.offline import tiny_mllama_model, tiny_receipt_processor
from vlmheads.training.cards import ModelCardTrainer
from vlmheads.training.classification import (
    ClassificationMetrics,
    confusion_matrix,
    majority_class_row,
    print_confusion_matrix,
    save_confusion_matrix,
)
from vlmheads.training.runs import ScriptTrainingArguments, trainer_default
from vlmheads.training.tracking import log_report, prepare_tracking


@dataclass
class ReceiptArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A Mllama checkpoint (Hub id or folder). Unset: a tiny random Mllama built offline."},
    )
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Your photos, one folder per class (the folder names are the labels), or a Hub data set id with "
            "image and label columns. Unset: the synthetic receipt set."
        },
    )
    labels: list[str] | None = field(
        default=None,
        metadata={"help": "The class names in id order (default: the class folders, sorted). Must match the folders."},
    )
    num_synthetic: int = field(default=300, metadata={"help": "Size of the synthetic set (a multiple of 3)."})
    dataset_seed: int = field(default=0, metadata={"help": "Seed of the synthetic photos and of the held-out split."})
    eval_fraction: float = field(default=0.2, metadata={"help": "Share of the photos held out for evaluation."})
    pooling: str = field(
        default="vision", metadata={"help": '"vision" (image only) or "multimodal" (image + prompt).'}
    )
    question: str | None = field(default=None, metadata={"help": "The prompt's question with multimodal pooling."})
    classifier_hidden_dims: list[int] = field(
        default_factory=lambda: [768, 256], metadata={"help": "Widths of the head's hidden layers."}
    )
    classifier_dropout_rates: list[float] = field(
        default_factory=lambda: [0.2, 0.1], metadata={"help": "Dropout after each hidden layer, one rate per width."}
    )
    classifier_batch_norm: bool = field(
        default=True, metadata={"help": "Batch norm after each hidden layer (batches of 2 samples or more)."}
    )
    freeze_backbone: bool = field(default=False, metadata={"help": "Train only the head (and LoRA adapters)."})
    lora: bool = field(default=False, metadata={"help": "LoRA adapters on the text decoder; the head trains fully."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (with --lora)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scale numerator: updates scale by alpha / r."})
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA: nf4 text decoder (needs --lora)."})
    load_in_8bit: bool = field(default=False, metadata={"help": "8-bit text decoder (needs --lora)."})
    tile_size: int = field(default=32, metadata={"help": "Tile size of the tiny offline model, in pixels."})


@dataclass
class ReceiptTrainingArguments(ScriptTrainingArguments):
    """`TrainingArguments` with defaults that train the tiny offline model in seconds; pass your own for real ones."""

    num_train_epochs: float = trainer_default("num_train_epochs", 8)
    per_device_train_batch_size: int = trainer_default("per_device_train_batch_size", 16)
    learning_rate: float = trainer_default("learning_rate", 1e-3)
    logging_steps: float = trainer_default("logging_steps", 10)
    save_strategy: str = trainer_default("save_strategy", "no")
    # The collator reads the `image` column, which the Trainer would otherwise drop as unknown to forward().
    remove_unused_columns: bool = trainer_default("remove_unused_columns", False)


class ReceiptCollator:
    """Turns dataset rows (`image`, `label`) into a batch: tiled images, the prompt when the head reads the
    decoder, and `labels` (B,)."""

    def __init__(self, processor: ReceiptVLProcessor, pooling: str, question: str | None):
        self.processor = processor
        self.prompt = processor.classification_prompt(question) if pooling == "multimodal" else None

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        text = None if self.prompt is None else [self.prompt] * len(examples)
        return self.processor(
            images=[example["image"] for example in examples],
            text=text,
            labels=[example["label"] for example in examples],
            padding=True,
            return_tensors="pt",
        )


def load_data(args: ReceiptArguments):
    """Training and held-out photos (stratified split) and the class names in id order."""
    if args.data_dir is None:
        if args.labels and list(args.labels) != list(RECEIPT_CLASSES):
            raise ValueError(f"--labels {args.labels} need --data_dir: the synthetic classes are {RECEIPT_CLASSES}.")
        dataset = synthetic_receipts(args.num_synthetic, seed=args.dataset_seed)
    else:
        dataset = load_image_folder(args.data_dir, args.labels)
    train, held_out = random_split(dataset, args.eval_fraction, seed=args.dataset_seed)
    return train, held_out, dataset.features["label"].names


def build_model(args: ReceiptArguments, training_args: TrainingArguments, class_names: list[str]):
    checkpoint = args.model_name_or_path
    if checkpoint is None:
        # Stands in for a downloaded Mllama checkpoint: saved once, then loaded like the real one.
        checkpoint = str(Path(training_args.output_dir) / "tiny-mllama")
        with training_args.main_process_first():
            if not (Path(checkpoint) / "config.json").exists():
                tiny = tiny_receipt_processor(tile_size=args.tile_size)
                tiny_mllama_model(tiny, seed=training_args.seed).save_pretrained(checkpoint)
                MllamaProcessor(tiny.image_processor, tiny.tokenizer).save_pretrained(checkpoint)
    processor = ReceiptVLProcessor.from_pretrained(
        checkpoint, id2label=dict(enumerate(class_names)), **({"question": args.question} if args.question else {})
    )

    # peft imports bitsandbytes, whose CPU backend warns on import: load it when LoRA or quantization is asked for.
    if args.lora or args.load_in_4bit or args.load_in_8bit:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    compute_dtype = torch.bfloat16 if training_args.bf16 else torch.float32
    quantization = None
    if args.load_in_4bit:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    elif args.load_in_8bit:
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    model = ReceiptVLClassifier.from_pretrained(
        checkpoint,
        quantization_config=quantization,
        dtype=compute_dtype,
        pooling=args.pooling,
        classifier_hidden_dims=args.classifier_hidden_dims,
        classifier_dropout_rates=args.classifier_dropout_rates,
        classifier_batch_norm=args.classifier_batch_norm,
        **processor.model_config_kwargs(),
    )
    if args.pooling == "vision":
        # The head reads the projected vision tokens: the decoder gets no gradient, so keep it out of the optimizer.
        model.model.language_model.requires_grad_(False)
        model.lm_head.requires_grad_(False)
    if args.freeze_backbone:
        model.model.requires_grad_(False)
    if quantization is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=training_args.gradient_checkpointing)
    if args.lora:
        lora = LoraConfig(
            r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.05, **ReceiptVLClassifier.lora_config_kwargs()
        )
        model = get_peft_model(model, lora)
    return model, processor


def main() -> None:
    parser = HfArgumentParser(
        (ReceiptArguments, ReceiptTrainingArguments),
        description=__doc__.split("\n\n")[0]
        + " Data schema: vlmheads.data.receipts.load_image_folder (one folder per class).",
    )
    args, training_args = parser.parse_args_into_dataclasses()
    if (args.load_in_4bit or args.load_in_8bit) and not args.lora:
        raise ValueError("A quantized decoder trains through LoRA adapters: add --lora to --load_in_4bit/8bit.")
    if args.load_in_4bit and training_args.use_cpu and training_args.eval_strategy != IntervalStrategy.NO:
        raise ValueError(
            "On the CPU, bitsandbytes 0.50 repacks 4-bit weights at the first evaluation forward and training "
            "through them breaks afterwards: keep --eval_strategy no (the script evaluates after training) or use "
            "a GPU."
        )
    train_set, eval_set, class_names = load_data(args)
    model, processor = build_model(args, training_args, class_names)
    compute_metrics = ClassificationMetrics(len(class_names))

    prepare_tracking(training_args)
    trainer = ModelCardTrainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=ReceiptCollator(processor, args.pooling, args.question),
        compute_metrics=compute_metrics,
        processing_class=processor,
    )
    if trainer.is_world_process_zero():
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(
            f"{type(model).__name__}: {trainable:,} trainable parameters; {len(train_set)} training and "
            f"{len(eval_set)} held-out photos; {training_args.world_size} process(es)"
        )
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    prediction = trainer.predict(eval_set)
    if not trainer.is_world_process_zero():
        return

    predicted = np.argmax(prediction.predictions, axis=-1)
    references = prediction.label_ids
    majority = majority_rate(np.asarray(train_set["label"]))
    metrics = {
        "fine-tuned": compute_metrics.compute(predicted, references),
        "majority class": majority_class_row(compute_metrics, train_set["label"], references),
    }
    output_dir = Path(training_args.output_dir)
    confusion = confusion_matrix(references, predicted, len(class_names))
    save_confusion_matrix(confusion, class_names, output_dir / "confusion_matrix.png")

    quantized = args.load_in_4bit or args.load_in_8bit
    if args.lora and not quantized:
        classifier = model.merge_and_unload()  # exact in full precision: the folder is a plain classifier
        classifier.save_pretrained(output_dir)
    elif args.lora:
        # Merging into a quantized decoder would round the adapters away: keep them, with the trained head.
        classifier = model.get_base_model()
        model.save_pretrained(output_dir)
    else:
        classifier = model
        classifier.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    datasets = [args.data_dir or "synthetic receipts"]
    classifier.write_model_card(
        output_dir, metrics=metrics, model_row="fine-tuned", datasets=datasets, images=["confusion_matrix.png"]
    )
    trainer.save_metrics("train", train_result.metrics)
    trainer.save_metrics("eval", metrics)
    log_report(trainer, metrics, [output_dir / "confusion_matrix.png"])

    print_confusion_matrix(confusion, class_names)
    print(
        f"held-out accuracy: {metrics['fine-tuned']['accuracy']:.3f} (majority class of the training set: "
        f"{majority:.3f}), macro-F1: {metrics['fine-tuned']['macro_f1']:.3f}"
    )
    saved = "LoRA adapters with the head" if quantized else "model"
    print(f"Saved the {saved}, processor, model card and confusion matrix to {output_dir}")
    if quantized:
        print(
            "Reload: PeftModel.from_pretrained(ReceiptVLClassifier.from_pretrained(<checkpoint>, quantization_config="
            f"<the same>, pooling={args.pooling!r}, classifier_hidden_dims={args.classifier_hidden_dims}, "
            f"classifier_dropout_rates={args.classifier_dropout_rates}, classifier_batch_norm="
            f"{args.classifier_batch_norm}, **processor.model_config_kwargs()), "
            f"{str(output_dir)!r})"
        )
    if training_args.push_to_hub:
        trainer.model = model if quantized else classifier  # what the folder holds
        trainer.push_to_hub()  # the vlmheads card above, not the Trainer's generic one


if __name__ == "__main__":
    main()
