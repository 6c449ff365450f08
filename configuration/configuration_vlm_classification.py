"""Configuration of `VLMForImageClassification`: a classification head on a VLM backbone of any registered family."""

from huggingface_hub.dataclasses import strict

from ..modeling.heads import check_classifier_settings, default_dropout_rates
from .configuration_vlm_heads import VLMHeadConfig
from .constants import HEAD_CLASSIFICATION


@strict
class VLMClassificationConfig(VLMHeadConfig):
    r"""
    Configuration of [`VLMForImageClassification`]: the backbone's configuration (`backbone_config`) plus the
    classification head, the receipt classifier's head on any family. Set the classes with `num_labels` or
    `id2label` (default: 2 classes).

    pooling (`str`, *optional*, defaults to `"vision"`):
        What the head reads. `"vision"`: the masked mean of the projected image features (image only; the language
        model does not run). `"multimodal"`: the language model's last hidden state at the last non-padding token
        of the prompt, which holds the image tokens (for Florence-2: the encoder's).
    classifier_hidden_dims (`list[int]`, *optional*, defaults to `[768, 256]`):
        Widths of the head's hidden layers; empty gives one `Linear(H, num_labels)`.
    classifier_dropout_rates (`list[float]`, *optional*, defaults to `[0.2, 0.1]`):
        Dropout after each hidden layer, one rate per entry of `classifier_hidden_dims`; unset, 0.2 after the first
        and 0.1 after the others.
    classifier_batch_norm (`bool`, *optional*, defaults to `True`):
        Batch normalisation after each hidden linear layer (training batches then need 2 samples or more).
    classifier_activation (`str`, *optional*, defaults to `"gelu"`):
        Activation after each hidden layer, one of transformers' activations.

    Example:

    ```python
    >>> from vlmheads import VLMClassificationConfig, tiny_vlm_config

    >>> config = VLMClassificationConfig(backbone_config=tiny_vlm_config("llava"), num_labels=3, pooling="multimodal")
    >>> config.hidden_size
    64
    ```
    """

    model_type = "vlm_classification"
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
        super().__post_init__(**kwargs)
        self.check_classifier_settings()

    def check_classifier_settings(self) -> None:
        """Raises a `ValueError` naming the first invalid classification setting."""
        check_classifier_settings(self)
