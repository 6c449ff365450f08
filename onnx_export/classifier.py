"""One ONNX graph for the receipt classifier with `pooling="vision"`: the processor's pixel inputs → class logits.

pixel_values (B, I, T, 3, S, S), aspect_ratio_ids (B, I), aspect_ratio_mask (B, I, T) → Mllama vision tower →
projector → mean over the valid images, tiles and patches → head → logits (B, num_labels). The text decoder is not
part of the graph. Batch size and images per sample stay dynamic; tiles per image are the processor's
`max_image_tiles`. Input checks run in `classifier_runtime.ClassifierRunner`, outside the graph.
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..modeling.heads import masked_mean
from ..modeling.modeling_receipt_vl import ReceiptVLClassifier
from .vision import module_in_dtype, torch_dtype, trace_to_onnx

CLASSIFIER_FILE = "classifier.onnx"
CLASSIFIER_INPUTS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")
CLASSIFIER_OUTPUT = "logits"


class VisionPooledClassifier(nn.Module):
    """The `pooling="vision"` branch of `ReceiptVLClassifier.forward`: pixel inputs → logits (B, num_labels),
    float32 whatever the weights' dtype."""

    def __init__(self, classifier: ReceiptVLClassifier):
        super().__init__()
        self.classifier = classifier

    def forward(
        self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor, aspect_ratio_mask: torch.Tensor
    ) -> torch.Tensor:
        features, valid = self.classifier.vision_features(
            pixel_values.to(self.classifier.dtype), aspect_ratio_ids, aspect_ratio_mask
        )
        return self.classifier.classifier(masked_mean(features, valid)).float()


def export_classifier_graph(
    model: ReceiptVLClassifier, processor, out_dir: Path, image_size: tuple[int, int], dtype: str
) -> dict:
    """Exports `model` (a `ReceiptVLClassifier` with `pooling="vision"`) to `out_dir/classifier.onnx`, traced on
    the processor's output for one `image_size` (H, W) photo; any photo size runs, since the processor tiles it.

    Returns the manifest entry: file, external_data, inputs, outputs, image_size, max_image_tiles, tile_size,
    max_aspect_ratio_id, num_labels, id2label, dtype.
    """
    if not isinstance(model, ReceiptVLClassifier):
        raise ValueError(f"The classifier graph exports a ReceiptVLClassifier, got {type(model).__name__}.")
    if model.config.pooling != "vision":
        raise ValueError(
            f'Only pooling="vision" exports as one graph (pixels → logits); this model has '
            f"pooling={model.config.pooling!r}, whose head reads the text decoder."
        )
    height, width = image_size
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))
    example = processor(images=[[photo]], return_tensors="pt")
    graph = VisionPooledClassifier(module_in_dtype(model, torch_dtype(dtype)))
    per_sample = {0: "batch_size", 1: "images"}
    dynamic_axes = {name: per_sample for name in CLASSIFIER_INPUTS} | {CLASSIFIER_OUTPUT: {0: "batch_size"}}
    path = Path(out_dir) / CLASSIFIER_FILE
    external_data = trace_to_onnx(
        graph,
        tuple(example[name] for name in CLASSIFIER_INPUTS),
        path,
        CLASSIFIER_INPUTS,
        [CLASSIFIER_OUTPUT],
        dynamic_axes,
    )
    vision = model.config.vision_config
    return {
        "file": path.name,
        "external_data": external_data,
        "inputs": list(CLASSIFIER_INPUTS),
        "outputs": [CLASSIFIER_OUTPUT],
        "image_size": [int(height), int(width)],
        "max_image_tiles": int(example["pixel_values"].shape[2]),
        "tile_size": int(vision.image_size),
        "max_aspect_ratio_id": int(vision.max_aspect_ratio_id),
        "num_labels": int(model.config.num_labels),
        "id2label": {str(index): label for index, label in model.config.id2label.items()},
        "dtype": dtype,
    }
