"""Processor of the receipt classifier: the Mllama processor, plus image checks, the classification prompt and labels.

Each sample is one photo (or a list of photos) and, for `pooling="multimodal"`, a prompt with one `<|image|>` per
photo. `MllamaProcessor` tiles the images, pads images and tiles across the batch and builds the aspect ratio ids,
the aspect ratio mask and the cross-attention mask; this subclass accepts image files, checks what it is given,
formats the classification prompt and turns label names into ids and logits back into names.
"""

from collections.abc import Sequence

import numpy as np
import torch
from transformers import MllamaProcessor
from transformers.feature_extraction_utils import BatchFeature

from ..configuration.configuration_receipt_vl import RECEIPT_COUNT_LABELS
from ..configuration.remote_code import SelfContainedCodeMixin
from .image_inputs import open_image

DEFAULT_QUESTION = "How many receipts are in this photo?"

# Llama 3.2 Vision's chat format: header ids around the role, `<|image|>` where an image item stands.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|image|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


class ReceiptVLProcessor(SelfContainedCodeMixin, MllamaProcessor):
    """Mllama processor for the receipt classifier: images (or image files) + optional prompts + labels → inputs.

    `id2label` names the classes (the model config's; default the receipt counts "0", "1", "2 or more") and
    `question` is the classification question of `classification_prompt()`.
    """

    auto_classes = ("AutoProcessor",)

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template: str | None = None,
        id2label: dict[int, str] | None = None,
        question: str = DEFAULT_QUESTION,
    ):
        id2label = {int(index): label for index, label in (id2label or RECEIPT_COUNT_LABELS).items()}
        if sorted(id2label) != list(range(len(id2label))) or len(set(id2label.values())) != len(id2label):
            raise ValueError(f"id2label must name the ids 0 ... n-1 with distinct names, got {id2label}.")
        self.id2label = id2label
        self.label2id = {label: index for index, label in id2label.items()}
        self.question = question
        super().__init__(image_processor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE)

    def model_config_kwargs(self) -> dict:
        """What a `ReceiptVLConfig` must share with this processor: the classes and the `<|image|>` token id."""
        return {
            "id2label": dict(self.id2label),
            "label2id": dict(self.label2id),
            "image_token_index": self.image_token_id,
        }

    def classification_prompt(self, question: str | None = None) -> str:
        """The chat prompt of one image and the classification question (default `self.question`)."""
        content = [{"type": "image"}, {"type": "text", "text": question or self.question}]
        return self.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def label_ids(self, labels: Sequence[str | int]) -> list[int]:
        """Class ids of `labels`, given as names (`"2 or more"`) or ids; raises a `ValueError` on unknown labels."""
        ids = []
        for index, label in enumerate(labels):
            if isinstance(label, str) and label in self.label2id:
                ids.append(self.label2id[label])
            elif isinstance(label, (int, np.integer)) and not isinstance(label, bool) and int(label) in self.id2label:
                ids.append(int(label))
            else:
                raise ValueError(f"labels[{index}] = {label!r} is not a class of this model: {self.id2label}.")
        return ids

    def post_process_classification(self, logits: torch.Tensor, top_k: int | None = None) -> list[list[dict]]:
        """Logits (B, num_labels) → per sample, the classes with their softmax probabilities, most likely first."""
        if logits.ndim != 2 or logits.shape[1] != len(self.id2label):
            raise ValueError(f"logits must have shape (B, {len(self.id2label)}), got {tuple(logits.shape)}.")
        scores, indices = logits.float().softmax(dim=-1).sort(dim=-1, descending=True)
        return [
            [{"label": self.id2label[int(i)], "score": float(s)} for s, i in zip(row_s, row_i, strict=True)][:top_k]
            for row_s, row_i in zip(scores, indices, strict=True)
        ]

    def __call__(self, images=None, text: str | list[str] | None = None, labels=None, **kwargs) -> BatchFeature:
        """Prepares a batch.

        `images`: one image per sample (a PIL image, an array, a tensor, an image file path or a URL; read upright
        and as RGB by `open_image`), or one list of images per sample. `text`: None (the image alone, for
        `pooling="vision"`) or one prompt per sample holding one `<|image|>` per image of that sample. `labels`:
        one class name or id per sample; returned as `labels` (B,).
        """
        if images is None:
            raise ValueError("images are required: the receipt classifier reads a photo in every sample.")
        samples = images if isinstance(images, (list, tuple)) else [images]
        samples = [list(sample) if isinstance(sample, (list, tuple)) else [sample] for sample in samples]
        if not samples or not all(samples):
            raise ValueError("Every sample needs at least one image.")
        samples = [
            [
                open_image(image, f"images[{i}][{j}]" if len(sample) > 1 else f"images[{i}]")
                for j, image in enumerate(sample)
            ]
            for i, sample in enumerate(samples)
        ]
        prompts = None
        if text is not None:
            prompts = [text] if isinstance(text, str) else list(text)
            if len(prompts) != len(samples):
                raise ValueError(f"Got {len(prompts)} prompts for {len(samples)} samples of images: give one each.")
            for index, (prompt, sample) in enumerate(zip(prompts, samples, strict=True)):
                if prompt.count(self.image_token) != len(sample):
                    raise ValueError(
                        f"Prompt {index} holds {prompt.count(self.image_token)} {self.image_token} tokens for "
                        f"{len(sample)} image(s): it needs one {self.image_token} per image."
                    )
        outputs = super().__call__(images=samples, text=prompts, **kwargs)
        if labels is not None:
            labels = [labels] if isinstance(labels, (str, int)) else list(labels)
            if len(labels) != len(samples):
                raise ValueError(f"Got {len(labels)} labels for {len(samples)} samples: give one label per sample.")
            return_tensors = kwargs.get("return_tensors", kwargs.get("text_kwargs", {}).get("return_tensors"))
            outputs = BatchFeature({**outputs, "labels": self.label_ids(labels)}, tensor_type=return_tensors)
        return outputs
