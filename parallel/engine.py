"""`PipelineEngine`: stage 0 of the pipeline as a `serving.engine.GenerationEngine`, the driver of the ring.

The engine's thread admits submitted requests (at most `max_active` at once), runs stage 0 for every request whose
next step is ready (a prompt, or the token the last stage just sent back), sends the result down the pipeline, then
waits for the next token to come back. With several requests in flight every stage works on a different request at
the same moment. With one stage the engine runs the whole model in its own thread, with no torch.distributed.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..serve.engine import GenerationEngine, GenerationRequest, TokenEvent
from .runtime import Header, Kind, StageFailure, StageLink
from .stages import SamplingSettings, StageModel, TokenSampler


@dataclass
class _Active:
    """A request the pipeline holds."""

    request: GenerationRequest
    on_event: Callable[[TokenEvent], None]
    key: int
    sampling: SamplingSettings
    prompt_length: int = 0
    rope_delta: int = 0
    cache: Any = None
    sampler: TokenSampler | None = None
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
        eos = stage.model.generation_config.eos_token_id
        self.eos_token_ids = tuple(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.on_failure = on_failure
        self.failure: str | None = None
        self._condition = threading.Condition()
        self._queued: deque[tuple[GenerationRequest, Callable[[TokenEvent], None]]] = deque()
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
        _emit(on_event, TokenEvent(request.request_id, None, "error", refusal))

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
            _emit(on_event, TokenEvent(request.request_id, None, "abort"))
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
                _emit(on_event, TokenEvent(request.request_id, None, "error", str(error)))
                continue
            active = _Active(request, on_event, self._next_key, sampling)
            self._next_key += 1
            self._active[active.key] = active
            self._ready.append(active)

    def _check(self, request: GenerationRequest) -> SamplingSettings:
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
        seed = request.seed if request.seed is not None else secrets.randbits(62)
        return SamplingSettings(request.temperature, request.top_p, seed)

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
        """Runs stage 0 for the request's prompt or its newest token, then samples (one stage) or sends it on."""
        stage = self.stage
        prefill = not active.generated
        try:
            if prefill:
                hidden, positions, active.rope_delta = stage.embed(active.request.inputs)
                active.prompt_length = hidden.shape[1]
                active.cache = stage.new_cache()
            else:
                token = torch.tensor([[active.generated[-1]]], device=stage.device)
                hidden = stage.token_embeddings(token, {})
                positions = stage.positions(active.prompt_length + len(active.generated) - 1, 1, active.rope_delta)
            hidden = stage.run_layers(hidden, positions, active.cache)
            if self.link is None:
                if active.sampler is None:
                    active.sampler = TokenSampler(active.sampling)
                self._on_token(active, active.sampler(stage.next_token_logits(hidden)))
                return
        except ValueError as error:
            self._finish(active, None, "error", error=f"Request {active.request.request_id!r}: {error}")
            return
        kind = Kind.PREFILL if prefill else Kind.DECODE
        header = Header(kind, active.key, hidden.shape[1], sampling=active.sampling)
        self.link.send_work(header, hidden, positions)
        active.in_flight = True
        self._waiting_replies += 1

    def _wait_for_work(self) -> None:
        """Receives the next reply when one is due; otherwise waits for a request (or a heartbeat to collect)."""
        if self._waiting_replies or (self.link is not None and self.link.heartbeats_out):
            header, _, _ = self.link.receive(self.link.previous_stage)
            if header.kind == Kind.HEARTBEAT:
                self.link.heartbeat_returned()
            elif header.kind == Kind.TOKEN:
                self._waiting_replies -= 1
                active = self._active[header.key]
                active.in_flight = False
                self._on_token(active, header.token)
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
        self, active: _Active, token: int | None, reason: str, error: str | None = None, free: bool = True
    ) -> None:
        """Ends a request: its last event, and (`free`) the other stages drop its cache."""
        del self._active[active.key]
        if free and self.link is not None and active.generated:
            self.link.send(self.link.next_stage, Header(Kind.FREE, active.key))
        _emit(active.on_event, TokenEvent(active.request.request_id, token, reason, error))

    def _shutdown(self) -> None:
        """Sends SHUTDOWN round the ring and waits for it to come back (dropping replies still in flight)."""
        if self.link is None:
            return
        self.link.stop_heartbeats()
        self.link.send(self.link.next_stage, Header(Kind.SHUTDOWN))
        while True:
            header, _, _ = self.link.receive(self.link.previous_stage)
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
            _emit(on_event, TokenEvent(request.request_id, None, "error", message))
        for active in list(self._active.values()):
            del self._active[active.key]
            _emit(active.on_event, TokenEvent(active.request.request_id, None, "error", message))
        if self.on_failure is not None:
            self.on_failure(message)


def _emit(on_event: Callable[[TokenEvent], None], event: TokenEvent) -> None:
    """Calls a request's callback; a callback that raises must not stop the pipeline."""
    try:
        on_event(event)
    except Exception as error:  # noqa: BLE001 - the server's callback is not ours to trust
        print(f"vlmheads.parallel: the callback of request {event.request_id!r} raised {error!r}", flush=True)
