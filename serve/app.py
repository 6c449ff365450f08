"""The OpenAI-compatible HTTP server, in front of any `GenerationEngine`.

Endpoints: `POST /v1/chat/completions` (text and base64 `image_url` parts, streaming with server-sent events),
`GET /v1/models`, `GET /health`, and the route of the head the engine's model declares (`heads.py`):
`POST /v1/trajectory` (driving models), `POST /classify` (classifiers, vLLM's request and response shape) or
`POST /v1/actions` (VLAs). Every error is an OpenAI error object
`{"error": {"message", "type", "param", "code"}}`; bad input is a 4xx, never a 500.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import functools
import io
import json
import logging
import math
import secrets
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from PIL import Image, UnidentifiedImageError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from ..modeling.capabilities import backbone_config_of
from ..processing.processing_driving_placeholders import DRIVING_FEATURES
from ..processing.trajectory_request import TrajectoryRequestError
from .access_log import REQUEST_ID_HEADER, AccessLogMiddleware, access_record, note_tokens
from .engine import GenerationEngine, GenerationRequest, TokenEvent
from .heads import (
    ROUTE_ACTIONS,
    ROUTE_CHAT,
    ROUTE_CLASSIFY,
    ROUTE_TRAJECTORY,
    ActionRequest,
    ActionResponse,
    ServedModel,
    ServingError,
)
from .memory import return_large_blocks_to_the_os
from .metrics import RequestTimer, ServerMetrics
from .openai_protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChoiceLogprobs,
    ChunkChoice,
    ClassificationData,
    ClassificationRequest,
    ClassificationResponse,
    ClassificationUsage,
    DeltaMessage,
    ErrorInfo,
    ErrorResponse,
    TokenLogprob,
    TopLogprob,
    TrajectoryRequest,
    TrajectoryResponse,
    Usage,
    dump,
    model_list,
    new_id,
    now,
)
from .options import API_KEY_ENV as API_KEY_ENV  # re-exported: defined beside the command-line options
from .options import DEFAULT_MAX_IMAGE_PIXELS, ServerLimits, ServerTimeouts
from .options import processor_max_pixels as processor_max_pixels  # re-exported
from .sampling import reduced_seed
from .structured import GrammarCompiler

logger = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.5
#: How long uvicorn waits past the drain deadline before it cancels what still runs.
SHUTDOWN_GRACE_S = 5.0


def shrink_factor(pixels: int, target: int | None) -> int:
    """The largest whole factor k by which an image of `pixels` can shrink on each side and still hold `target`
    pixels (pixels / k**2 >= target); 1 when it cannot halve, or there is no target."""
    return max(1, math.isqrt(pixels // target)) if target else 1


#: Modes `Image.reduce` averages correctly (8-bit channels, or one 32-bit one); others are converted to RGB first.
_REDUCIBLE_MODES = ("L", "LA", "RGB", "RGBA", "I", "F")


class PixelBudget:
    """The decoded pixels one request may still spend (ServerLimits.max_request_pixels)."""

    def __init__(self, limits: ServerLimits):
        self.limit = limits.max_request_pixels
        self.used = 0

    def spend(self, pixels: int, param: str) -> None:
        self.used += pixels
        if self.limit is not None and self.used > self.limit:
            raise APIError(
                400,
                f"{param}: the request's images hold {self.used} pixels, more than the {self.limit} a request may "
                "hold (--max-request-pixels).",
                param=param,
                code="image_too_large",
            )


class APIError(Exception):
    """An error answered as an OpenAI error object with `status`."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, kind: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "internal_server_error")

    def response(self) -> JSONResponse:
        body = ErrorResponse(error=ErrorInfo(message=self.message, type=self.kind, param=self.param, code=self.code))
        return JSONResponse(dump(body), status_code=self.status)


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None, kind: str | None = None
) -> JSONResponse:
    return APIError(status, message, param, code, kind).response()


# ---- request bodies and images ------------------------------------------------------------------------------------


async def read_body(request: Request, limits: ServerLimits) -> bytes:
    """The request body; 413 past `limits.max_body_bytes`, counted as it streams in; 408 when it takes longer than
    `limits.body_timeout` seconds."""
    chunks, size = [], 0
    try:
        async with asyncio.timeout(limits.body_timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limits.max_body_bytes:
                    raise APIError(
                        413, f"The request body exceeds {limits.max_body_bytes} bytes.", code="body_too_large"
                    )
                chunks.append(chunk)
    except ClientDisconnect as error:
        raise APIError(400, "The client went away while sending the request.", code="client_disconnected") from error
    except TimeoutError as error:
        raise APIError(
            408, f"The request body took longer than {limits.body_timeout} s to arrive.", code="body_timeout"
        ) from error
    return b"".join(chunks)


def parse_body(body: bytes, schema: type[BaseModel]) -> Any:
    """`body` validated as `schema` in strict mode (no `true` for an integer, no `"yes"` for a boolean); malformed
    JSON or a field that breaks the schema is a 400 naming the field. pydantic's own JSON parser bounds what Python's
    `json` does not: nesting (200 deep), numbers (no 5,000-digit integers) and strings (no lone surrogates)."""
    try:
        return schema.model_validate_json(body, strict=True)
    except ValidationError as error:
        first = error.errors()[0]
        if first["type"] == "json_invalid":
            raise APIError(400, f"The request body is not valid JSON: {first['msg']}.", code="invalid_json") from error
        param = ".".join(str(part) for part in first["loc"]) or None
        raise APIError(400, f"{param or 'body'}: {first['msg']}", param=param, code="invalid_value") from error


def decode_image_url(url: str, limits: ServerLimits, param: str, budget: PixelBudget | None = None) -> Image.Image:
    """A base64 `data:image/...` URL as an RGB PIL image, its pixels counted against `budget`. Remote http(s) URLs
    are refused: the server fetches nothing. The header's size is checked before any pixel is decoded."""
    if url.startswith(("http://", "https://")):
        raise APIError(
            400,
            f"{param}: remote image URLs are refused (the server fetches nothing); send a base64 data URL.",
            param=param,
            code="remote_image_refused",
        )
    header, comma, payload = url.partition(",")
    if not header.startswith("data:") or not comma or not header.endswith(";base64"):
        raise APIError(
            400,
            f"{param}: expected a base64 data URL (data:image/png;base64,...).",
            param=param,
            code="invalid_image_url",
        )
    media_type = header[len("data:") : -len(";base64")]
    if media_type and not media_type.startswith("image"):
        raise APIError(
            400, f"{param}: the data URL holds {media_type!r}, not an image.", param=param, code="invalid_image"
        )
    if len(payload) * 3 // 4 > limits.max_image_bytes:
        raise APIError(
            400, f"{param}: the image exceeds {limits.max_image_bytes} bytes.", param=param, code="image_too_large"
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as error:
        raise APIError(
            400, f"{param}: the data URL is not valid base64.", param=param, code="invalid_image"
        ) from error
    max_pixels = limits.max_image_pixels or DEFAULT_MAX_IMAGE_PIXELS
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        # JPEG decodes straight to 1/2, 1/4 or 1/8 scale: the mildest of them within the limit, or a stronger one
        # that still holds the processed size (PIL picks the strongest scale at least as large as asked).
        reduction = shrink_factor(width * height, limits.processed_pixels)
        if width * height > max_pixels:
            reduction = max(reduction, next((k for k in (2, 4, 8) if width * height <= max_pixels * k * k), 8))
        if reduction > 1:
            image.draft("RGB", (width // reduction, height // reduction))
        if image.width * image.height > max_pixels:
            raise APIError(
                400,
                f"{param}: the image has {width}x{height} pixels, more than the {max_pixels} allowed "
                "(--max-image-pixels).",
                param=param,
                code="image_too_large",
            )
        if budget is not None:
            budget.spend(image.width * image.height, param)
        image.load()
        reduction = shrink_factor(image.width * image.height, limits.processed_pixels)
        if reduction > 1:
            # The full-size pixels are freed here, not when the processor has resized every image of the request.
            image = (image if image.mode in _REDUCIBLE_MODES else image.convert("RGB")).reduce(reduction)
    except APIError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise APIError(
            400, f"{param}: the data URL does not hold a readable image ({error}).", param=param, code="invalid_image"
        ) from error
    return image.convert("RGB")


def chat_parts(messages: list[ChatMessage], limits: ServerLimits) -> tuple[list[dict[str, Any]], list[Image.Image]]:
    """OpenAI messages as the processors' chat-template messages (`{"type": "image"}` where an image goes), and
    the decoded images in order."""
    template_messages, images = [], []
    budget = PixelBudget(limits)
    for index, message in enumerate(messages):
        content = message.content
        parts: list[dict[str, Any]] = []
        if isinstance(content, str):
            parts.append({"type": "text", "text": content})
        for part_index, part in enumerate(content if isinstance(content, list) else []):
            if part.type == "text":
                parts.append({"type": "text", "text": part.text})
                continue
            if len(images) == limits.max_images:
                raise APIError(
                    400, f"At most {limits.max_images} images per request.", param="messages", code="too_many_images"
                )
            param = f"messages.{index}.content.{part_index}"
            images.append(decode_image_url(part.image_url.url, limits, param, budget))
            parts.append({"type": "image"})
        role = "system" if message.role == "developer" else message.role
        template_messages.append({"role": role, "content": parts})
    return template_messages, images


# ---- streaming text -----------------------------------------------------------------------------------------------


class CompletionText:
    """Detokenizes a growing completion and applies the stop strings: `push` returns the text that is safe to send
    (held back: an incomplete UTF-8 character, and a tail that could start a stop string)."""

    def __init__(self, tokenizer: Any, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.token_ids: list[int] = []
        self.sent = 0
        self.text = ""
        self.stopped = False

    def push(self, token_id: int | None, final: bool) -> str:
        if token_id is not None and not self.stopped:
            self.token_ids.append(token_id)
            self.text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        safe_end = len(self.text)
        if not self.stopped:
            hits = [
                index
                for index in (self.text.find(stop, max(0, self.sent - len(stop))) for stop in self.stop)
                if index >= 0
            ]
            if hits:
                self.text, self.stopped = self.text[: min(hits)], True
                safe_end = len(self.text)
            elif not final:
                if self.text.endswith("\ufffd"):
                    safe_end -= 1
                if self.stop:
                    safe_end = max(self.sent, safe_end - max(len(stop) for stop in self.stop) + 1)
        delta, self.sent = self.text[self.sent : max(self.sent, safe_end)], max(self.sent, safe_end)
        return delta


class EventRelay:
    """Carries engine events from the engine's thread onto the event loop. A decode step reports one event per running
    request: one loop wake-up delivers all the events reported since the last one, where a wake-up per event would
    keep the loop's thread busy holding the GIL that the engine's thread needs between steps."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.pending: collections.deque[tuple[asyncio.Queue[TokenEvent], TokenEvent]] = collections.deque()
        self.scheduled = False

    def put(self, queue: asyncio.Queue[TokenEvent], event: TokenEvent) -> None:
        """Called on the engine's thread."""
        self.pending.append((queue, event))
        if not self.scheduled:
            self.scheduled = True
            # An engine may still report a request the server stopped waiting for after its loop closed (shutdown).
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        # Cleared before draining: an event put after this line schedules the next delivery itself.
        self.scheduled = False
        while self.pending:
            queue, event = self.pending.popleft()
            queue.put_nowait(event)


class EngineStream:
    """The events of one submitted request, as an async iterator on the server's event loop."""

    def __init__(self, engine: GenerationEngine, request: GenerationRequest, relay: EventRelay):
        self.engine = engine
        self.request_id = request.request_id
        self.relay = relay
        self.queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self.finished = False
        self.expired = False
        self.checked_at = time.monotonic()
        try:
            engine.submit(request, self._on_event)
        except ValueError as error:
            raise APIError(400, str(error), code="invalid_request") from error
        except RuntimeError as error:
            raise APIError(503, str(error), code="shutting_down", kind="service_unavailable") from error

    def _on_event(self, event: TokenEvent) -> None:
        self.relay.put(self.queue, event)

    def expire(self) -> None:
        """Ends the request now with an error event and cancels it in the engine (the drain deadline passed)."""
        if self.finished:
            return
        self.cancel()
        self.expired = True
        self.queue.put_nowait(TokenEvent(self.request_id, None, finish_reason="error", error="server shutdown"))

    def error(self, event: TokenEvent) -> APIError:
        """The error of an event that ended the request with finish_reason "error": a 503 past the drain deadline,
        a 400 when the failure was the request's own fault (`event.client_error`), else a 500."""
        if self.expired:
            return APIError(
                503,
                "The server is shutting down: this request was stopped at the drain deadline (--shutdown-timeout).",
                code="server_shutdown",
                kind="service_unavailable",
            )
        status = 400 if event.client_error else 500
        return APIError(status, f"Generation failed: {event.error}", code="generation_failed")

    async def next_event(self, request: Request) -> TokenEvent:
        """The next event; cancels the request when the client has gone away (checked every DISCONNECT_POLL_S)."""
        while True:
            if time.monotonic() - self.checked_at >= DISCONNECT_POLL_S:
                self.checked_at = time.monotonic()
                if await request.is_disconnected():
                    self.cancel()
            if self.queue.empty():
                try:
                    event = await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S)
                except TimeoutError:
                    continue
            else:
                event = self.queue.get_nowait()
            if event.finish_reason is not None:
                self.finished = True
            return event

    def cancel(self) -> None:
        if not self.finished:
            self.engine.cancel(self.request_id)


@dataclass
class ChoiceState:
    """One of a chat request's `n` choices as it is generated: its events, text, log-probability entries and
    finish reason."""

    index: int
    stream: EngineStream
    text: CompletionText
    timer: RequestTimer
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


def with_adapter(call: Callable[..., Any], adapter: str | None) -> Callable[..., Any]:
    """An engine's `forward` or `predict_actions` with the LoRA `adapter` (engines without adapters take the inputs
    alone)."""
    return call if adapter is None else functools.partial(call, adapter=adapter)


def cancel_choices(choices: list[ChoiceState]) -> None:
    for choice in choices:
        choice.stream.cancel()


def completion_tokens_of(choices: list[ChoiceState]) -> int:
    """The tokens generated so far over all of a request's choices."""
    return sum(len(choice.text.token_ids) for choice in choices)


def end_stream(request: Request, choices: list[ChoiceState]) -> None:
    """What a streamed chat response does however it ends: cancels its choices and counts their tokens into the
    request's access record."""
    cancel_choices(choices)
    note_tokens(request, completion_tokens=completion_tokens_of(choices))


class CancellingStreamingResponse(StreamingResponse):
    """A streaming response that runs `on_close` however it ends (done, or the client went away)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None], **kwargs: Any):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def sse(payload: BaseModel | dict[str, Any]) -> str:
    data = dump(payload, exclude_none=False) if isinstance(payload, BaseModel) else payload
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


# ---- the app ------------------------------------------------------------------------------------------------------


class GuardMiddleware:
    """`Authorization: Bearer <api_key>` on every path but /health (401 otherwise), and a 413 for a declared
    `Content-Length` past the body limit, before the app reads anything."""

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        if self.api_key is not None and scope["path"] != "/health":
            given = headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.api_key.encode()):
                response = error_response(
                    401,
                    "Invalid or missing API key: send `Authorization: Bearer <key>`.",
                    code="invalid_api_key",
                    kind="authentication_error",
                )
                await response(scope, receive, send)
                return
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            response = error_response(
                413, f"The request body exceeds {self.max_body_bytes} bytes.", code="body_too_large"
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class Server:
    """The endpoints' logic over one engine."""

    def __init__(self, engine: GenerationEngine, limits: ServerLimits):
        self.engine = engine
        self.limits = limits
        self.processor = engine.processor
        self.tokenizer = getattr(engine.processor, "tokenizer", engine.processor)
        # Fast tokenizers are not safe to call from several threads at once.
        self.processor_lock = threading.Lock()
        eos = tuple(engine.eos_token_ids)
        if not eos and getattr(self.tokenizer, "eos_token_id", None) is not None:
            eos = (self.tokenizer.eos_token_id,)
        self.stop_token_ids = eos
        # The head the model declares picks its route; a model the server cannot serve stops it here.
        self.served = ServedModel.of(engine.model_id, engine.config, engine.processor)
        # The generation streams open now, ended with an error event when the drain deadline passes.
        self.streams: weakref.WeakSet[EngineStream] = weakref.WeakSet()
        self._relay: EventRelay | None = None
        self.metrics = ServerMetrics(engine)
        #: Compiles structured-output formats; built on the first request that asks for one.
        self.grammars: GrammarCompiler | None = None

    def relay(self) -> EventRelay:
        """The relay of the running event loop's engine events."""
        loop = asyncio.get_running_loop()
        if self._relay is None or self._relay.loop is not loop:
            self._relay = EventRelay(loop)
        return self._relay

    def expire_streams(self) -> None:
        """Ends every open generation with an error event (on the event loop; the drain deadline passed)."""
        streams = list(self.streams)
        if streams:
            logger.warning("The drain deadline passed: ending %d open request(s) with an error.", len(streams))
        for stream in streams:
            stream.expire()

    def check_model(self, name: str | None) -> str | None:
        """The LoRA adapter a request's `model` names (None: the base model); a 404 for a model not served."""
        if name is None or name == self.engine.model_id:
            return None
        if name in self.engine.adapters:
            return name
        served = ", ".join(f"`{model}`" for model in (self.engine.model_id, *self.engine.adapters))
        raise APIError(
            404,
            f"The model `{name}` does not exist; this server serves {served}.",
            param="model",
            code="model_not_found",
            kind="not_found_error",
        )

    def process(self, param: str, **kwargs: Any) -> dict[str, Any]:
        """The processor's tensors for one sample; a processor's ValueError is a 400 on `param`."""
        return self.build_inputs(param, lambda: dict(self.processor(return_tensors="pt", **kwargs)))

    def build_inputs(self, param: str, build: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
        """`build(*args)` under the processor lock. A request error names its own field; anything else the
        processor refuses is a 400 on `param`."""
        try:
            with self.processor_lock:
                return build(*args)
        except (TrajectoryRequestError, ServingError) as error:
            raise APIError(400, str(error), param=error.param or param, code="invalid_value") from error
        except Exception as error:
            # The inputs passed the server's checks, so what the processor refuses is still the request's fault.
            raise APIError(
                400, f"{param}: {type(error).__name__}: {error}", param=param, code="invalid_value"
            ) from error

    def chat_inputs(self, body: ChatCompletionRequest) -> dict[str, Any]:
        messages, images = chat_parts(body.messages, self.limits)
        try:
            with self.processor_lock:
                prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        except Exception as error:
            raise APIError(
                400, f"messages: the chat template rejects them ({error}).", param="messages", code="invalid_value"
            ) from error
        return self.process("messages", images=images or None, text=[prompt])

    async def chat(self, request: Request) -> Response:
        arrival = time.perf_counter()
        body: ChatCompletionRequest = parse_body(await read_body(request, self.limits), ChatCompletionRequest)
        adapter = self.check_model(body.model)
        if self.engine.generation_refusal is not None:
            raise APIError(400, self.engine.generation_refusal, param="model", code="model_generates_no_text")
        inputs = await run_in_threadpool(self.chat_inputs, body)
        prompt_tokens = int(inputs["input_ids"].shape[1])
        note_tokens(request, prompt_tokens=prompt_tokens)
        max_context = self.engine.max_context
        if prompt_tokens >= max_context:
            raise APIError(
                400,
                f"The prompt holds {prompt_tokens} tokens; this model's maximum context length is "
                f"{max_context} tokens.",
                param="messages",
                code="context_length_exceeded",
            )
        limit = body.completion_limit
        if limit is not None and prompt_tokens + limit > max_context:
            raise APIError(
                400,
                f"max_tokens={limit} plus the prompt's {prompt_tokens} tokens exceed this model's "
                f"maximum context length of {max_context} tokens.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        completion_id = new_id("chatcmpl")
        if body.logprobs and not self.engine.supports_logprobs:
            raise APIError(
                400,
                f"{type(self.engine).__name__} reports no log-probabilities.",
                param="logprobs",
                code="unsupported",
            )
        compiled = None
        if body.structured_output is not None:
            compiled = await run_in_threadpool(self.compile_format, *body.structured_output)
        choices = []
        try:
            for index in range(body.n):
                generation = GenerationRequest(
                    request_id=completion_id if body.n == 1 else f"{completion_id}-{index}",
                    inputs=inputs,
                    max_new_tokens=limit if limit is not None else max_context - prompt_tokens,
                    temperature=body.temperature,
                    top_p=body.top_p,
                    top_k=body.top_k,
                    # Choice i draws with seed + i, so that n sampled choices differ and each is reproducible.
                    seed=None if body.seed is None else reduced_seed(body.seed + index),
                    stop_token_ids=self.stop_token_ids,
                    logprobs=body.logprobs_count,
                    constraint=None if compiled is None else self.grammars.constraint(compiled),
                    adapter=adapter,
                )
                stream = EngineStream(self.engine, generation, self.relay())
                self.streams.add(stream)
                text = CompletionText(self.tokenizer, body.stop_strings)
                choices.append(ChoiceState(index, stream, text, RequestTimer(self.metrics, arrival)))
        except APIError:
            cancel_choices(choices)
            raise
        self.metrics.prompt_tokens.inc(prompt_tokens)
        created = now()
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            chunks = self.stream_chunks(
                request, choices, completion_id, created, prompt_tokens, include_usage, adapter or self.engine.model_id
            )
            return CancellingStreamingResponse(
                chunks,
                functools.partial(end_stream, request, choices),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        try:
            await asyncio.gather(*(self.collect(request, choice) for choice in choices))
        finally:
            cancel_choices(choices)
        completion_tokens = completion_tokens_of(choices)
        note_tokens(request, completion_tokens=completion_tokens)
        response = ChatCompletionResponse(
            id=completion_id,
            created=created,
            model=adapter or self.engine.model_id,
            choices=[
                ChatChoice(
                    index=choice.index,
                    message=AssistantMessage(content=choice.text.text),
                    finish_reason=choice.finish_reason,
                    logprobs=ChoiceLogprobs(content=choice.logprobs) if body.logprobs else None,
                )
                for choice in choices
            ],
            usage=Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                total_tokens=prompt_tokens + completion_tokens,
            ),
        )
        return JSONResponse(dump(response))

    def compile_format(self, kind: str, spec: Any) -> Any:
        """The compiled grammar of a request's structured output (a 400 where it cannot be compiled, or the engine
        applies no constraints); the compiler is built on first use."""
        param = "guided_regex" if kind == "regex" else "response_format"
        if not self.engine.supports_constraints:
            raise APIError(
                400, f"{type(self.engine).__name__} applies no structured output.", param=param, code="unsupported"
            )
        with self.processor_lock:
            if self.grammars is None:
                text_config = backbone_config_of(self.engine.config).get_text_config(decoder=True)
                self.grammars = GrammarCompiler(self.tokenizer, text_config.vocab_size, self.stop_token_ids)
        try:
            return self.grammars.compile(kind, spec)
        except ValueError as error:
            raise APIError(400, f"{param}: {error}", param=param, code="invalid_value") from error

    def token_logprob(self, event: TokenEvent) -> TokenLogprob:
        """OpenAI's log-probability entry of the token an event carries."""

        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            token = self.tokenizer.decode([token_id])
            return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8", "surrogatepass"))}

        top = [TopLogprob(**entry(token_id, logprob)) for token_id, logprob in event.top_logprobs]
        return TokenLogprob(**entry(event.token_id, event.logprob), top_logprobs=top)

    def advance(self, choice: ChoiceState, event: TokenEvent) -> str:
        """Takes one event of a choice: its text and log-probability entry grow, and its finish reason is set when
        it ends (its stream is cancelled at a stop string). Returns the text now safe to send; raises the
        request's error when the event ends it with one."""
        delta = choice.text.push(event.token_id, final=event.finish_reason is not None)
        if event.token_id is not None:
            choice.timer.token()
        if event.logprob is not None:
            choice.logprobs.append(self.token_logprob(event))
        if event.finish_reason == "error":
            choice.timer.finish("error")
            raise choice.stream.error(event)
        if choice.text.stopped:
            choice.stream.cancel()
            choice.finish_reason = "stop"
        elif event.finish_reason is not None:
            choice.finish_reason = event.finish_reason
        if choice.finish_reason is not None:
            choice.timer.finish(choice.finish_reason)
        return delta

    async def collect(self, request: Request, choice: ChoiceState) -> None:
        """Runs one choice to its end."""
        while choice.finish_reason is None:
            self.advance(choice, await choice.stream.next_event(request))

    async def stream_chunks(
        self,
        request: Request,
        choices: list[ChoiceState],
        completion_id: str,
        created: int,
        prompt_tokens: int,
        include_usage: bool,
        model: str,
    ) -> AsyncIterator[str]:
        def chunk(
            index: int, delta: DeltaMessage, finish_reason: str | None = None, logprobs: ChoiceLogprobs | None = None
        ) -> str:
            choice = ChunkChoice(index=index, delta=delta, finish_reason=finish_reason, logprobs=logprobs)
            body = ChatCompletionChunk(id=completion_id, created=created, model=model, choices=[choice])
            data = dump(body, exclude={"usage"} if not include_usage else set())
            return sse(data)

        for choice in choices:
            yield chunk(choice.index, DeltaMessage(role="assistant", content=""))
        waiting = {asyncio.ensure_future(choice.stream.next_event(request)): choice for choice in choices}
        try:
            while waiting:
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                for task in sorted(done, key=lambda task: waiting[task].index):
                    choice = waiting.pop(task)
                    entries = len(choice.logprobs)
                    try:
                        delta = self.advance(choice, task.result())
                    except APIError as error:
                        info = ErrorInfo(message=error.message, type=error.kind, code=error.code)
                        yield sse(ErrorResponse(error=info))
                        yield "data: [DONE]\n\n"
                        return
                    new_entries = choice.logprobs[entries:]
                    if new_entries:
                        # Every token's entry goes out with the text it makes safe to send, or on its own chunk.
                        logprobs = ChoiceLogprobs(content=new_entries)
                        yield chunk(choice.index, DeltaMessage(content=delta), logprobs=logprobs)
                    elif delta:
                        yield chunk(choice.index, DeltaMessage(content=delta))
                    if choice.finish_reason is None:
                        waiting[asyncio.ensure_future(choice.stream.next_event(request))] = choice
                    else:
                        yield chunk(choice.index, DeltaMessage(), choice.finish_reason)
        finally:
            for task in waiting:
                task.cancel()
        if include_usage:
            completion_tokens = completion_tokens_of(choices)
            usage = Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                total_tokens=prompt_tokens + completion_tokens,
            )
            final = ChatCompletionChunk(id=completion_id, created=created, model=model, choices=[], usage=usage)
            yield sse(final)
        yield "data: [DONE]\n\n"

    async def run_forward(self, inputs: dict[str, Any], adapter: str | None) -> Any:
        try:
            return await run_in_threadpool(with_adapter(self.engine.forward, adapter), inputs)
        except NotImplementedError as error:
            raise APIError(404, str(error), code="unsupported_endpoint", kind="not_found_error") from error
        except ValueError as error:
            # The model's input checks (e.g. "can_bus contains NaN or inf values.") are the request's fault.
            raise APIError(400, str(error), code="invalid_value") from error

    # ---- the heads' routes: /v1/trajectory, /classify, /v1/actions -------------------------------------------

    def check_route(self, route: str) -> None:
        """A 404 unless `route` serves the head the model declares (a 503 when the engine has no processor)."""
        try:
            self.served.check_route(route)
        except ServingError as error:
            raise APIError(404, str(error), code="unsupported_endpoint", kind="not_found_error") from error
        if self.served.inputs is None:
            message = f"`{self.engine.model_id}` was loaded without its processor, which POST {route} needs."
            raise APIError(503, message, code="processor_missing", kind="service_unavailable")

    def trajectory_inputs(self, body: TrajectoryRequest) -> dict[str, Any]:
        images = [] if body.image is None else [decode_image_url(body.image, self.limits, "image")]
        sample = body.model_dump(include=set(DRIVING_FEATURES))
        return self.build_inputs("prompt", self.served.inputs, images, sample, body.prompt, body.command)

    async def trajectory(self, request: Request) -> Response:
        self.check_route(ROUTE_TRAJECTORY)
        body: TrajectoryRequest = parse_body(await read_body(request, self.limits), TrajectoryRequest)
        adapter = self.check_model(body.model)
        inputs = await run_in_threadpool(self.trajectory_inputs, body)
        output = await self.run_forward(inputs, adapter)
        modes = None
        if self.engine.config.num_modes > 1:
            modes = output.trajectory_modes[0].float().tolist()
        prompt_tokens = int(inputs["input_ids"].shape[1])
        note_tokens(request, prompt_tokens=prompt_tokens)
        response = TrajectoryResponse(
            id=new_id("traj"),
            created=now(),
            model=adapter or self.engine.model_id,
            waypoints=output.trajectory[0].float().tolist(),
            modes=modes,
            usage=ClassificationUsage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens),
        )
        return JSONResponse(dump(response))

    def classification_inputs(self, body: ClassificationRequest) -> list[dict[str, Any]]:
        classifier = self.served.inputs
        if body.messages is not None:
            messages, images = chat_parts(body.messages, self.limits)
            return [self.build_inputs("messages", classifier.for_turn, messages, images)]
        urls = [body.input] if isinstance(body.input, str) else list(body.input)
        if not urls:
            raise APIError(400, "input: give at least one image data URL.", param="input", code="invalid_value")
        if len(urls) > self.limits.max_images:
            raise APIError(
                400, f"At most {self.limits.max_images} images per request.", param="input", code="too_many_images"
            )
        budget = PixelBudget(self.limits)
        images = [decode_image_url(url, self.limits, f"input.{index}", budget) for index, url in enumerate(urls)]
        return [self.build_inputs(f"input.{index}", classifier.for_image, image) for index, image in enumerate(images)]

    async def classify(self, request: Request) -> Response:
        self.check_route(ROUTE_CLASSIFY)
        body: ClassificationRequest = parse_body(await read_body(request, self.limits), ClassificationRequest)
        adapter = self.check_model(body.model)
        samples = await run_in_threadpool(self.classification_inputs, body)
        id2label = self.engine.config.id2label
        data, prompt_tokens = [], 0
        for index, inputs in enumerate(samples):
            output = await self.run_forward(inputs, adapter)
            probs = output.logits[0].float().softmax(dim=-1)
            label = id2label[int(probs.argmax())]
            data.append(ClassificationData(index=index, label=label, probs=probs.tolist(), num_classes=len(probs)))
            if "input_ids" in inputs:
                prompt_tokens += int(inputs["input_ids"].shape[1])
        note_tokens(request, prompt_tokens=prompt_tokens)
        response = ClassificationResponse(
            id=new_id("classify"),
            created=now(),
            model=adapter or self.engine.model_id,
            data=data,
            usage=ClassificationUsage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens),
        )
        return JSONResponse(dump(response))

    def action_inputs(self, body: ActionRequest) -> dict[str, Any]:
        if len(body.images) > self.limits.max_images:
            raise APIError(
                400, f"At most {self.limits.max_images} images per request.", param="images", code="too_many_images"
            )
        budget = PixelBudget(self.limits)
        images = [decode_image_url(url, self.limits, f"images.{i}", budget) for i, url in enumerate(body.images)]
        return self.build_inputs("images", self.served.inputs, images, body.instruction, body.state)

    async def actions(self, request: Request) -> Response:
        self.check_route(ROUTE_ACTIONS)
        body: ActionRequest = parse_body(await read_body(request, self.limits), ActionRequest)
        adapter = self.check_model(body.model)
        inputs = await run_in_threadpool(self.action_inputs, body)
        try:
            actions = await run_in_threadpool(with_adapter(self.engine.predict_actions, adapter), inputs)
        except NotImplementedError as error:
            raise APIError(404, str(error), code="unsupported_endpoint", kind="not_found_error") from error
        except ValueError as error:
            raise APIError(400, str(error), code="invalid_value") from error
        prompt_tokens = int(inputs["input_ids"].shape[1])
        note_tokens(request, prompt_tokens=prompt_tokens)
        response = ActionResponse(
            id=new_id("act"),
            created=now(),
            model=adapter or self.engine.model_id,
            actions=actions[0].float().tolist(),
            usage=ClassificationUsage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens),
        )
        return JSONResponse(dump(response))


def create_app(
    engine: GenerationEngine,
    api_key: str | None = None,
    limits: ServerLimits | None = None,
    close_engine_on_shutdown: bool = False,
    access_log: bool = True,
) -> FastAPI:
    """The FastAPI app over `engine`. With `api_key`, every endpoint but /health needs `Authorization: Bearer
    <api_key>`. With `close_engine_on_shutdown`, the app's shutdown (after uvicorn has finished the requests in
    flight) closes the engine, draining it. Every response carries its request's `X-Request-Id`; with `access_log`,
    each request is logged on the `vlmheads.serve.access` logger (`access_log`)."""
    limits = (limits or ServerLimits()).resolved(engine.processor)
    server = Server(engine, limits)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if close_engine_on_shutdown:
            await run_in_threadpool(engine.close, True)

    app = FastAPI(title="vlmheads", description="OpenAI-compatible server for vlmheads models.", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(400, str(error), code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return error_response(error.status_code, str(error.detail), kind=kind)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.exception("Unhandled error on %s", request.url.path)
        response = error_response(500, f"Internal error: {type(error).__name__}.", code="internal_error")
        # This handler answers outside the access-log middleware, which adds the id to every other response.
        record = access_record(request)
        if record is not None:
            response.headers[REQUEST_ID_HEADER] = record.request_id
        return response

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        cards = model_list(engine.model_id, engine.max_context, server.served.head_kind, engine.adapters)
        return JSONResponse(dump(cards))

    app.add_api_route(ROUTE_CHAT, server.chat, methods=["POST"])
    app.add_api_route(ROUTE_TRAJECTORY, server.trajectory, methods=["POST"])
    app.add_api_route(ROUTE_CLASSIFY, server.classify, methods=["POST"])
    app.add_api_route(ROUTE_ACTIONS, server.actions, methods=["POST"])
    app.add_middleware(GuardMiddleware, api_key=api_key, max_body_bytes=limits.max_body_bytes)
    # Added last, so it runs first: the guard's 401 and 413 answers are logged too.
    app.add_middleware(AccessLogMiddleware, log=access_log)
    return app


class HeaderTimeoutProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    """uvicorn's HTTP protocol (httptools where installed, else h11, as uvicorn picks), plus a header timeout:
    uvicorn times out idle keep-alive connections only after a first response, so a client that connects and never
    completes a request head would hold its connection forever."""

    def __init__(self, *args: Any, header_timeout: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self.header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
        self.header_timer = self.loop.call_later(self.header_timeout, self._header_timed_out, self.cycle)

    def _header_timed_out(self, cycle_when_armed: Any) -> None:
        # A new request head since the timer was armed starts a new cycle; the same cycle means none arrived.
        if self.cycle is cycle_when_armed and not self.transport.is_closing():
            self.transport.close()


class DrainingServer(uvicorn.Server):
    """uvicorn's server whose graceful shutdown has a deadline: `timeouts.shutdown` seconds after it starts, the
    requests still open end with an error event (`on_deadline`); uvicorn cancels what still runs 5 s later (a
    stream to a client that stopped reading cannot take its error event)."""

    def __init__(self, config: uvicorn.Config, on_deadline: Callable[[], None], shutdown_timeout: float):
        super().__init__(config)
        self.on_deadline = on_deadline
        self.shutdown_timeout = shutdown_timeout

    async def shutdown(self, sockets: list[Any] | None = None) -> None:
        deadline = asyncio.get_running_loop().call_later(self.shutdown_timeout, self.on_deadline)
        try:
            await super().shutdown(sockets)
        finally:
            deadline.cancel()


def uvicorn_server(
    app: FastAPI, host: str, port: int, timeouts: ServerTimeouts | None = None, log_level: str = "info"
) -> DrainingServer:
    """A uvicorn server for `app` (made by `create_app`) with the connection time limits of `timeouts`."""
    timeouts = timeouts or ServerTimeouts()
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        http=functools.partial(HeaderTimeoutProtocol, header_timeout=timeouts.header),
        timeout_keep_alive=timeouts.keep_alive,
        timeout_graceful_shutdown=timeouts.shutdown + SHUTDOWN_GRACE_S,
    )
    return DrainingServer(config, app.state.server.expire_streams, timeouts.shutdown)


def serve(
    engine: GenerationEngine,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    limits: ServerLimits | None = None,
    log_level: str = "info",
    timeouts: ServerTimeouts | None = None,
    access_log: bool = True,
) -> None:
    """Serves `engine` until SIGINT / SIGTERM (blocking); then finishes the requests in flight (uvicorn's graceful
    shutdown, ending those still open at `timeouts.shutdown` with an error event) and closes the engine, draining
    it. uvicorn then re-raises the signal, as its own CLI does. Large freed blocks go back to the OS (`memory`).
    `access_log` False writes no access lines (`access_log`)."""
    return_large_blocks_to_the_os()
    app = create_app(engine, api_key=api_key, limits=limits, close_engine_on_shutdown=True, access_log=access_log)
    server = uvicorn_server(app, host, port, timeouts, log_level)
    try:
        server.run()
    finally:
        engine.close(drain=True, timeout=SHUTDOWN_GRACE_S)
