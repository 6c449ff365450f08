"""Processors of the Orion driving models: the Qwen2-VL / Qwen2.5-VL processors, plus the driving placeholders.

A prompt holds at most one `<scene>`, one `<history>` and one `<can_bus>` placeholder and exactly one `<ego_wp>`.
The processor expands `<scene>` into `num_scene_queries` tokens and `<history>` into `num_history_queries`
tokens, as `<|image_pad|>` is expanded per image, and passes the feature tensors through to the model.
"""

from string import Template

import numpy as np
from tokenizers import AddedToken
from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor
from transformers.feature_extraction_utils import BatchFeature

from ..publishing import SelfContainedCodeMixin

# `$name` fields are filled with the processor's placeholder tokens; the rest is Jinja.
CHAT_TEMPLATE = Template(
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a driving assistant: you read the scene, the ego history and the CAN bus, "
    "answer questions about them and plan the ego trajectory.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item['type'] == 'scene' %}$scene_token"
    "{% elif item['type'] == 'history' %}$history_token"
    "{% elif item['type'] == 'can_bus' %}$can_bus_token"
    "{% elif item['type'] == 'ego' %}$ego_token"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

DRIVING_FEATURES = ("scene_queries", "history_queries", "can_bus")


class OrionProcessorMixin(SelfContainedCodeMixin):
    """The driving placeholders, shared by the Qwen2-VL and Qwen2.5-VL processors: mix in before the Qwen class."""

    auto_classes = ("AutoProcessor",)

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        video_processor=None,
        chat_template: str | None = None,
        num_scene_queries: int = 256,
        num_history_queries: int = 256,
        scene_token: str = "<scene>",
        history_token: str = "<history>",
        can_bus_token: str = "<can_bus>",
        ego_token: str = "<ego_wp>",
        **kwargs,
    ):
        for name, count in (("num_scene_queries", num_scene_queries), ("num_history_queries", num_history_queries)):
            if count < 1:
                raise ValueError(f"{name} must be a positive integer, got {count}.")
        tokens = {"scene": scene_token, "history": history_token, "can_bus": can_bus_token, "ego": ego_token}
        if len(set(tokens.values())) != len(tokens) or not all(tokens.values()):
            raise ValueError(f"The placeholder tokens must be distinct, non-empty strings, got {tokens}.")
        vocab = tokenizer.get_vocab()
        missing = [token for token in tokens.values() if token not in vocab]
        tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in missing])

        self.num_scene_queries = num_scene_queries
        self.num_history_queries = num_history_queries
        self.scene_token, self.history_token, self.can_bus_token, self.ego_token = tokens.values()
        self.scene_token_id, self.history_token_id, self.can_bus_token_id, self.ego_token_id = (
            tokenizer.convert_tokens_to_ids(token) for token in tokens.values()
        )
        if chat_template is None:
            chat_template = CHAT_TEMPLATE.substitute({f"{kind}_token": token for kind, token in tokens.items()})
        super().__init__(image_processor, tokenizer, video_processor, chat_template=chat_template, **kwargs)

    def model_config_kwargs(self) -> dict[str, int]:
        """The settings an Orion model config must share with this processor: query counts and placeholder ids."""
        return {
            "num_scene_queries": self.num_scene_queries,
            "num_history_queries": self.num_history_queries,
            "scene_token_id": self.scene_token_id,
            "history_token_id": self.history_token_id,
            "can_bus_token_id": self.can_bus_token_id,
            "ego_token_id": self.ego_token_id,
        }

    def __call__(
        self,
        images=None,
        text: str | list[str] | None = None,
        videos=None,
        scene_queries=None,
        history_queries=None,
        can_bus=None,
        **kwargs,
    ) -> BatchFeature:
        """Tokenizes prompts with their images and driving features.

        `scene_queries` (B, num_scene_queries, Ds), `history_queries` (B, num_history_queries, Dh) and `can_bus`
        (B, Dc) are tensors, arrays or nested lists, one row block per prompt; they come back as tensors of the
        requested type next to `input_ids`, `attention_mask` and `mm_token_type_ids`.
        """
        if text is None:
            raise ValueError("text is required: every Orion prompt holds an <ego_wp> token.")
        prompts = [text] if isinstance(text, str) else list(text)
        features = dict(zip(DRIVING_FEATURES, (scene_queries, history_queries, can_bus), strict=True))
        self._check_prompts(prompts, features)
        expanded = [
            prompt.replace(self.scene_token, self.scene_token * self.num_scene_queries).replace(
                self.history_token, self.history_token * self.num_history_queries
            )
            for prompt in prompts
        ]
        outputs = super().__call__(images=images, text=expanded, videos=videos, **kwargs)
        driving = {name: value for name, value in features.items() if value is not None}
        return_tensors = kwargs.get("return_tensors", kwargs.get("text_kwargs", {}).get("return_tensors"))
        return BatchFeature({**outputs, **driving}, tensor_type=return_tensors)

    def _check_prompts(self, prompts: list[str], features: dict) -> None:
        for index, prompt in enumerate(prompts):
            if prompt.count(self.ego_token) != 1:
                raise ValueError(
                    f"Prompt {index} holds {prompt.count(self.ego_token)} {self.ego_token} tokens; every prompt needs "
                    f"exactly one, where the trajectory is read."
                )
        for name, token, rows in (
            ("scene_queries", self.scene_token, self.num_scene_queries),
            ("history_queries", self.history_token, self.num_history_queries),
            ("can_bus", self.can_bus_token, None),
        ):
            given = features[name] is not None
            counts = [prompt.count(token) for prompt in prompts]
            index = next((i for i, count in enumerate(counts) if count != int(given)), None)
            if index is not None:
                expected = f"exactly one, as {name} were given" if given else f"none, as no {name} were given"
                raise ValueError(f"Prompt {index} holds {counts[index]} {token} placeholders; expected {expected}.")
            if given:
                leading = (len(prompts),) if rows is None else (len(prompts), rows)
                shape = np.shape(features[name])
                if len(shape) != len(leading) + 1 or shape[: len(leading)] != leading:
                    layout = "(B, width)" if rows is None else f"(B, {rows}, width)"
                    raise ValueError(f"{name} must have shape {layout} with B={len(prompts)} prompts, got {shape}.")

    @property
    def model_input_names(self) -> list[str]:
        return [*super().model_input_names, *DRIVING_FEATURES]


class OrionQwenProcessor(OrionProcessorMixin, Qwen2VLProcessor):
    """Qwen2-VL processor that also places the scene, history, CAN-bus and `<ego_wp>` tokens of a driving prompt."""


class OrionQwen2_5Processor(OrionProcessorMixin, Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor that also places the scene, history, CAN-bus and `<ego_wp>` tokens of a driving prompt."""
