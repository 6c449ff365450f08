"""Receipt classifier on Mllama (Llama-3.2-Vision): a classification head on pooled vision or decoder features.

`pooling="vision"`: pixel_values (B, I, T, 3, S, S) → vision model (B, I, T, P, D_v) → multi-modal projector
(B, I, T, P, H) → mean over the valid images, tiles and patches (B, H) → head → logits (B, num_labels). The text
decoder does not run.
`pooling="multimodal"`: the decoder reads the prompt and cross-attends to the image; its last hidden state at the
last non-padding token (B, H) → head.
The same weights answer questions about the image with `generate()`.
"""

import torch
from transformers import MllamaForConditionalGeneration
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.utils import can_return_tuple

from ..configuration.configuration_receipt_vl import ReceiptVLConfig
from ..publishing import ModelCardMixin
from .families import VLM_FAMILIES
from .heads import check_tensor, last_token_state, masked_mean, tiled_image_features
from .modeling_base import QuantizedLoadingMixin, SelfContainedModelMixin
from .modeling_classifier import ClassifierMixin, VLMClassifierOutput

# Mllama checkpoints keep legacy key names (`language_model.model.*`, `vision_model.*`); transformers renames them
# only for the classes it knows, so without this the backbone of a subclass would silently be re-initialised.
register_checkpoint_conversion_mapping(
    "ReceiptVLClassifier", get_checkpoint_conversion_mapping("mllama"), overwrite=True
)


# One output class for every classifier; the receipt name stays importable.
ReceiptVLClassifierOutput = VLMClassifierOutput


class ReceiptVLClassifier(
    ClassifierMixin, ModelCardMixin, SelfContainedModelMixin, QuantizedLoadingMixin, MllamaForConditionalGeneration
):
    """Mllama with a classification head: receipt photo (+ prompt) → class logits, and text answers via `generate()`.

    Loads every weight of a `MllamaForConditionalGeneration` checkpoint and initialises only `classifier`.
    """

    config: ReceiptVLConfig
    auto_classes = ("AutoModel", "AutoModelForImageClassification")
    model_card_template = "receipt_vl.md"
    model_card_tags = ("mllama", "receipts", "image-classification")
    # Kept in full precision by `from_pretrained(..., quantization_config=BitsAndBytesConfig(...))` when the config
    # names no `llm_int8_skip_modules`: only the text decoder is quantized (the family's skip list, and the head).
    quantization_skip_modules = (*VLM_FAMILIES["mllama"].quantization_skip_modules, *ClassifierMixin.head_modules)
    # LoRA on the text decoder only: `target_modules=["q_proj", "v_proj"]` would also match the vision tower.
    lora_target_modules = VLM_FAMILIES["mllama"].lora_target_regex

    def __init__(self, config: ReceiptVLConfig):
        config.check_classifier_settings()
        super().__init__(config)
        self.build_classifier(config.text_config.hidden_size)
        self.post_init()

    @classmethod
    def quantization_skip_modules_for(cls, pretrained_model_name_or_path, **kwargs) -> list[str]:
        return list(cls.quantization_skip_modules)

    @classmethod
    def lora_config_kwargs(cls) -> dict:
        """`target_modules` and `modules_to_save` for `peft.LoraConfig`: q/v projections of the text decoder, and
        the head trained in full: `LoraConfig(r=8, **ReceiptVLClassifier.lora_config_kwargs())`."""
        return {"target_modules": cls.lora_target_modules, "modules_to_save": list(cls.head_modules)}

    def vision_features(
        self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor, aspect_ratio_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The projected vision tokens and where they are valid: (B, I * T * P, H) and a mask (B, I * T * P).

        Padding images (`aspect_ratio_ids` 0) and padding tiles (`aspect_ratio_mask` 0) are masked out.
        """
        vision_model, projector = self.model.vision_model, self.model.multi_modal_projector
        return tiled_image_features(vision_model, projector, pixel_values, aspect_ratio_ids, aspect_ratio_mask)

    def _check_inputs(
        self,
        pixel_values: torch.Tensor | None,
        aspect_ratio_ids: torch.Tensor | None,
        aspect_ratio_mask: torch.Tensor | None,
        input_ids: torch.LongTensor | None,
        attention_mask: torch.Tensor | None,
        cross_attention_mask: torch.Tensor | None,
        labels: torch.LongTensor | None,
    ) -> None:
        given = {
            "pixel_values": pixel_values,
            "aspect_ratio_ids": aspect_ratio_ids,
            "aspect_ratio_mask": aspect_ratio_mask,
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "cross_attention_mask": cross_attention_mask,
            "labels": labels,
        }
        sizes = {name: tensor.shape[0] for name, tensor in given.items() if tensor is not None and tensor.ndim}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"The inputs disagree on the batch size: {sizes}.")
        for name in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"):
            if given[name] is None:
                raise ValueError(
                    f"{name} is required: the classifier reads the image (the processor returns pixel_values, "
                    "aspect_ratio_ids and aspect_ratio_mask)."
                )
        vision = self.config.vision_config
        size = vision.image_size
        check_tensor(
            "pixel_values",
            pixel_values,
            (None, None, None, vision.num_channels, size, size),
            "(B, images, tiles, channels, image_size, image_size)",
        )
        batch_size, num_images, num_tiles = pixel_values.shape[:3]
        if num_tiles > vision.max_num_tiles:
            raise ValueError(
                f"pixel_values hold {num_tiles} tiles per image; this model reads {vision.max_num_tiles}."
            )
        check_tensor("aspect_ratio_ids", aspect_ratio_ids, (batch_size, num_images), "(B, images)")
        check_tensor("aspect_ratio_mask", aspect_ratio_mask, (batch_size, num_images, num_tiles), "(B, images, tiles)")
        if aspect_ratio_ids.min() < 0 or aspect_ratio_ids.max() > vision.max_aspect_ratio_id:
            raise ValueError(
                f"aspect_ratio_ids must lie in [0, {vision.max_aspect_ratio_id}] (0: padding image), "
                f"got {aspect_ratio_ids.tolist()}."
            )
        images_per_sample = (aspect_ratio_ids != 0).sum(dim=1)
        if (images_per_sample == 0).any():
            raise ValueError(f"Every sample needs an image; images per sample: {images_per_sample.tolist()}.")

        if self.config.pooling == "multimodal":
            self._check_prompt(
                input_ids, attention_mask, cross_attention_mask, images_per_sample, num_images, num_tiles
            )
        self.check_labels(labels, batch_size)

    def _check_prompt(
        self,
        input_ids: torch.LongTensor | None,
        attention_mask: torch.Tensor | None,
        cross_attention_mask: torch.Tensor | None,
        images_per_sample: torch.Tensor,
        num_images: int,
        num_tiles: int,
    ) -> None:
        if input_ids is None or cross_attention_mask is None:
            raise ValueError(
                'pooling="multimodal" reads the decoder after it cross-attends to the image: it needs input_ids with '
                "a <|image|> prompt and the cross_attention_mask the processor returns with them."
            )
        batch_size, length = input_ids.shape
        if attention_mask is not None:
            check_tensor("attention_mask", attention_mask, (batch_size, length), "(B, L)")
        check_tensor(
            "cross_attention_mask",
            cross_attention_mask,
            (batch_size, length, num_images, num_tiles),
            "(B, L, images, tiles)",
        )
        image_tokens = (input_ids == self.config.image_token_id).sum(dim=1)
        mismatched = (image_tokens != images_per_sample).nonzero().flatten().tolist()
        if mismatched:
            index = mismatched[0]
            raise ValueError(
                f"Prompt {index} holds {int(image_tokens[index])} <|image|> tokens (id {self.config.image_token_id}) "
                f'for {int(images_per_sample[index])} images: with pooling="multimodal" every image needs its '
                "<|image|> token in the prompt."
            )

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        aspect_ratio_ids: torch.LongTensor | None = None,
        aspect_ratio_mask: torch.LongTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        language_modeling: bool = False,
        num_tiles: list[list[int]] | None = None,
        **kwargs,
    ) -> VLMClassifierOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(B, images, tiles, 3, image_size, image_size)`):
            The tiled images, as the processor returns them.
        aspect_ratio_ids (`torch.LongTensor` of shape `(B, images)`):
            Tile layout of each image; 0 marks a padding image.
        aspect_ratio_mask (`torch.LongTensor` of shape `(B, images, tiles)`):
            1 for real tiles, 0 for padding tiles.
        input_ids, attention_mask (`torch.LongTensor` of shape `(B, L)`, *optional*):
            The prompt, with one `<|image|>` per image; read by `pooling="multimodal"` only.
        cross_attention_mask (`torch.LongTensor` of shape `(B, L, images, tiles)`, *optional*):
            Which tiles each token attends to; required with `pooling="multimodal"`.
        labels (`torch.LongTensor` of shape `(B,)`, *optional*):
            Class ids in `[0, num_labels)`; adds the cross-entropy `loss`.
        language_modeling (`bool`, *optional*, defaults to `False`):
            Run `MllamaForConditionalGeneration.forward` instead: next-token `logits` (B, L, vocab) and, with token
            `labels` (B, L), the language-model loss. `generate()` sets it.
        num_tiles (`list[list[int]]`, *optional*):
            Returned by the image processor (the image-classification pipeline passes it on); the tile counts are
            already in `aspect_ratio_mask`, so it is not read.

        Returns `logits` (B, num_labels), `pooled_features` (B, H) and, with `labels`, `loss`.
        """
        mllama_inputs = {
            "input_ids": input_ids,
            "pixel_values": pixel_values,
            "aspect_ratio_mask": aspect_ratio_mask,
            "aspect_ratio_ids": aspect_ratio_ids,
            "attention_mask": attention_mask,
            "cross_attention_mask": cross_attention_mask,
        }
        if language_modeling:
            return super().forward(**mllama_inputs, labels=labels, **kwargs)
        self._check_inputs(
            pixel_values, aspect_ratio_ids, aspect_ratio_mask, input_ids, attention_mask, cross_attention_mask, labels
        )
        hidden_states = attentions = None
        if self.config.pooling == "vision":
            features, valid = self.vision_features(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
            pooled = masked_mean(features, valid)
        else:
            outputs = self.model(**mllama_inputs, use_cache=kwargs.pop("use_cache", False), **kwargs)
            pooled = last_token_state(outputs.last_hidden_state, attention_mask)
            hidden_states, attentions = outputs.hidden_states, outputs.attentions
        return self.classify(pooled, labels, hidden_states=hidden_states, attentions=attentions)

    def prepare_inputs_for_generation(self, *args, **kwargs) -> dict:
        model_inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        # Generation needs next-token logits: the decode steps run the Mllama forward, not the classifier.
        model_inputs["language_modeling"] = True
        return model_inputs
