"""The classification head shared by `ReceiptVLClassifier` and `VLMForImageClassification`: the head, its label
checks, its loss and its one output class. Each model pools its own features (B, H); the mixin does the rest.

Imports only torch, transformers and the other model-side files: this file ships as remote code.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.nn import functional as F
from transformers.modeling_outputs import ImageClassifierOutput

from ..configuration.constants import HEAD_CLASSIFICATION, TASK_IMAGE_CLASSIFICATION
from .heads import ClassificationHead, check_activations, check_tensor


@dataclass
class VLMClassifierOutput(ImageClassifierOutput):
    r"""
    pooled_features (`torch.FloatTensor` of shape `(B, H)`):
        What the head read: the mean projected image feature (`pooling="vision"`) or the backbone's hidden state at
        the last non-padding token (`pooling="multimodal"`).
    """

    pooled_features: torch.FloatTensor | None = None


class ClassifierMixin:
    """The classification head on pooled features: mix in before the model's base class, build the head with
    `build_classifier` in `__init__`, end `forward` with `classify`."""

    head_kind = HEAD_CLASSIFICATION
    pipeline_tag = TASK_IMAGE_CLASSIFICATION
    # The cross-entropy is a per-batch mean: the Trainer must average it over gradient accumulation itself.
    accepts_loss_kwargs = False
    head_modules: ClassVar[tuple[str, ...]] = ("classifier",)

    def build_classifier(self, hidden_size: int) -> None:
        """Sets `self.classifier`: the configured MLP from the pooled width H to `num_labels` logits."""
        config = self.config
        config.check_classifier_settings()
        check_activations(config, ("classifier_activation",))
        self.classifier = ClassificationHead(
            hidden_size,
            config.classifier_hidden_dims,
            config.num_labels,
            config.classifier_dropout_rates,
            config.classifier_batch_norm,
            config.classifier_activation,
        )

    def check_labels(self, labels: torch.LongTensor | None, batch_size: int | None) -> None:
        """Raises a `ValueError` unless `labels` is None or class ids (B,) in `[0, num_labels)`."""
        if labels is None:
            return
        check_tensor("labels", labels, (batch_size,), "(B,)")
        if labels.is_floating_point() or labels.min() < 0 or labels.max() >= self.config.num_labels:
            raise ValueError(
                f"labels must be class ids in [0, {self.config.num_labels}) of {self.config.id2label}, "
                f"got {labels.tolist()}."
            )

    def classify(
        self, pooled: torch.Tensor, labels: torch.LongTensor | None = None, **outputs: torch.Tensor | None
    ) -> VLMClassifierOutput:
        """Logits (B, num_labels) of the pooled features (B, H), the cross-entropy with `labels` (B,), and the
        backbone's `outputs` (`hidden_states`, `attentions`) passed through."""
        logits = self.classifier(pooled)
        loss = None if labels is None else F.cross_entropy(logits.float(), labels.to(logits.device))
        return VLMClassifierOutput(loss=loss, logits=logits, pooled_features=pooled, **outputs)
