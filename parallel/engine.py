"""`PipelineEngine`: stage 0 of the pipeline as a `serve.engine.GenerationEngine`, the driver of the ring.

The engine's thread admits submitted requests (at most `max_active` at once), runs stage 0 for every request whose
next step is ready (a prompt, or the token the last stage just sent back), sends the result down the pipeline, then
waits for the next token to come back. With several requests in flight every stage works on a different request at
the same moment. With one stage the engine runs the whole model in its own thread, with no torch.distributed.
`forward` (the server's /v1/trajectory and /classify) sends a prompt down the same ring; the last stage runs the
task head and sends its output back. A request that fails on any stage ends alone, with an error.
"""

from __future__ import annotations

import dataclasses
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from ..serve.engine import GenerationEngine, GenerationRequest, TokenEvent
from ..serve.sampling import RequestSampler, SamplingParams
from .runtime import Header, Kind, StageFailure, StageLink, blob_error, decode_blob, encode_blob
from .stages import FORWARD_HEADS, HeadOutput, StageModel, head_inputs

EventCallback = Callable[[TokenEvent], None]


@dataclass
class _Active:
    """A request the pipeline holds."""

    request: GenerationRequest
    on_event: EventCallback | Future
    """A generation request's callback, or the future a `forward` call waits on."""
    key: int
    sampling: SamplingParams
    prompt_length: int = 0
    rope_delta: int = 0
    cache: Any = None
    sampler: RequestSampler | None = None
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    in_flight: bool = False


class PipelineEngine(GenerationEngine):
    """Serves generation requests on a pipeline whose stage 0 runs in this process (rank 0).

    Args:
        stage: stage 0's modules.
        link: the connection to the other stages; None for a single-stage pipeline.
        processor: the model's processor (for the server), or None.
        model_id: the name the server lists.
        max_context: the longest prompt + completion accepted (default: the decoder's `max_position_embeddings`).
        max_active: how many requests the pipeline holds at once; later ones wait in a queue.
        on_failure: called with the message when another stage fails (after every request got its error event).
    """

    def __init__(
        self,
        stage: StageModel,
        link: StageLink | None = None,
        processor: Any = None,
        model_id: str = "vlmheads-pipeline",
        max_context: int | None = None,
        max_active: int = 16,
        on_failure: Callable[[str], None] | None = None,
    ):
        if not stage.is_first:
            raise ValueError(f"PipelineEngine drives stage 0; got stage {stage.stage}.")
        if (link is None) != (stage.plan.num_stages == 1):
            raise ValueError("A pipeline of several stages needs a StageLink; a single stage needs none.")
        if max_active < 1:
            raise ValueError(f"max_active must be >= 1, got {max_active}.")
        self.stage = stage
        self.link = link
        self.processor = processor
        self.model_id = model_id
        self.max_context = max_context or stage.text_config.max_position_embeddings
        self.max_active = max_active
        self.config = stage.model.config
        # A head generates with its backbone (the named models are their own backbone).
        eos = stage.backbone.generation_config.eos_token_id
        self.eos_token_ids = tuple(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.on_failure = on_failure
        self.failure: str | None = None
        self._condition = threading.Condition()
        self._queued: deque[tuple[GenerationRequest, EventCallback | Future]] = deque()
        self._cancelled: set[str] = set()
        self._active: dict[int, _Active] = {}
        self._ready: deque[_Active] = deque()
        self._waiting_replies = 0
        self._next_key = 0
        self._closing = False
        self._drain = True
        self._deadline: float | None = None
        self._thread = threading.Thread(target=self._run, name="pipeline-driver", daemon=True)
        self._thread.start()

    # -- the GenerationEngine contract ------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest, on_event: Callable[[TokenEvent], None]) -> None:
        with self._condition:
            refusal = self.failure or ("the engine is closed" if self._closing else None)
            if refusal is None:
                self._queued.append((request, on_event))
                self._condition.notify_all()
                return
        _end(on_event, request.request_id, "error", refusal)

    def forward(self, inputs: dict[str, Any]) -> HeadOutput:
        """The task head's output for one prompt (the processor's outputs, batch of 1), computed on the last stage:
        `trajectory` / `trajectory_modes` or `logits`. Raises `ValueError` for a request the model refuses."""
        if self.stage.head_kind not in FORWARD_HEADS:
            raise NotImplementedError(
                f"{self.model_id} has no task head to run (head kind {self.stage.head_kind!r}): it generates text."
            )
        future: Future = Future()
        request = GenerationRequest(f"forward-{secrets.token_hex(6)}", inputs, max_new_tokens=1)
        with self._condition:
            refusal = self.failure or ("the engine is closed" if self._closing else None)
            if refusal is None:
                self._queued.append((request, future))
                self._condition.notify_all()
        if refusal is not None:
            raise RuntimeError(refusal)
        return future.result()

    def cancel(self, request_id: str) -> None:
        with self._condition:
            self._cancelled.add(request_id)
            self._condition.notify_all()

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        with self._condition:
            self._closing = True
            self._drain = drain
            if timeout is not None:
                self._deadline = time.monotonic() + timeout
            self._condition.notify_all()
        self._thread.join()

    # -- the driver ---------------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._should_stop():
                self._admit()
                self._drop_cancelled()
                # Only the steps ready now: cancellations and new requests are looked at between steps.
                for _ in range(len(self._ready)):
                    self._step(self._ready.popleft())
                self._wait_for_work()
            self._shutdown()
        except StageFailure as error:
            self._fail(str(error))
        except Exception as error:  # noqa: BLE001 - every request must still get its last event
            self._fail(f"pipeline stage 0 failed: {error!r}")

    def _should_stop(self) -> bool:
        with self._condition:
            if not self._closing:
                return False
            expired = self._deadline is not None and time.monotonic() > self._deadline
            if self._drain and not expired and (self._queued or self._active):
                return False
            queued, self._queued = list(self._queued), deque()
        for request, on_event in queued:
            _end(on_event, request.request_id, "abort", "the engine closed before the request ran")
        for active in list(self._active.values()):
            self._finish(active, None, "abort", free=False)
        return True

    def _admit(self) -> None:
        admitted = []
        with self._condition:
            while self._queued and len(self._active) + len(admitted) < self.max_active:
                admitted.append(self._queued.popleft())
        for request, on_event in admitted:
            try:
                sampling = self._check(request)
            except ValueError as error:
                _end(on_event, request.request_id, "error", str(error), client_error=True)
                continue
            active = _Active(request, on_event, self._next_key, sampling)
            self._next_key += 1
            self._active[active.key] = active
            self._ready.append(active)

    def _check(self, request: GenerationRequest) -> SamplingParams:
        input_ids = request.inputs.get("input_ids")
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"Request {request.request_id!r}: inputs['input_ids'] must be a (1, S) tensor.")
        if request.max_new_tokens < 1:
            raise ValueError(
                f"Request {request.request_id!r}: max_new_tokens must be > 0, got {request.max_new_tokens}."
            )
        total = input_ids.shape[1] + request.max_new_tokens
        if total > self.max_context:
            raise ValueError(
                f"Request {request.request_id!r}: prompt ({input_ids.shape[1]} tokens) + max_new_tokens "
                f"({request.max_new_tokens}) exceeds the context of {self.max_context} tokens."
            )
        sampling = request.sampling_params()
        # The last stage samples: it needs the seed, so that a request is drawn the same however it is split.
        return sampling if sampling.seed is not None else dataclasses.replace(sampling, seed=secrets.randbits(64))

    def _drop_cancelled(self) -> None:
        with self._condition:
            cancelled, self._cancelled = self._cancelled, set()
        for active in list(self._active.values()):
            if active.request.request_id in cancelled:
                active.cancelled = True
                if not active.in_flight:
                    if active in self._ready:
                        self._ready.remove(active)
                    self._finish(active, None, "abort")
        with self._condition:
            # A request cancelled while still queued ends at once.
            kept = deque()
            for request, on_event in self._queued:
                if request.request_id in cancelled:
                    _emit(on_event, TokenEvent(request.request_id, None, "abort"))
                else:
                    kept.append((request, on_event))
            self._queued = kept

    def _step(self, active: _Active) -> None:
        """Runs stage 0 for the request's prompt or its newest token, then samples or runs the head (one stage) or
        sends it on. A failure of this request (bad inputs, a numeric error) ends it alone."""
        stage = self.stage
        prefill = not active.generated
        forward = isinstance(active.on_event, Future)
        try:
            if prefill:
                hidden, positions, active.rope_delta = stage.embed(active.request.inputs)
                active.prompt_length = hidden.shape[1]
                active.cache = stage.new_cache()
            else:
                token = torch.tensor([[active.generated[-1]]], device=stage.device)
                hidden = stage.token_embeddings(token, {})
                positions = stage.positions(active.prompt_length + len(active.generated) - 1, active.rope_delta)
            hidden = stage.run_layers(hidden, positions, active.cache)
            if forward:
                active.cache = None
                if self.link is None:
                    self._finish_forward(active, stage.head_output(hidden, head_inputs(active.request.inputs)))
                    return
                header = Header(Kind.FORWARD, active.key, hidden.shape[1])
                self.link.send_work(header, hidden, positions, encode_blob(head_inputs(active.request.inputs)))
            elif self.link is None:
                if active.sampler is None:
                    active.sampler = RequestSampler(active.sampling)
                token_id = active.sampler.sample(stage.next_token_logits(hidden))
            else:
                kind = Kind.PREFILL if prefill else Kind.DECODE
                self.link.send_work(
                    Header(kind, active.key, hidden.shape[1], sampling=active.sampling), hidden, positions
                )
        except StageFailure:
            raise
        except Exception as error:  # noqa: BLE001 - one request's failure must not end the pipeline
            self._fail_request(active, f"pipeline stage 0: {error}", isinstance(error, ValueError))
            return
        if self.link is None:
            self._on_token(active, token_id)
            return
        active.in_flight = True
        self._waiting_replies += 1

    def _wait_for_work(self) -> None:
        """Receives the next reply when one is due; otherwise waits for a request (or a heartbeat to collect)."""
        if self._waiting_replies or (self.link is not None and self.link.heartbeats_out):
            message = self.link.receive(self.link.previous_stage)
            header = message.header
            if header.kind == Kind.HEARTBEAT:
                self.link.heartbeat_returned()
                return
            self._waiting_replies -= 1
            active = self._active[header.key]
            active.in_flight = False
            if header.kind == Kind.TOKEN:
                self._on_token(active, header.token)
            elif header.kind == Kind.RESULT:
                self._finish_forward(active, HeadOutput(**decode_blob(message.blob)))
            else:
                self._fail_request(active, *blob_error(decode_blob(message.blob)))
            return
        if self._ready:
            return
        with self._condition:
            if self._queued or self._cancelled or self._closing:
                return
            self._condition.wait(self.link.heartbeat_interval / 2 if self.link is not None else None)

    def _on_token(self, active: _Active, token: int) -> None:
        active.generated.append(token)
        request = active.request
        if active.cancelled:
            self._finish(active, None, "abort")
        elif token in request.stop_token_ids:
            self._finish(active, token, "stop")
        elif len(active.generated) >= request.max_new_tokens:
            self._finish(active, token, "length")
        else:
            _emit(active.on_event, TokenEvent(request.request_id, token))
            self._ready.append(active)

    def _finish(
        self,
        active: _Active,
        token: int | None,
        reason: str,
        error: str | None = None,
        free: bool = True,
        client_error: bool = False,
    ) -> None:
        """Ends a generation request: its last event, and (`free`) the other stages drop its cache."""
        del self._active[active.key]
        if free and self.link is not None and (active.generated or reason == "error"):
            self.link.send(self.link.next_stage, Header(Kind.FREE, active.key))
        _emit(active.on_event, TokenEvent(active.request.request_id, token, reason, error, client_error))

    def _finish_forward(self, active: _Active, output: HeadOutput) -> None:
        del self._active[active.key]
        active.on_event.set_result(output)

    def _fail_request(self, active: _Active, message: str, client_error: bool) -> None:
        """Ends one request with an error; the pipeline goes on."""
        error = f"Request {active.request.request_id!r}: {message}"
        if isinstance(active.on_event, Future):
            del self._active[active.key]
            _end(active.on_event, active.request.request_id, "error", error, client_error)
        else:
            self._finish(active, None, "error", error=error, client_error=client_error)

    def _shutdown(self) -> None:
        """Sends SHUTDOWN round the ring and waits for it to come back (dropping replies still in flight)."""
        if self.link is None:
            return
        self.link.stop_heartbeats()
        self.link.send(self.link.next_stage, Header(Kind.SHUTDOWN))
        while True:
            header = self.link.receive(self.link.previous_stage).header
            if header.kind == Kind.SHUTDOWN:
                break
        self.link.close()

    def _fail(self, message: str) -> None:
        if self.link is not None:
            self.link.stop_heartbeats()
        with self._condition:
            self.failure = message
            queued, self._queued = list(self._queued), deque()
        for request, on_event in queued:
            _end(on_event, request.request_id, "error", message)
        for active in list(self._active.values()):
            del self._active[active.key]
            _end(active.on_event, active.request.request_id, "error", message)
        if self.on_failure is not None:
            self.on_failure(message)


def _emit(on_event: Callable[[TokenEvent], None], event: TokenEvent) -> None:
    """Calls a request's callback; a callback that raises must not stop the pipeline."""
    try:
        on_event(event)
    except Exception as error:  # noqa: BLE001 - the server's callback is not ours to trust
        print(f"vlmheads.parallel: the callback of request {event.request_id!r} raised {error!r}", flush=True)


def _end(target: EventCallback | Future, request_id: str, reason: str, error: str, client_error: bool = False) -> None:
    """Ends a request that produced nothing: a last event for a generation request; for a `forward` call, its
    future raises (`ValueError` when the request was at fault, else `RuntimeError`)."""
    if isinstance(target, Future):
        target.set_exception(ValueError(error) if client_error else RuntimeError(error))
    else:
        _emit(target, TokenEvent(request_id, None, reason, error if reason == "error" else None, client_error))
