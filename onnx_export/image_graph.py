"""Vision graph of families whose processor returns whole images or tiles per sample (SmolVLM), and the head graph
of a `pooling="vision"` classifier on them.

The processor gives each image input (the family table's `image_inputs`, e.g. `pixel_values` (B, T, 3, S, S) and
`pixel_attention_mask` (B, T, S, S)) with an images-per-sample axis; padding images are all zeros. The graph reads
the real images flattened to one axis, any number N of them, (N, 3, S, S) and (N, S, S), and returns their
embeddings (N * tokens, hidden) in order, exactly what the family's `get_image_features` splices into the prompt.
The host drops padding images before the call (`vision_runtime.ImageFeatureEncoder`).
"""

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import PreTrainedModel, ProcessorMixin

from ..configuration.constants import HEAD_GENERATION
from ..modeling.capabilities import head_kind_of
from ..modeling.families import VLMFamily
from .vision import module_in_dtype, torch_dtype

IMAGE_OUTPUT = "image_embeds"
POOLED_INPUT = "pooled_features"
LOGITS_OUTPUT = "logits"
# Real images in the traced example: the number must not be 0 or 1 for a dynamic axis.
EXAMPLE_IMAGES = 3


def backbone_of(model: PreTrainedModel) -> PreTrainedModel:
    """The VLM a model runs on: itself for a plain backbone, `model.backbone` for a head model."""
    return model if head_kind_of(model) == HEAD_GENERATION else model.backbone


class ImageFeaturesGraph(nn.Module):
    """Real images as one axis, each image input (N, ...) → `get_image_features` of a batch of one sample holding
    them → (N * tokens, hidden)."""

    def __init__(self, backbone: PreTrainedModel, input_names: tuple[str, ...]):
        super().__init__()
        self.backbone = backbone
        self.input_names = input_names

    def forward(self, *image_inputs: torch.Tensor) -> torch.Tensor:
        inputs = {name: tensor[None] for name, tensor in zip(self.input_names, image_inputs, strict=True)}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.backbone.dtype)
        return self.backbone.model.get_image_features(**inputs).pooler_output[0]


def _example_inputs(processor: ProcessorMixin, family: VLMFamily) -> dict[str, torch.Tensor]:
    """The processor's image inputs for one random image, flattened to (N, ...) real images."""
    pixels = np.random.default_rng(0).integers(0, 256, (96, 80, 3), dtype=np.uint8)
    outputs = processor.image_processor(images=[[Image.fromarray(pixels)]], return_tensors="pt")
    inputs = {}
    for name in family.image_inputs:
        value = outputs[name]
        if value.ndim < 3:
            raise ValueError(
                f"{family.name}'s {name} has shape {tuple(value.shape)}; the per-image vision graph takes image "
                "inputs with an images-per-sample axis (B, images, ...)."
            )
        inputs[name] = value.flatten(0, 1)
    count = len(inputs["pixel_values"])
    repeats = -(-EXAMPLE_IMAGES // count)
    return {name: value.repeat(repeats, *[1] * (value.ndim - 1))[:EXAMPLE_IMAGES] for name, value in inputs.items()}


def export_image_features_graph(
    model: PreTrainedModel, family: VLMFamily, processor: ProcessorMixin, path: Path, dtype: str
) -> dict[str, Any]:
    """Exports the image features of `model`'s backbone (see the module docstring) to `path`; returns the manifest
    entry with `layout: "images"`, the image inputs, `tokens_per_image` and `hidden_size`."""
    from .export import export_graph

    backbone = module_in_dtype(backbone_of(model), torch_dtype(dtype))
    example = _example_inputs(processor, family)
    names = tuple(example)
    graph = ImageFeaturesGraph(backbone, names)
    with torch.no_grad():
        embeddings = graph(*example.values())
    entry = export_graph(
        graph,
        tuple(example.values()),
        (tuple({0: "images"} for _ in names),),
        list(names),
        [IMAGE_OUTPUT],
        Path(path),
    )
    return {
        **entry,
        "layout": "images",
        "image_inputs": list(names),
        "tokens_per_image": int(embeddings.shape[0]) // EXAMPLE_IMAGES,
        "hidden_size": int(embeddings.shape[1]),
        "dtype": dtype,
    }


class ClassifierHeadGraph(nn.Module):
    """A classifier's head: the pooled image feature (B, H) → logits (B, num_labels) float32."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, pooled_features: torch.Tensor) -> torch.Tensor:
        return self.classifier(pooled_features).float()


def export_classifier_head_graph(model: PreTrainedModel, path: Path, dtype: str) -> dict[str, Any]:
    """Exports `model.classifier` (a `pooling="vision"` head) to `path`; returns the manifest entry with
    `num_labels` and `id2label`. The host pools: the mean of a sample's image embeddings, as `masked_mean` does."""
    from .export import export_graph

    head = module_in_dtype(model.classifier, torch_dtype(dtype))
    hidden_size = model.config.hidden_size
    example = torch.randn(2, hidden_size, dtype=torch_dtype(dtype))
    entry = export_graph(
        ClassifierHeadGraph(head), (example,), ({0: "batch"},), [POOLED_INPUT], [LOGITS_OUTPUT], Path(path)
    )
    return {
        **entry,
        "num_labels": int(model.config.num_labels),
        "id2label": {str(index): label for index, label in model.config.id2label.items()},
    }
