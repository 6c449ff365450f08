"""The classification-head settings shared by the receipt classifier and `VLMForImageClassification`, and their
labels, completed and checked the way transformers' `PretrainedConfig` treats them.

Imports only the standard library and the other configuration files: configurations import no torch.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .constants import HEAD_CLASSIFICATION

POOLINGS = ("vision", "multimodal")
"""What a classification head reads: the mean projected image token, or the sequence state at the last token."""


def default_dropout_rates(hidden_dims: Sequence[int]) -> list[float]:
    """The classifier's default dropout: 0.2 after the first hidden layer, 0.1 after the others."""
    return [0.2, *[0.1] * (len(hidden_dims) - 1)][: len(hidden_dims)]


def label2id_of(id2label: dict) -> dict[str, int]:
    """`label2id` completing `id2label`, as `PretrainedConfig.num_labels` builds it: `{0: "cat"}` → `{"cat": 0}`."""
    return {label: int(index) for index, label in id2label.items()}


def id2label_of(label2id: dict) -> dict[int, str]:
    """`id2label` completing `label2id`: `{"cat": 0}` → `{0: "cat"}`."""
    return {int(index): label for label, index in label2id.items()}


@dataclass(kw_only=True, repr=False)
class ClassifierConfigMixin:
    r"""
    The classification-head settings: mix in before the transformers configuration class. Set the classes with
    `num_labels`, `id2label` or `label2id`: either map alone is completed with its inverse, as
    `PretrainedConfig.num_labels` does, also when it is assigned later (`config.id2label = {...}`); a pair that
    disagrees is refused at construction and at `save_pretrained`.

    pooling (`str`, *optional*, defaults to `"vision"`):
        What the head reads. `"vision"`: the masked mean of the projected image features (image only; the language
        model does not run). `"multimodal"`: the language model's last hidden state at the last non-padding token
        of the prompt, which holds the image (for Florence-2: the encoder's; for Mllama: after cross-attention).
    classifier_hidden_dims (`list[int]`, *optional*, defaults to `[768, 256]`):
        Widths of the head's hidden layers; empty gives one `Linear(H, num_labels)`.
    classifier_dropout_rates (`list[float]`, *optional*, defaults to `[0.2, 0.1]`):
        Dropout after each hidden layer, one rate per entry of `classifier_hidden_dims`; unset, 0.2 after the first
        and 0.1 after the others.
    classifier_batch_norm (`bool`, *optional*, defaults to `True`):
        Batch normalisation after each hidden linear layer (training batches then need 2 samples or more).
    classifier_activation (`str`, *optional*, defaults to `"gelu"`):
        Activation after each hidden layer, one of transformers' activations (checked when the model is built).
    """

    head_kind = HEAD_CLASSIFICATION
    # The Trainer hands every other output to `compute_metrics`: keep only the logits.
    keys_to_ignore_at_inference = ["pooled_features", "hidden_states", "attentions"]

    pooling: str = "vision"
    classifier_hidden_dims: list[int] | None = None
    classifier_dropout_rates: list[float] | None = None
    classifier_batch_norm: bool = True
    classifier_activation: str = "gelu"

    def __post_init__(self, **kwargs):
        if self.classifier_hidden_dims is None:
            self.classifier_hidden_dims = [768, 256]
        if self.classifier_dropout_rates is None:
            self.classifier_dropout_rates = default_dropout_rates(self.classifier_hidden_dims)
        if self.id2label is None and self.label2id is not None:
            self.id2label = id2label_of(self.label2id)
        super().__post_init__(**kwargs)
        if self.label2id is None:
            # Past the label hook of `__setattr__`: a duplicate label must reach the check, not shrink id2label.
            super().__setattr__("label2id", label2id_of(self.id2label))
        self.check_classifier_settings()

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        # After construction, one map assigned alone brings its inverse along (`from_pretrained(..., id2label=...)`
        # assigns it so too); during construction `__post_init__` completes and checks the pair.
        if name in ("id2label", "label2id") and value is not None and self.__dict__.get("_post_init_done"):
            if name == "id2label":
                super().__setattr__("id2label", {int(index): label for index, label in value.items()})
                super().__setattr__("label2id", label2id_of(self.id2label))
            else:
                super().__setattr__("id2label", id2label_of(self.label2id))

    def check_classifier_settings(self) -> None:
        """Raises a `ValueError` naming the first invalid classification setting.

        Runs at construction, at `save_pretrained`, and when a model is built, because `from_pretrained(...,
        **kwargs)` sets attributes after construction.
        """
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}.")
        if self.num_labels < 2:
            raise ValueError(f"A classifier needs at least 2 labels, got num_labels={self.num_labels}.")
        if sorted(self.id2label) != list(range(self.num_labels)):
            raise ValueError(
                f"id2label keys must be the ids 0 ... {self.num_labels - 1}, got {sorted(self.id2label)}."
            )
        expected_label2id = {label: index for index, label in self.id2label.items()}
        if len(expected_label2id) != self.num_labels:
            raise ValueError(f"id2label must name each class differently, got {self.id2label}.")
        if {str(label): int(index) for label, index in self.label2id.items()} != expected_label2id:
            raise ValueError(
                f"label2id {self.label2id} is not the inverse of id2label {self.id2label}: give one of them (the "
                "other is completed) or both matching."
            )
        if any(width < 1 for width in self.classifier_hidden_dims):
            raise ValueError(f"classifier_hidden_dims must hold positive widths, got {self.classifier_hidden_dims}.")
        if len(self.classifier_dropout_rates) != len(self.classifier_hidden_dims):
            raise ValueError(
                f"classifier_dropout_rates needs one rate per hidden layer: {len(self.classifier_hidden_dims)} "
                f"for classifier_hidden_dims={self.classifier_hidden_dims}, got {self.classifier_dropout_rates}."
            )
        if any(not 0 <= rate < 1 for rate in self.classifier_dropout_rates):
            raise ValueError(f"classifier_dropout_rates must lie in [0, 1), got {self.classifier_dropout_rates}.")
        if not isinstance(self.classifier_activation, str) or not self.classifier_activation:
            raise ValueError(f"classifier_activation must name an activation, got {self.classifier_activation!r}.")

    def save_pretrained(self, save_directory: str | Path, *args, **kwargs):
        self.check_classifier_settings()
        return super().save_pretrained(save_directory, *args, **kwargs)
