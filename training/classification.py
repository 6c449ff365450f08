"""Training helpers for the image classifiers (the receipt classifier and `VLMForImageClassification` on any
family): the batch collator, Trainer metrics, the majority-class row and the confusion-matrix plot."""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import EvalPrediction, ProcessorMixin

from ..metrics import load_metric
from ..modeling.families import VLMFamily
from ..processing.image_inputs import open_image
from ..processing.pipeline_inputs import user_prompt


class ClassificationMetrics:
    """`compute_metrics` for the Trainer: held-out `accuracy` and `macro_f1` (local evaluate modules)."""

    def __init__(self, num_labels: int):
        self.num_labels = num_labels
        self.accuracy, self.macro_f1 = load_metric("accuracy"), load_metric("macro_f1")

    def compute(self, predicted: np.ndarray, references: np.ndarray) -> dict[str, float]:
        """Accuracy and macro-F1 of class ids `predicted` (N,) against `references` (N,)."""
        return {
            **self.accuracy.compute(predictions=predicted, references=references),
            "macro_f1": self.macro_f1.compute(
                predictions=predicted, references=references, num_labels=self.num_labels
            )["macro_f1"],
        }

    def __call__(self, prediction: EvalPrediction) -> dict[str, float]:
        return self.compute(np.argmax(prediction.predictions, axis=-1), prediction.label_ids)


def majority_class_row(metrics: ClassificationMetrics, train_labels: Sequence[int], references: np.ndarray) -> dict:
    """The figures of always answering the training set's most frequent class, on `references` (N,)."""
    majority = int(np.bincount(np.asarray(train_labels)).argmax())
    return metrics.compute(np.full_like(references, majority), references)


def confusion_matrix(references: np.ndarray, predicted: np.ndarray, num_labels: int) -> np.ndarray:
    """Counts (num_labels, num_labels): rows are true classes, columns predicted ones."""
    confusion = np.zeros((num_labels, num_labels), dtype=int)
    np.add.at(confusion, (references, predicted), 1)
    return confusion


def save_confusion_matrix(confusion: np.ndarray, class_names: Sequence[str], path: Path) -> None:
    """The confusion matrix as a PNG, with the counts written in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    side = max(4.0, 0.6 * len(class_names) + 2)
    figure, axes = plt.subplots(figsize=(side, side - 0.5))
    axes.imshow(confusion, cmap="Blues")
    for (row, column), count in np.ndenumerate(confusion):
        colour = "white" if count > confusion.max() / 2 else "black"
        axes.text(column, row, str(count), ha="center", va="center", color=colour)
    axes.set(
        xticks=range(len(class_names)),
        yticks=range(len(class_names)),
        xticklabels=class_names,
        yticklabels=class_names,
        xlabel="predicted",
        ylabel="true",
        title="Held-out confusion matrix",
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def print_confusion_matrix(confusion: np.ndarray, class_names: Sequence[str]) -> None:
    width = max(11, *(len(name) + 2 for name in class_names))
    print("Held-out confusion matrix (rows: true, columns: predicted):")
    print(" " * (width + 4) + "".join(f"{name:>{width}}" for name in class_names))
    for name, row in zip(class_names, confusion, strict=True):
        print(f"    {name:>{width}}" + "".join(f"{count:>{width}}" for count in row))


class ImageClassificationCollator:
    """Rows (`image`, `label`) → a batch for `VLMForImageClassification` of any family.

    `pooling="vision"`: the family's image-processor outputs (`family.image_inputs`), as transformers'
    image-classification pipeline gives them. `pooling="multimodal"`: each image put into the family's prompt with
    `prompt` (its chat template, or the bare text), through the processor. Adds `labels` (B,).
    """

    def __init__(self, processor: ProcessorMixin, family: VLMFamily, pooling: str, prompt: str = ""):
        self.processor, self.family, self.pooling = processor, family, pooling
        self.text = user_prompt(processor, prompt, num_images=1) if pooling == "multimodal" else None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images = [[open_image(example["image"], f"image of row {index}")] for index, example in enumerate(examples)]
        if self.text is None:
            outputs = self.processor.image_processor(images=images, return_tensors="pt")
            batch = {name: outputs[name] for name in (*self.family.image_inputs, "num_patches") if name in outputs}
        else:
            batch = dict(
                self.processor(images=images, text=[self.text] * len(examples), padding=True, return_tensors="pt")
            )
            # PaliGemma's processor adds next-token labels of the prompt; the classifier's labels are class ids.
            batch.pop("labels", None)
        batch["labels"] = torch.tensor([example["label"] for example in examples], dtype=torch.long)
        return batch
