"""Request and response bodies of the server: OpenAI's chat completions, vLLM's /classify, and /v1/trajectory."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .sampling import MAX_TEMPERATURE, SEED_MAX, SEED_MIN

#: The most choices (`n`) one chat request may ask for; each decodes as its own request.
MAX_CHOICES = 16


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`."""

    error: ErrorInfo


# ---- chat completions ---------------------------------------------------------------------------------------------


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    name: str
    description: str | None = None
    json_schema: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: plain text, any JSON object, or JSON following `json_schema.schema`."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_json_schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError('json_schema is given with type "json_schema", and only then')
        return self


class ChatCompletionRequest(BaseModel):
    """What `POST /v1/chat/completions` reads; other OpenAI fields are accepted and ignored. Bodies are validated
    in strict mode (`parse_body`): `max_tokens: true` or `stream: "yes"` are refused, not coerced."""

    model_config = ConfigDict(extra="allow")

    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    max_tokens: int | None = Field(default=None, gt=0)
    max_completion_tokens: int | None = Field(default=None, gt=0)
    # Temperatures in (0, 0.01) sample at 0.01 (see vlmheads.serve.sampling).
    temperature: float = Field(default=1.0, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, description="vLLM's extra: keep the k most likely tokens (0: off).")
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    guided_regex: str | None = Field(default=None, description="vLLM's extra: the completion matches this regex.")
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @model_validator(mode="after")
    def _stop_strings_not_empty(self) -> ChatCompletionRequest:
        if any(stop == "" for stop in self.stop_strings):
            raise ValueError("stop strings must not be empty")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.guided_regex is not None and self.response_format is not None and self.response_format.type != "text":
            raise ValueError("give response_format or guided_regex, not both")
        return self

    @property
    def structured_output(self) -> tuple[str, Any] | None:
        """(kind, spec) of the format the completion must follow: ("json_schema", schema), ("json_object", None),
        ("regex", pattern), or None."""
        if self.guided_regex is not None:
            return "regex", self.guided_regex
        if self.response_format is None or self.response_format.type == "text":
            return None
        if self.response_format.type == "json_object":
            return "json_object", None
        return "json_schema", self.response_format.json_schema.json_schema

    @property
    def logprobs_count(self) -> int | None:
        """None without `logprobs`, else how many most likely tokens to report beside each chosen one."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def completion_limit(self) -> int | None:
        """`max_completion_tokens`, else `max_tokens` (its deprecated alias), else None."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


# ---- models -------------------------------------------------------------------------------------------------------


class ModelCard(BaseModel):
    """One served model, as vLLM lists it: a LoRA adapter has the base model's id as `parent` and its folder as
    `root`; `head_kind` (vlmheads' own field) says which head answers (the route it serves)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "vlmheads"
    root: str | None = None
    parent: str | None = None
    max_model_len: int
    head_kind: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def model_list(model_id: str, max_model_len: int, head_kind: str, adapters: Mapping[str, Path]) -> ModelList:
    """GET /v1/models: the base model, then each LoRA adapter (name → folder) with the base model as parent."""
    created = now()
    base = ModelCard(id=model_id, created=created, root=model_id, max_model_len=max_model_len, head_kind=head_kind)
    return ModelList(
        data=[base]
        + [
            ModelCard(
                id=name,
                created=created,
                root=str(path),
                parent=model_id,
                max_model_len=max_model_len,
                head_kind=head_kind,
            )
            for name, path in adapters.items()
        ]
    )


# ---- /classify (vLLM's shape) -------------------------------------------------------------------------------------


class ClassificationRequest(BaseModel):
    """One or more images as data URLs in `input`, or one chat turn in `messages` (images + optional question)."""

    model: str | None = None
    input: str | list[str] | None = None
    messages: list[ChatMessage] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ClassificationRequest:
        if (self.input is None) == (self.messages is None):
            raise ValueError("give exactly one of `input` (image data URLs) and `messages`")
        return self


class ClassificationData(BaseModel):
    index: int
    label: str
    probs: list[float]
    num_classes: int


class ClassificationUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0
    prompt_tokens_details: None = None


class ClassificationResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ClassificationData]
    usage: ClassificationUsage


# ---- /v1/trajectory -----------------------------------------------------------------------------------------------


class TrajectoryRequest(BaseModel):
    """The driving tensors of one sample as nested lists: `scene_queries` (Ns, Ds), `history_queries` (Nh, Dh),
    `can_bus` (Dc,), an optional camera image (data URL) and instruction `prompt`, and `command` for multi-mode
    models."""

    model: str | None = None
    scene_queries: list[list[float]]
    history_queries: list[list[float]]
    can_bus: list[float]
    image: str | None = None
    prompt: str | None = None
    command: int | None = None


class TrajectoryResponse(BaseModel):
    id: str
    object: Literal["trajectory"] = "trajectory"
    created: int
    model: str
    waypoints: list[list[float]]
    modes: list[list[list[float]]] | None = None
    usage: ClassificationUsage


def dump(model: BaseModel, **kwargs: Any) -> dict[str, Any]:
    return model.model_dump(mode="json", **kwargs)
