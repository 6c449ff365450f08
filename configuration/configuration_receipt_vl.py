"""Configuration of the receipt classifier on Mllama (Llama-3.2-Vision)."""

from huggingface_hub.dataclasses import strict
from transformers import MllamaConfig

from .configuration_classifier import ClassifierConfigMixin
from .remote_code import SelfContainedCodeMixin

RECEIPT_COUNT_LABELS = {0: "0", 1: "1", 2: "2 or more"}


@strict
class ReceiptVLConfig(SelfContainedCodeMixin, ClassifierConfigMixin, MllamaConfig):
    r"""
    Configuration of [`ReceiptVLClassifier`]: a Mllama configuration plus the classification head of
    [`ClassifierConfigMixin`] (`pooling`, `classifier_hidden_dims`, `classifier_dropout_rates`,
    `classifier_batch_norm`, `classifier_activation`). Without `id2label`, `label2id` or `num_labels`, the classes
    are the receipt counts `"0"`, `"1"` and `"2 or more"`.

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
    auto_classes = ("AutoConfig",)

    base_model: str | None = None

    def __post_init__(self, **kwargs):
        # A plain Mllama config.json says "mllama"; this class's own type must stay.
        kwargs.pop("model_type", None)
        if self.id2label is None and self.label2id is None and kwargs.get("num_labels") is None:
            self.id2label = dict(RECEIPT_COUNT_LABELS)
        super().__post_init__(**kwargs)
