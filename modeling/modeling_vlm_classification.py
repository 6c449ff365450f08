"""`VLMForImageClassification`: the receipt classifier's head on any registered VLM family.

Imports only torch, transformers and the other model-side files: this file ships as remote code.
"""

import torch
from transformers import PreTrainedModel
from transformers.utils import can_return_tuple

from ..configuration.configuration_vlm_classification import VLMClassificationConfig
from ..configuration.constants import TASK_IMAGE_CLASSIFICATION
from .heads import last_token_state, masked_mean
from .modeling_classifier import ClassifierMixin, VLMClassifierOutput
from .modeling_vlm_heads import (
    DelegatedGeneration,
    VLMHeadPreTrainedModel,
    batch_size_of,
    check_image_tokens,
    image_features,
    sequence_states,
)


class VLMForImageClassification(ClassifierMixin, DelegatedGeneration, VLMHeadPreTrainedModel):
    """Image (+ prompt) classification on any registered VLM family: the receipt classifier's head generalised.

    `pooling="vision"`: images → `image_features` (B, N, H) → masked mean (B, H) → head → logits (B, num_labels);
    the language model does not run. `pooling="multimodal"`: the prompt with its image tokens → `sequence_states`
    (B, L, H) → state at the last non-padding token (B, H) → head. `generate()` answers in text with the backbone.
    """

    config: VLMClassificationConfig
    config_class = VLMClassificationConfig
    auto_classes = ("AutoModel", "AutoModelForImageClassification")
    model_card_template = "vlm_classification.md"
    model_card_tags = ("image-classification",)

    def __init__(self, config: VLMClassificationConfig, backbone: PreTrainedModel | None = None):
        config.check_classifier_settings()
        super().__init__(config, backbone)
        if config.pooling == "multimodal":
            # The head reads a prompt: the folder ships a pipeline that builds it. A "vision" head needs none:
            # transformers' own image-classification pipeline feeds it the image processor's outputs.
            self.pipelines = {
                TASK_IMAGE_CLASSIFICATION: "..processing.pipeline_vlm_classification.VLMImageClassificationPipeline"
            }
        self.build_classifier(config.hidden_size)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **backbone_inputs,
    ) -> VLMClassifierOutput:
        r"""
        pixel_values (`torch.FloatTensor`):
            The images as the family's processor returns them, with its other image inputs in `backbone_inputs`
            (e.g. `image_grid_thw`, `aspect_ratio_ids`, `pixel_attention_mask`). One image per sample.
        input_ids, attention_mask (`torch.LongTensor` of shape `(B, L)`, *optional*):
            The prompt with the family's image token; read by `pooling="multimodal"` only.
        labels (`torch.LongTensor` of shape `(B,)`, *optional*):
            Class ids in `[0, num_labels)`; adds the cross-entropy `loss`.
        backbone_inputs:
            The processor's other outputs (`mm_token_type_ids`, `cross_attention_mask`, `token_type_ids`, ...).

        Returns `logits` (B, num_labels), `pooled_features` (B, H) and, with `labels`, `loss`.
        """
        if pixel_values is None:
            raise ValueError("pixel_values are required: the classifier reads the image.")
        batch_size = batch_size_of(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        self.check_labels(labels, batch_size)
        if self.config.pooling == "vision":
            image_inputs = {name: backbone_inputs.get(name) for name in self.family.image_inputs}
            features, valid = image_features(self.backbone, **{**image_inputs, "pixel_values": pixel_values})
            if batch_size is not None and features.shape[0] != batch_size:
                raise ValueError(
                    f"The images give features for {features.shape[0]} images but the batch has {batch_size} "
                    'samples: pooling="vision" reads one image per sample.'
                )
            pooled = masked_mean(features, valid)
        else:
            if input_ids is None:
                raise ValueError(
                    'pooling="multimodal" reads the prompt: it needs input_ids holding the family\'s image token.'
                )
            check_image_tokens(self.config.backbone_config, input_ids, has_images=True)
            states = sequence_states(
                self.backbone,
                input_ids=input_ids,
                attention_mask=attention_mask,
                pixel_values=pixel_values,
                **backbone_inputs,
            )
            pooled = last_token_state(states, attention_mask)
        return self.classify(pooled, labels)
