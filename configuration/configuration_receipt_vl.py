"""Configuration of the receipt classifier on Mllama (Llama-3.2-Vision)."""

from huggingface_hub.dataclasses import strict
from transformers import MllamaConfig

from ..modeling.heads import check_classifier_settings, default_dropout_rates
from ..publishing import SelfContainedCodeMixin
from .constants import HEAD_CLASSIFICATION

RECEIPT_COUNT_LABELS = {0: "0", 1: "1", 2: "2 or more"}


@strict
class ReceiptVLConfig(SelfContainedCodeMixin, MllamaConfig):
    r"""
    Configuration of [`ReceiptVLClassifier`]: a Mllama configuration plus the classification head. Without
    `id2label` or `num_labels`, the classes are the receipt counts `"0"`, `"1"` and `"2 or more"`.

    pooling (`str`, *optional*, defaults to `"vision"`):
        What the head reads. `"vision"`: the masked mean of the projected vision tokens over the valid images,
        tiles and patches (image only; the text decoder does not run). `"multimodal"`: the text decoder's last
        hidden state at the last non-padding token, after cross-attending to the image (image + prompt).
    classifier_hidden_dims (`list[int]`, *optional*, defaults to `[768, 256]`):
        Widths of the head's hidden layers; empty gives one `Linear(H, num_labels)`.
    classifier_dropout_rates (`list[float]`, *optional*, defaults to `[0.2, 0.1]`):
        Dropout after each hidden layer, one rate per entry of `classifier_hidden_dims`; unset, 0.2 after the first
        and 0.1 after the others.
    classifier_batch_norm (`bool`, *optional*, defaults to `True`):
        Batch normalisation after each hidden linear layer (training batches then need 2 samples or more).
    classifier_activation (`str`, *optional*, defaults to `"gelu"`):
        Activation after each hidden layer, one of transformers' activations.
    base_model (`str`, *optional*):
        Hub id of the checkpoint the backbone weights came from, for the model card.

    Example:

    ```python
    >>> from vlmheads import ReceiptVLConfig

    >>> config = ReceiptVLConfig(pooling="multimodal", classifier_hidden_dims=[512], classifier_dropout_rates=[0.1])
    >>> config.id2label
    {0: '0', 1: '1', 2: '2 or more'}
    ```
    """

    model_type = "receipt_vl"
    head_kind = HEAD_CLASSIFICATION
    auto_classes = ("AutoConfig",)
    # The Trainer hands every other output to `compute_metrics`: keep only the logits.
    keys_to_ignore_at_inference = ["pooled_features", "hidden_states", "attentions"]

    pooling: str = "vision"
    classifier_hidden_dims: list[int] | None = None
    classifier_dropout_rates: list[float] | None = None
    classifier_batch_norm: bool = True
    classifier_activation: str = "gelu"
    base_model: str | None = None

    def __post_init__(self, **kwargs):
        # A plain Mllama config.json says "mllama"; this class's own type must stay.
        kwargs.pop("model_type", None)
        if self.id2label is None and kwargs.get("num_labels") is None:
            self.id2label = dict(RECEIPT_COUNT_LABELS)
        if self.classifier_hidden_dims is None:
            self.classifier_hidden_dims = [768, 256]
        if self.classifier_dropout_rates is None:
            self.classifier_dropout_rates = default_dropout_rates(self.classifier_hidden_dims)
        super().__post_init__(**kwargs)
        if self.label2id is None:
            self.label2id = {label: index for index, label in self.id2label.items()}
        self.check_classifier_settings()

    def check_classifier_settings(self) -> None:
        """Raises a `ValueError` naming the first invalid classification setting.

        Runs at construction, and again when a model is built, because `from_pretrained(..., **kwargs)` sets
        attributes after construction.
        """
        check_classifier_settings(self)
