"""Processors of the Orion driving models: the Qwen2-VL / Qwen2.5-VL processors, plus the driving placeholders.

A prompt holds one `<scene>`, `<history>` and `<can_bus>` placeholder per given feature and at most one `<ego_wp>`
(none for a plain question: the model then returns no trajectory). The processor expands `<scene>` into
`num_scene_queries` tokens and `<history>` into `num_history_queries` tokens, as `<|image_pad|>` is expanded per
image, and passes the feature tensors through to the model. The checks and the expansion are those of
`DrivingPlaceholders`, which places the same tokens for every other family.
"""

from string import Template

from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor
from transformers.feature_extraction_utils import BatchFeature

from ..configuration.constants import CAN_BUS_TOKEN, EGO_TOKEN, HISTORY_TOKEN, SCENE_TOKEN
from ..configuration.remote_code import SelfContainedCodeMixin
from .image_inputs import open_images
from .processing_driving_placeholders import (
    DRIVING_FEATURES,
    add_placeholder_tokens,
    check_query_counts,
    expand_driving_placeholders,
)

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
        scene_token: str = SCENE_TOKEN,
        history_token: str = HISTORY_TOKEN,
        can_bus_token: str = CAN_BUS_TOKEN,
        ego_token: str = EGO_TOKEN,
        **kwargs,
    ):
        check_query_counts(num_scene_queries, num_history_queries)
        tokens = {"scene": scene_token, "history": history_token, "can_bus": can_bus_token, "ego": ego_token}
        token_ids = add_placeholder_tokens(tokenizer, tokens)
        self.num_scene_queries = num_scene_queries
        self.num_history_queries = num_history_queries
        self.scene_token, self.history_token, self.can_bus_token, self.ego_token = tokens.values()
        self.scene_token_id, self.history_token_id, self.can_bus_token_id, self.ego_token_id = token_ids.values()
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
        requested type next to `input_ids`, `attention_mask` and `mm_token_type_ids`. `images` are PIL images,
        arrays, tensors, image file paths or URLs (one list for the batch, or one list per prompt), read upright and
        as RGB by `open_images`.
        """
        if text is None:
            raise ValueError("text is required: the prompts hold the driving placeholders.")
        prompts = [text] if isinstance(text, str) else list(text)
        features = dict(zip(DRIVING_FEATURES, (scene_queries, history_queries, can_bus), strict=True))
        expanded = expand_driving_placeholders(
            prompts, features, self.placeholder_tokens, self.num_scene_queries, self.num_history_queries
        )
        if images is not None:
            images = open_images(images)
        outputs = super().__call__(images=images, text=expanded, videos=videos, **kwargs)
        driving = {name: value for name, value in features.items() if value is not None}
        return_tensors = kwargs.get("return_tensors", kwargs.get("text_kwargs", {}).get("return_tensors"))
        return BatchFeature({**outputs, **driving}, tensor_type=return_tensors)

    @property
    def placeholder_tokens(self) -> dict[str, str]:
        """The placeholder strings by kind: `scene`, `history`, `can_bus`, `ego`."""
        return {
            "scene": self.scene_token,
            "history": self.history_token,
            "can_bus": self.can_bus_token,
            "ego": self.ego_token,
        }

    @property
    def model_input_names(self) -> list[str]:
        return [*super().model_input_names, *DRIVING_FEATURES]


class OrionQwenProcessor(OrionProcessorMixin, Qwen2VLProcessor):
    """Qwen2-VL processor that also places the scene, history, CAN-bus and `<ego_wp>` tokens of a driving prompt."""


class OrionQwen2_5Processor(OrionProcessorMixin, Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor that also places the scene, history, CAN-bus and `<ego_wp>` tokens of a driving prompt."""
