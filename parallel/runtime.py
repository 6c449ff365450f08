"""The torch.distributed side of the pipeline: the messages stages pass, and the loop of every stage after the first.

Stage s is rank s. Work flows in a ring: stage 0 embeds a request's tokens and runs its layers, each later stage
runs its layers over its own cache of that request, and the last stage samples the next token and sends it back to
stage 0, which embeds it while the other stages work on other requests ("recurrent pipeline parallelism": one
request per micro-batch, so every request's tokens are exactly those of single-process generation).

Every message starts with a fixed-size int64 header (kind, request key, sequence length, sampling settings), sent
over a gloo group, then, for work, the hidden states (1, S, H) and, for a prompt, its M-RoPE positions (3, 1, S)
over the default group (NCCL on GPUs); a decode step's one text position travels in the header.
Every wait has a deadline: a stage that dies or stops answering makes its neighbours raise `StageFailure` naming it.
"""

from __future__ import annotations

import datetime
import queue
import sys
import threading
import time
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load, save

from ..serve.sampling import RequestSampler, SamplingParams, reduced_seed
from .stages import StageModel

HEADER_SIZE = 10


class Kind(IntEnum):
    """What a message carries."""

    PREFILL = 1
    """A request's prompt: hidden states and positions follow; the header carries the sampling settings."""
    DECODE = 2
    """A request's next token: hidden states (1, 1, H) follow; its position (the same in every M-RoPE row) is in
    the header."""
    TOKEN = 3
    """Last stage → stage 0: the token sampled for a request."""
    FREE = 4
    """A request ended: drop its cache."""
    HEARTBEAT = 5
    """Sent round the ring while the pipeline is idle, so that silence means failure."""
    SHUTDOWN = 6
    """Sent round the ring once; every stage stops after passing it on."""
    FORWARD = 7
    """A prompt for the task head (no generation, no cache kept): hidden states, positions and the head's inputs
    (a tensor blob: `input_ids`, ...) follow."""
    RESULT = 8
    """Last stage → stage 0: the task head's output of a FORWARD request, as a tensor blob."""
    FAILED = 9
    """A stage could not compute a request: a blob with the error follows. Passed round the ring to stage 0 (every
    stage on the way drops the request's cache), which answers that request alone."""


class StageFailure(RuntimeError):
    """Another stage died or stopped answering."""


def _float_bits(value: float) -> int:
    return int(torch.tensor([value], dtype=torch.float64).view(torch.int64)[0])


def _bits_float(value: int) -> float:
    return float(torch.tensor([value], dtype=torch.int64).view(torch.float64)[0])


def _seed_bits(seed: int) -> int:
    """A seed as the int64 whose bits are its uint64 (`reduced_seed`), so that every seed the sampler takes fits."""
    reduced = reduced_seed(seed)
    return reduced - 2**64 if reduced >= 2**63 else reduced


def encode_blob(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Named tensors as one uint8 tensor (safetensors bytes), sent after a header that gives its length."""
    # Clones: safetensors refuses tensors that share memory (a head's `trajectory` is a view of its modes).
    data = save({name: tensor.detach().cpu().clone() for name, tensor in tensors.items()})
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode_blob(blob: torch.Tensor) -> dict[str, torch.Tensor]:
    return load(blob.cpu().numpy().tobytes())


def error_blob(message: str, client_error: bool) -> torch.Tensor:
    """A request's failure: its message, and whether it is the request's fault (a `ValueError` of the model's
    input checks), which the server answers with a 400."""
    text = torch.frombuffer(bytearray(message.encode()), dtype=torch.uint8)
    return encode_blob({"error": text, "client_error": torch.tensor([int(client_error)])})


def blob_error(blob: dict[str, torch.Tensor]) -> tuple[str, bool]:
    return blob["error"].numpy().tobytes().decode(errors="replace"), bool(blob["client_error"][0])


@dataclass
class Header:
    """The fixed-size head of every message; `blob` is the byte length of a tensor blob that follows."""

    kind: Kind
    key: int = 0
    length: int = 0
    token: int = 0
    sampling: SamplingParams | None = None
    position: int = 0
    blob: int = 0

    def encode(self) -> torch.Tensor:
        sampling = self.sampling or SamplingParams()
        values = [
            int(self.kind),
            self.key,
            self.length,
            self.token,
            _float_bits(sampling.temperature),
            _float_bits(sampling.top_p),
            sampling.top_k,
            _seed_bits(sampling.seed or 0),
            self.position,
            self.blob,
        ]
        return torch.tensor(values, dtype=torch.int64)

    @classmethod
    def decode(cls, values: torch.Tensor) -> Header:
        kind, key, length, token, temperature, top_p, top_k, seed, position, blob = values.tolist()
        sampling = None
        if kind == Kind.PREFILL:
            sampling = SamplingParams(_bits_float(temperature), _bits_float(top_p), top_k, reduced_seed(seed))
        return cls(Kind(kind), key, length, token, sampling, position, blob)


class StageLink:
    """Sends and receives this stage's messages; every wait fails with `StageFailure` after its deadline.

    `timeout` is how long a stage may stay silent; stage 0, which waits on the whole ring, allows half as long again,
    so that the stage after a failed one reports it first, by name.
    """

    def __init__(
        self,
        stage: int,
        num_stages: int,
        timeout: float,
        device: torch.device,
        hidden_size: int,
        dtype: torch.dtype,
        header_group: dist.ProcessGroup | None = None,
        position_rows: int = 3,
    ):
        self.stage = stage
        self.position_rows = position_rows
        self.num_stages = num_stages
        self.timeout = timeout
        self.device = device
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.header_group = header_group
        self.next_stage = (stage + 1) % num_stages
        self.previous_stage = (stage - 1) % num_stages
        # gloo sends wait for the matching receive: a thread of their own sends the messages in order, so that
        # computing never waits on a busy neighbour (and the ring cannot deadlock).
        # Messages: (peer, [(tensor, process group)], queued by `send`), or None to stop.
        self._outbox: queue.Queue[tuple[int, list[tuple[torch.Tensor, Any]], bool] | None] = queue.Queue()
        self._send_failure: StageFailure | None = None
        # Stage 0 sends a heartbeat round the ring whenever it has sent nothing for a quarter of the timeout.
        self.heartbeat_interval = timeout / 4 if stage == 0 else None
        self._heartbeat_lock = threading.Lock()
        self._heartbeats_on = stage == 0
        self._heartbeats_out = 0
        self._sender = threading.Thread(target=self._send_loop, name=f"pipeline-stage-{stage}-sender", daemon=True)
        self._sender.start()

    def _describe(self, peer: int) -> str:
        return f"stage {peer} (rank {peer})"

    def _wait(self, work, peer: int, timeout: float, what: str) -> None:
        try:
            work.wait(timeout=datetime.timedelta(seconds=timeout))
        except RuntimeError as error:
            if self.stage == 0 and peer == self.num_stages - 1 and self.num_stages > 2:
                culprit = f"the last stage, {self._describe(peer)}, or a stage before it"
            else:
                culprit = self._describe(peer)
            raise StageFailure(
                f"pipeline stage {self.stage}: {culprit} died or stopped answering: no {what} within "
                f"{timeout:g} s ({error})."
            ) from error

    def _send_loop(self) -> None:
        while True:
            try:
                message = self._outbox.get(timeout=self.heartbeat_interval)
            except queue.Empty:
                message = self._heartbeat()
                if message is None:
                    continue
            if message is None:
                return
            peer, tensors, queued = message
            try:
                if self._send_failure is None:
                    for tensor, group in tensors:
                        self._wait(dist.isend(tensor, peer, group=group), peer, self.timeout, "receive of a message")
            except StageFailure as error:
                self._send_failure = error
            finally:
                if queued:
                    self._outbox.task_done()

    def _heartbeat(self) -> tuple[int, list[tuple[torch.Tensor, Any]], bool] | None:
        with self._heartbeat_lock:
            if not self._heartbeats_on:
                return None
            self._heartbeats_out += 1
        return self.next_stage, [(Header(Kind.HEARTBEAT).encode(), self.header_group)], False

    @property
    def heartbeats_out(self) -> int:
        """Heartbeats sent whose return stage 0 has not received yet."""
        with self._heartbeat_lock:
            return self._heartbeats_out

    def heartbeat_returned(self) -> None:
        with self._heartbeat_lock:
            self._heartbeats_out -= 1

    def stop_heartbeats(self) -> None:
        with self._heartbeat_lock:
            self._heartbeats_on = False

    def _check_sends(self) -> None:
        if self._send_failure is not None:
            raise self._send_failure

    def send(
        self,
        peer: int,
        header: Header,
        tensors: tuple[torch.Tensor, ...] = (),
        blob: torch.Tensor | None = None,
    ) -> None:
        """Queues a message to `peer`: the header and a blob over the header group, tensors over the default group
        (NCCL on GPUs). Raises `StageFailure` when an earlier message was not taken in time."""
        self._check_sends()
        header.blob = 0 if blob is None else blob.numel()
        message = [(header.encode(), self.header_group), *((tensor.contiguous(), None) for tensor in tensors)]
        if blob is not None:
            message.append((blob, self.header_group))
        self._outbox.put((peer, message, True))

    def send_work(
        self, header: Header, hidden: torch.Tensor, positions: torch.Tensor, blob: torch.Tensor | None = None
    ) -> None:
        """Queues a request's hidden states (1, S, H) and positions (R, 1, S) to the next stage (and for FORWARD
        the head's inputs); a decode step's one text position travels in the header."""
        if header.kind == Kind.DECODE:
            header.position = int(positions[0, 0, 0])
            self.send(self.next_stage, header, (hidden,))
        else:
            self.send(self.next_stage, header, (hidden, positions), blob)

    def close(self) -> None:
        """Waits for every queued message to be received, then stops the sending thread."""
        self.stop_heartbeats()
        self._outbox.join()
        self._outbox.put(None)
        self._sender.join()
        self._check_sends()

    def receive(self, peer: int) -> Message:
        """The next message from `peer`: its header, and for work hidden states (1, S, H) and positions (R, 1, S),
        and its blob when it carries one."""
        self._check_sends()
        timeout = self.timeout * 1.5 if self.stage == 0 else self.timeout
        encoded = torch.empty(HEADER_SIZE, dtype=torch.int64)
        try:
            self._wait(dist.irecv(encoded, peer, group=self.header_group), peer, timeout, "message")
        except StageFailure:
            # A stage downstream that stopped taking messages explains the silence upstream: name it instead (its
            # send may be timing out at the same moment).
            deadline = time.monotonic() + 1.0
            while self._send_failure is None and self._outbox.unfinished_tasks and time.monotonic() < deadline:
                time.sleep(0.01)
            self._check_sends()
            raise
        self._check_sends()
        message = Message(Header.decode(encoded))
        header = message.header
        if header.kind in (Kind.PREFILL, Kind.DECODE, Kind.FORWARD):
            message.hidden = torch.empty(1, header.length, self.hidden_size, dtype=self.dtype, device=self.device)
            self._wait(dist.irecv(message.hidden, peer), peer, self.timeout, "hidden states")
            if header.kind == Kind.DECODE:
                message.positions = torch.full(
                    (self.position_rows, 1, 1), header.position, dtype=torch.int64, device=self.device
                )
            else:
                message.positions = torch.empty(
                    self.position_rows, 1, header.length, dtype=torch.int64, device=self.device
                )
                self._wait(dist.irecv(message.positions, peer), peer, self.timeout, "positions")
        if header.blob:
            message.blob = torch.empty(header.blob, dtype=torch.uint8)
            self._wait(dist.irecv(message.blob, peer, group=self.header_group), peer, self.timeout, "tensor blob")
        return message


@dataclass
class Message:
    """A received message: its header, and what follows it."""

    header: Header
    hidden: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    blob: torch.Tensor | None = None


def run_worker(stage: StageModel, link: StageLink) -> None:
    """The loop of stages 1..N-1: run the layers for every request that arrives, until SHUTDOWN comes round.

    A request this stage cannot compute (a model error, logits that cannot be sampled) ends alone: the stage drops
    its cache and passes a FAILED message on towards stage 0, which answers that request; the pipeline goes on.
    """
    caches: dict[int, Any] = {}
    samplers: dict[int, RequestSampler] = {}
    while True:
        message = link.receive(link.previous_stage)
        header = message.header
        if header.kind in (Kind.PREFILL, Kind.DECODE, Kind.FORWARD):
            try:
                _run_request(stage, link, message, caches, samplers)
            except StageFailure:
                raise
            except Exception as error:  # noqa: BLE001 - one request's failure must not end the pipeline
                caches.pop(header.key, None)
                samplers.pop(header.key, None)
                failure = error_blob(f"pipeline stage {stage.stage}: {error}", isinstance(error, ValueError))
                link.send(link.next_stage, Header(Kind.FAILED, header.key), blob=failure)
            continue
        if header.kind in (Kind.FREE, Kind.FAILED):
            caches.pop(header.key, None)
            samplers.pop(header.key, None)
            if header.kind == Kind.FREE and stage.is_last:
                continue
        link.send(link.next_stage, header, blob=message.blob)
        if header.kind == Kind.SHUTDOWN:
            link.close()
            return


def _run_request(
    stage: StageModel,
    link: StageLink,
    message: Message,
    caches: dict[int, Any],
    samplers: dict[int, RequestSampler],
) -> None:
    """Runs the stage's layers for one message, then passes the result on (or, last stage, the token or head
    output back to stage 0)."""
    header = message.header
    if header.kind == Kind.FORWARD:
        hidden = stage.run_layers(message.hidden, message.positions, stage.new_cache())
        if not stage.is_last:
            link.send_work(header, hidden, message.positions, message.blob)
            return
        output = stage.head_output(hidden, decode_blob(message.blob))
        tensors = {name: value.float() for name, value in output.items() if value is not None}
        link.send(0, Header(Kind.RESULT, header.key), blob=encode_blob(tensors))
        return
    if header.kind == Kind.PREFILL:
        caches[header.key] = stage.new_cache()
        if stage.is_last:
            samplers[header.key] = RequestSampler(header.sampling)
    hidden = stage.run_layers(message.hidden, message.positions, caches[header.key])
    if stage.is_last:
        token = samplers[header.key].sample(stage.next_token_logits(hidden))
        link.send(0, Header(Kind.TOKEN, header.key, token=token))
    else:
        link.send_work(header, hidden, message.positions)


def report_failure(error: BaseException) -> None:
    """Prints why this stage stops, on stderr."""
    print(f"vlmheads.parallel: {error}", file=sys.stderr, flush=True)
