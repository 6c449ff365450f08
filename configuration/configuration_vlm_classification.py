"""Configuration of `VLMForImageClassification`: a classification head on a VLM backbone of any registered family."""

from huggingface_hub.dataclasses import strict

from .configuration_classifier import ClassifierConfigMixin
from .configuration_vlm_heads import VLMHeadConfig


@strict
class VLMClassificationConfig(ClassifierConfigMixin, VLMHeadConfig):
    r"""
    Configuration of [`VLMForImageClassification`]: the backbone's configuration (`backbone_config`) plus the
    classification head of [`ClassifierConfigMixin`] (`pooling`, `classifier_hidden_dims`,
    `classifier_dropout_rates`, `classifier_batch_norm`, `classifier_activation`), the receipt classifier's head on
    any family. Set the classes with `num_labels`, `id2label` or `label2id` (default: 2 classes).

    Example:

    ```python
    >>> from vlmheads import VLMClassificationConfig, tiny_vlm_config

    >>> config = VLMClassificationConfig(backbone_config=tiny_vlm_config("llava"), num_labels=3, pooling="multimodal")
    >>> config.hidden_size
    64
    ```
    """

    model_type = "vlm_classification"
