"""What the server serves for a model, read from its declared capabilities, and each head's request → inputs.

The head kind (`head_kind_of`: the class attribute every vlmheads model and configuration declares) picks the route
that answers: `/classify` for any classifier, `/v1/trajectory` for any driving model, `/v1/actions` for any VLA.
Chat completions need a model that generates text (`PreTrainedModel.can_generate()`, `VLMFamily.generates_text`)
on a family whose caches `LocalEngine` batches (`VLMFamily.architecture` decoder-only). No class names, no
`hasattr` on the model: a new head or family is served once it declares these (a new head kind also needs its
route in `HEAD_ROUTES` and its inputs in `HEAD_INPUTS`).

The request bodies of `/v1/actions` live here next to the inputs they become; the other bodies are in
`openai_protocol`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, Field
from transformers import PretrainedConfig, PreTrainedModel

from ..configuration.constants import HEAD_ACTIONS, HEAD_CLASSIFICATION, HEAD_GENERATION, HEAD_TRAJECTORY
from ..modeling.capabilities import backbone_family_of, head_kind_of
from ..modeling.families import DECODER_ONLY, VLMFamily
from ..processing.collator_vla import VLADataCollator, check_manipulation_record
from ..processing.pipeline_inputs import user_prompt
from ..processing.trajectory_request import TrajectoryRequests, trajectory_forward_options
from .openai_protocol import ClassificationUsage

ROUTE_CHAT = "/v1/chat/completions"
ROUTE_CLASSIFY = "/classify"
ROUTE_TRAJECTORY = "/v1/trajectory"
ROUTE_ACTIONS = "/v1/actions"
HEAD_ROUTES = {HEAD_CLASSIFICATION: ROUTE_CLASSIFY, HEAD_TRAJECTORY: ROUTE_TRAJECTORY, HEAD_ACTIONS: ROUTE_ACTIONS}
"""The route that serves each head kind (`HEAD_GENERATION` models answer chat completions only)."""


class ServingError(ValueError):
    """A model or request the server cannot serve; `param` names the request field at fault (None: the model)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def generation_refusal(model: PreTrainedModel) -> str | None:
    """Why `LocalEngine` generates no text with `model`, or None when it does: the model must generate text
    (a family that `generates_text`, a class that `can_generate()`) on a decoder-only family, whose self-attention
    caches the engine stacks into one batch."""
    name = type(model).__name__
    family = backbone_family_of(model)
    if not family.generates_text:
        return f"{name} generates no text: {family.name} models predict actions only."
    if not model.can_generate():
        kind = head_kind_of(model)
        return (
            f"{name} generates no text (a {kind} head on {family.name}): chat completions are refused; it "
            f"answers POST {HEAD_ROUTES.get(kind, ROUTE_CHAT)}."
        )
    if family.architecture != DECODER_ONLY:
        return (
            f"{name} is a {family.architecture} {family.name} model, whose caches LocalEngine does not batch "
            "(it batches the self-attention caches of decoder-only families): it serves this model's "
            "non-generative endpoints only."
        )
    return None


def forward_options(model: PreTrainedModel) -> dict[str, Any]:
    """What `LocalEngine.forward` passes to the model besides a route's inputs (`trajectory_forward_options` for
    trajectory models)."""
    return trajectory_forward_options(model) if head_kind_of(model) == HEAD_TRAJECTORY else {}


@dataclass(frozen=True)
class ServedModel:
    """What the server knows of its model: the head kind it declares, the family it runs on, and what turns a
    request of its route into model inputs (`inputs`; None for a plain backbone, which answers chat only, and for
    an engine without a processor)."""

    model_id: str
    head_kind: str
    family: VLMFamily | None
    inputs: TrajectoryRequests | ClassifierInputs | ActionInputs | None = None

    @classmethod
    def of(cls, model_id: str, config: PretrainedConfig | None, processor: Any) -> ServedModel:
        """The served model of an engine's `config` (None: an engine that only generates text) and processor. A
        model of no registered family, one that declares no head (π0), or a head whose processor cannot make its
        inputs is a `ServingError` naming it."""
        if config is None:
            return cls(model_id, HEAD_GENERATION, None)
        try:
            head_kind, family = head_kind_of(config), backbone_family_of(config)
            builder = HEAD_INPUTS.get(head_kind)
            inputs = None if builder is None or processor is None else builder(config, processor)
            return cls(model_id, head_kind, family, inputs)
        except ValueError as error:
            raise ServingError(f"The server cannot serve `{model_id}`: {error}") from error

    @property
    def route(self) -> str:
        """The route of the model's head (chat completions for a plain backbone)."""
        return HEAD_ROUTES.get(self.head_kind, ROUTE_CHAT)

    def check_route(self, route: str) -> None:
        """A `ServingError` unless `route` serves this model's head."""
        if HEAD_ROUTES.get(self.head_kind) != route:
            on = "" if self.family is None else f" on {self.family.name}"
            serves = {ROUTE_CLASSIFY: "classifiers", ROUTE_TRAJECTORY: "driving models", ROUTE_ACTIONS: "VLAs"}
            raise ServingError(
                f"`{self.model_id}` is a {self.head_kind} model{on}: POST {route} serves {serves[route]}; this model "
                f"answers POST {self.route}."
            )


# ---- /classify ----------------------------------------------------------------------------------------------------


class ClassifierInputs:
    """The inputs of one classified image, for any classifier on any family.

    `pooling="vision"` classifiers read the image alone (the image processor's outputs, as transformers'
    `ImageClassificationPipeline` feeds them); `"multimodal"` ones read the prompt too: the image and the
    question of the family's chat template, the question the processor was saved with (the receipt processor's
    `question`) unless the request gives a chat turn.
    """

    def __init__(self, config: PretrainedConfig, processor: Any):
        self.config = config
        self.processor = processor
        self.multimodal = config.pooling == "multimodal"

    def _process(self, images: list[Any], prompt: str | None) -> dict[str, torch.Tensor]:
        if prompt is None:
            return dict(self.processor.image_processor(images=images, return_tensors="pt"))
        inputs = dict(self.processor(images=[images], text=[prompt], return_tensors="pt"))
        # PaliGemma's processor adds next-token labels of the prompt; the classifier's labels are class ids.
        inputs.pop("labels", None)
        return inputs

    def for_image(self, image: Any) -> dict[str, torch.Tensor]:
        """One image with the processor's own question (multimodal pooling)."""
        question = getattr(self.processor, "question", None) or ""
        return self._process([image], user_prompt(self.processor, question, 1) if self.multimodal else None)

    def for_turn(self, messages: list[dict[str, Any]], images: list[Any]) -> dict[str, torch.Tensor]:
        """A chat turn (`messages` in chat-template form, `images` decoded in order): its prompt through the
        processor's chat template; processors without one (PaliGemma) take the text of a single user message."""
        if not images:
            raise ServingError("messages: the classifier reads an image; none was given.", "messages")
        if not self.multimodal:
            return self._process(images, None)
        if getattr(self.processor, "chat_template", None) is not None:
            prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
            return self._process(images, prompt)
        if len(messages) != 1 or messages[0]["role"] != "user":
            raise ServingError(
                "messages: this model's processor has no chat template; send one user message (its images and "
                "question).",
                "messages",
            )
        text = " ".join(part["text"] for part in messages[0]["content"] if part["type"] == "text")
        return self._process(images, user_prompt(self.processor, text, len(images)))


# ---- /v1/actions --------------------------------------------------------------------------------------------------


class ActionRequest(BaseModel):
    """One observation of a robot: camera `images` as base64 data URLs (one or several cameras, in the order the
    model was trained with), the task `instruction`, and the robot `state` (state_dim,) when the model reads one."""

    model: str | None = None
    images: list[str] = Field(min_length=1)
    instruction: str
    state: list[float] | None = None


class ActionResponse(BaseModel):
    """The predicted action chunk (chunk_size, action_dim), in the data's units."""

    id: str
    object: Literal["actions"] = "actions"
    created: int
    model: str
    actions: list[list[float]]
    usage: ClassificationUsage


class ActionInputs:
    """The inputs of one observation for a VLA, made as in training and in the `action-prediction` pipeline
    (`VLADataCollator`, `check_manipulation_record`)."""

    def __init__(self, config: PretrainedConfig, processor: Any):
        self.config = config
        self.collator = VLADataCollator.for_model(processor, config, with_actions=False)

    def __call__(self, images: list[Any], instruction: str, state: list[float] | None) -> dict[str, torch.Tensor]:
        config = self.config
        if not instruction.strip():
            raise ServingError("instruction must name the task in words; it is empty.", "instruction")
        if config.state_dim and state is None:
            raise ServingError(
                f"This model reads the robot state: send state, a list of {config.state_dim} numbers.", "state"
            )
        if state is not None and not config.state_dim:
            raise ServingError("state was given, but this model reads no state (its state_dim is 0).", "state")
        record: dict[str, Any] = {"images": images, "instruction": instruction}
        if state is not None:
            record["state"] = np.asarray(state, dtype=np.float32)
        try:
            check_manipulation_record(
                record, config.chunk_size, config.action_dim, config.state_dim, with_actions=False
            )
        except ValueError as error:
            # Images and instruction passed the checks above: what is left to refuse is the state.
            raise ServingError(f"{error}.", "state") from error
        return self.collator([record])


HEAD_INPUTS = {HEAD_CLASSIFICATION: ClassifierInputs, HEAD_TRAJECTORY: TrajectoryRequests, HEAD_ACTIONS: ActionInputs}
"""What turns a request of each head's route into the model's inputs, built from the configuration and processor."""
