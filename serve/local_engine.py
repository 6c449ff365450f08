"""`LocalEngine`: one process, one model, its own thread, continuous batching.

Each request is prefilled alone (its own prompt, images and driving features; batch of 1) and keeps its KV cache.
The requests that are decoding share one batched cache: rows are left-padded to the longest, and every decode step
runs all of them together with an explicit attention mask and explicit per-row positions (3-D M-RoPE positions for
Qwen2-VL / Qwen2.5-VL, whose own decode-time positions assume one offset shared by the batch). A request that arrives
while a step runs is prefilled before the next decode step and joins it; a finished or cancelled request leaves the
batch at once, freeing its slot.

With LoRA adapters (`lora.py`), a request names its adapter: its prompt runs with that adapter active, and the
decode step runs every row with its own adapter (or the base model) in one forward pass. A decode step whose batched
forward pass fails is run again row by row: the rows that fail alone end with an error, the others go on.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.functional import pad as pad_tensor
from transformers.cache_utils import DynamicCache, DynamicLayer

from ..modeling.capabilities import backbone_config_of, backbone_family_of
from ..modeling.positions import decode_positions, prompt_positions
from .engine import EngineLoad, GenerationEngine, GenerationRequest, TokenEvent
from .heads import forward_options, generation_refusal
from .lora import LoraAdapters, LoraSpec
from .prefix_cache import PrefixCache, block_keys, content_digest, content_inputs, feature_token_ids
from .sampling import RequestSampler, SamplingError, sample_rows_isolated, token_logprobs

logger = logging.getLogger(__name__)

EventCallback = Callable[[TokenEvent], None]


@dataclass
class _Slot:
    """One request the engine holds: its sampling state and how many tokens its cache rows hold."""

    request: GenerationRequest
    on_event: EventCallback
    sampler: RequestSampler
    cache: DynamicCache | None = None
    cached_tokens: int = 0
    rope_delta: int = 0
    last_token: int = 0
    generated: int = 0
    finished: bool = False


class LocalEngine(GenerationEngine):
    """Serves one in-process model; `submit` / `cancel` / `close` are thread-safe, the model runs on one thread.

    Args:
        model: a causal VLM in eval mode whose decoder cache is a plain self-attention `DynamicCache` (the Orion
            models, Qwen2-VL / Qwen2.5-VL and other decoder-only VLMs).
        processor: the model's processor.
        model_id: the name the server lists.
        max_batch_size: at most this many requests decode together; later ones wait in a queue.
        max_context: the longest prompt + completion accepted (default: the text config's `max_position_embeddings`).
        prefix_cache_entries: how many recent prompts' KV caches are kept for prompts that share their prefix.
        lora: LoRA adapters to serve beside the model (`--lora name=path`, checked by `parse_lora_specs`); they are
            loaded into `model` in place.
    """

    supports_logprobs = True
    supports_constraints = True

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any,
        model_id: str = "vlmheads-tiny",
        max_batch_size: int = 16,
        max_context: int | None = None,
        prefix_cache_entries: int = 0,
        lora: Sequence[LoraSpec] = (),
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}.")
        self.model = model.eval()
        self._lora = LoraAdapters(model, list(lora)) if lora else None
        self.adapters = {} if self._lora is None else dict(self._lora.paths)
        self.processor = processor
        #: The KV caches of recent prompts, reused for prompts that share their prefix and non-text inputs.
        self.prefix_cache = PrefixCache(prefix_cache_entries) if prefix_cache_entries > 0 else None
        self._feature_token_ids = torch.tensor(sorted(feature_token_ids(processor)), dtype=torch.long)
        self.model_id = model_id
        self.config = model.config
        text_config = backbone_config_of(model.config).get_text_config(decoder=True)
        self.max_context = int(max_context or text_config.max_position_embeddings)
        self.max_batch_size = max_batch_size
        self.family = backbone_family_of(model)
        #: Why chat completions are refused (a head without text, Mllama's cross-attention caches), or None.
        self.generation_refusal = generation_refusal(model)
        self._forward_options = forward_options(model)
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self.eos_token_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        self._pending: deque[_Slot] = deque()
        self._cancelled: set[str] = set()
        self._known_ids: set[str] = set()
        self._closing = False
        self._drain = True
        self._wakeup = threading.Condition()
        self._rows: list[_Slot] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None
        self._thread = threading.Thread(target=self._run, name=f"LocalEngine[{model_id}]", daemon=True)
        self._thread.start()

    # ---- the thread-safe API -------------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest, on_event: EventCallback) -> None:
        if self.generation_refusal is not None:
            raise ValueError(self.generation_refusal)
        if request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}.")
        self._check_adapter(request.adapter)
        slot = _Slot(request, on_event, RequestSampler(request.sampling_params(), request.constraint))
        with self._wakeup:
            if self._closing:
                raise RuntimeError("The engine is shutting down and accepts no new requests.")
            if request.request_id in self._known_ids:
                raise ValueError(f"request_id {request.request_id!r} is already in use.")
            self._known_ids.add(request.request_id)
            self._pending.append(slot)
            self._wakeup.notify()

    def cancel(self, request_id: str) -> None:
        with self._wakeup:
            if request_id in self._known_ids:
                self._cancelled.add(request_id)
                self._wakeup.notify()

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        with self._wakeup:
            self._closing = True
            self._drain = drain
            self._wakeup.notify()
        self._thread.join(timeout)

    def load(self) -> EngineLoad:
        with self._wakeup:
            running, waiting = len(self._rows), len(self._pending)
            mask = self._mask
        return EngineLoad(running=running, waiting=waiting, cache_tokens=0 if mask is None else mask.numel())

    @property
    def num_active(self) -> int:
        """Requests queued or decoding."""
        with self._wakeup:
            return len(self._known_ids)

    @torch.no_grad()
    def forward(self, inputs: dict[str, Any], adapter: str | None = None) -> Any:
        with self._adapter(adapter):
            return self.model(**self._to_model(inputs), **self._forward_options)

    @torch.no_grad()
    def predict_actions(self, inputs: dict[str, Any], adapter: str | None = None) -> torch.Tensor:
        # The robot state stays float32, as the VLA's own pipeline feeds it.
        model_inputs = {**self._to_model(inputs), **({"state": inputs["state"]} if "state" in inputs else {})}
        with self._adapter(adapter):
            return self.model.predict_actions(**model_inputs)

    def _check_adapter(self, adapter: str | None) -> None:
        if adapter is not None and adapter not in self.adapters:
            served = ", ".join(self.adapters) or "none"
            raise ValueError(f"No LoRA adapter is named {adapter!r} (adapters served: {served}).")

    @contextlib.contextmanager
    def _adapter(self, adapter: str | None) -> Iterator[None]:
        """Runs the model calls inside with `adapter` active (None: the base model), for one request."""
        self._check_adapter(adapter)
        if self._lora is None:
            yield
            return
        with self._lora.single(adapter):
            yield

    # ---- the engine thread ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wakeup:
                while not self._pending and not self._rows and not self._cancelled and not self._closing:
                    self._wakeup.wait()
                if self._closing and not self._drain:
                    self._cancelled.update(self._known_ids)
                cancelled, self._cancelled = self._cancelled, set()
                admitted = []
                for slot in list(self._pending):
                    if slot.request.request_id in cancelled:
                        self._pending.remove(slot)
                        admitted.append(slot)
                while self._pending and len(self._rows) + len(admitted) < self.max_batch_size:
                    admitted.append(self._pending.popleft())
                idle = self._closing and not self._pending and not self._rows and not admitted
            if idle:
                return
            self._drop_rows(cancelled)
            joining = []
            for slot in admitted:
                if slot.request.request_id in cancelled:
                    self._finish(slot, None, "abort")
                elif self._prefill(slot):
                    joining.append(slot)
            if joining:
                self._join(joining)
            if self._rows:
                self._decode_step()

    def _to_model(self, inputs: dict[str, Any]) -> dict[str, Any]:
        dtype = self.model.dtype
        return {
            name: value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value
            for name, value in inputs.items()
        }

    def _emit(self, slot: _Slot, event: TokenEvent) -> None:
        try:
            slot.on_event(event)
        except Exception:
            logger.exception("The event callback of request %s failed.", slot.request.request_id)

    def _finish(
        self,
        slot: _Slot,
        token: int | None,
        reason: str,
        error: Exception | None = None,
        client_error: bool = False,
        **token_fields: Any,
    ) -> None:
        slot.finished = True
        slot.cache = None
        with self._wakeup:
            self._known_ids.discard(slot.request.request_id)
            self._cancelled.discard(slot.request.request_id)
        event = TokenEvent(slot.request.request_id, token, finish_reason=reason, **token_fields)
        if error is not None:
            event.error = f"{type(error).__name__}: {error}"
            event.client_error = client_error
        self._emit(slot, event)

    def _accept_token(self, slot: _Slot, token: int, logits: torch.Tensor) -> None:
        """Emits `token` (drawn from `logits` (V,)), ending the request on a stop token or at max_new_tokens."""
        slot.generated += 1
        slot.last_token = token
        fields: dict[str, Any] = {}
        if slot.request.logprobs is not None:
            fields["logprob"], fields["top_logprobs"] = token_logprobs(logits, token, slot.request.logprobs)
        if token in slot.request.stop_token_ids:
            self._finish(slot, token, "stop", **fields)
        elif slot.generated >= slot.request.max_new_tokens:
            self._finish(slot, token, "length", **fields)
        else:
            self._emit(slot, TokenEvent(slot.request.request_id, token, **fields))

    def _prompt_positions(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, int]:
        """Positions of the prompt (3, 1, S) for M-RoPE models, else (1, S), and the offset of decode positions."""
        positions, deltas = prompt_positions(self.model, self.family, inputs)
        return positions, int(deltas.reshape(-1)[0])

    def _prefill(self, slot: _Slot) -> bool:
        """Runs the prompt of one request, emits its first token, and says whether it goes on decoding."""
        request = slot.request
        try:
            inputs = self._to_model(request.inputs)
            input_ids = inputs["input_ids"]
            if input_ids.ndim != 2 or input_ids.shape[0] != 1:
                raise ValueError(f"inputs['input_ids'] must have shape (1, S), got {tuple(input_ids.shape)}.")
            position_ids, slot.rope_delta = self._prompt_positions(inputs)
            keys, prefix_layers, reused = self._cached_prefix(inputs, request.adapter)
            repeat = None if self.prefix_cache is None else self.prefix_cache.repeat(keys, input_ids[0])
            with torch.no_grad(), self._adapter(request.adapter):
                if repeat is not None:
                    # The same whole prompt (tokens, images, adapter) ran before: its cache and last logits.
                    outputs = repeat
                elif reused:
                    # The prefix holds every non-text token: the rest of the prompt runs as text alone.
                    outputs = self.model(
                        input_ids=input_ids[:, reused:],
                        attention_mask=torch.ones_like(input_ids),
                        position_ids=position_ids[..., reused:],
                        cache=DynamicCache(prefix_layers),
                        use_cache=True,
                        logits_to_keep=1,
                    )
                else:
                    outputs = self.model(
                        **inputs, position_ids=position_ids, cache=DynamicCache(), use_cache=True, logits_to_keep=1
                    )
            cache = outputs.cache
            if any(type(layer) is not DynamicLayer for layer in cache.layers):
                raise ValueError(
                    f"LocalEngine batches plain self-attention caches only; {type(self.model).__name__} returned "
                    f"{sorted({type(layer).__name__ for layer in cache.layers})}."
                )
            slot.cache = cache
            slot.cached_tokens = input_ids.shape[1]
            if self.prefix_cache is not None and repeat is None:
                layers = [(layer.keys, layer.values) for layer in cache.layers]
                self.prefix_cache.store(keys, layers, input_ids[0], outputs.logits[:, -1:])
            token = slot.sampler.sample(outputs.logits[:, -1])
        except Exception as error:
            logger.exception("Prefill of request %s failed.", request.request_id)
            # The model's input checks raise ValueError for what the request itself got wrong.
            self._finish(slot, None, "error", error=error, client_error=isinstance(error, ValueError))
            return False
        self._accept_token(slot, token, outputs.logits[0, -1])
        return not slot.finished

    def _cached_prefix(
        self, inputs: dict[str, Any], adapter: str | None
    ) -> tuple[list[bytes], list[tuple[torch.Tensor, ...]], int]:
        """The prompt's block keys, and the cached layers and length of its longest cached prefix that holds all of
        its non-text tokens and leaves at least one token to run (no layers and 0 on a miss). The keys start from
        the content digest and the LoRA adapter's name: an adapter's KV cache is never reused for another."""
        if self.prefix_cache is None:
            return [], [], 0
        input_ids = inputs["input_ids"][0]
        adapter_tag = b"" if adapter is None else b"lora:" + adapter.encode("utf-8", "surrogatepass")
        keys = block_keys(input_ids, content_digest(inputs) + adapter_tag)
        if content_inputs(inputs) and not len(self._feature_token_ids):
            return keys, [], 0
        features = torch.isin(input_ids, self._feature_token_ids).nonzero()
        minimum = int(features[-1]) + 1 if len(features) else 0
        layers, length = self.prefix_cache.longest_prefix(keys, minimum=minimum, limit=len(input_ids) - 1)
        return keys, layers, length

    def _join(self, joining: list[_Slot]) -> None:
        """Left-pads the batched cache and the joining requests' caches to one length and stacks them."""
        old_length = 0 if self._mask is None else self._mask.shape[1]
        length = max(old_length, *(slot.cached_tokens for slot in joining))
        parts = [] if self._cache is None else [(self._cache, self._mask, old_length)]
        parts += [
            (slot.cache, torch.ones(1, slot.cached_tokens, dtype=torch.long), slot.cached_tokens) for slot in joining
        ]
        num_layers = len(parts[0][0].layers)
        layers = []
        for index in range(num_layers):
            keys, values = [], []
            for cache, _, part_length in parts:
                layer = cache.layers[index]
                keys.append(torch.nn.functional.pad(layer.keys, (0, 0, length - part_length, 0)))
                values.append(torch.nn.functional.pad(layer.values, (0, 0, length - part_length, 0)))
            layers.append((torch.cat(keys), torch.cat(values)))
        self._mask = torch.cat(
            [torch.nn.functional.pad(mask, (length - part_length, 0)) for _, mask, part_length in parts]
        )
        self._cache = DynamicCache(layers)
        for slot in joining:
            slot.cache = None
        self._rows += joining

    def _drop_rows(self, request_ids: set[str]) -> None:
        """Removes finished rows and those of `request_ids` (ended as "abort") from the batch."""
        if not self._rows:
            return
        for slot in self._rows:
            if not slot.finished and slot.request.request_id in request_ids:
                self._finish(slot, None, "abort")
        keep = [row for row, slot in enumerate(self._rows) if not slot.finished]
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[row] for row in keep]
        if not keep:
            self._cache = self._mask = None
            return
        index = torch.tensor(keep)
        mask = self._mask.index_select(0, index)
        # Columns that are padding in every remaining row are dropped.
        start = int((mask.sum(dim=0) > 0).nonzero()[0])
        self._mask = mask[:, start:]
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]

    def _decode_step(self) -> None:
        rows = self._rows
        input_ids = torch.tensor([[slot.last_token] for slot in rows])
        length = self._mask.shape[1]
        self._mask = torch.cat([self._mask, torch.ones(len(rows), 1, dtype=self._mask.dtype)], dim=1)
        next_positions = torch.tensor([slot.cached_tokens + slot.rope_delta for slot in rows])
        failures: dict[int, Exception] = {}
        try:
            outputs = self._decode_forward(rows, input_ids, self._mask, next_positions, self._cache)
            self._cache, logits = outputs.cache, outputs.logits[:, -1]
        except Exception:
            logger.exception("A decode step of %d requests failed; running its rows one by one.", len(rows))
            try:
                logits, failures = self._decode_rows_alone(rows, input_ids, next_positions, length)
            except Exception as error:
                logger.exception("Running the rows of a failed decode step one by one failed.")
                for slot in rows:
                    self._finish(slot, None, "error", error=error)
                self._rows, self._cache, self._mask = [], None, None
                return
        # A failed row's logits are NaN: it draws nothing, and ends with its own error below.
        tokens = sample_rows_isolated(logits, [slot.sampler for slot in rows])
        for row, (slot, token) in enumerate(zip(rows, tokens, strict=True)):
            slot.cached_tokens += 1
            if row in failures:
                error = failures[row]
                self._finish(slot, None, "error", error=error, client_error=isinstance(error, ValueError))
            elif isinstance(token, SamplingError):
                # This row alone ends; its batch-mates go on.
                logger.warning("Sampling request %s failed: %s", slot.request.request_id, token)
                self._finish(slot, None, "error", error=token, client_error=True)
            else:
                self._accept_token(slot, token, logits[row])
        self._drop_rows(set())

    def _decode_forward(
        self,
        rows: list[_Slot],
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        next_positions: torch.Tensor,
        cache: DynamicCache,
    ) -> Any:
        """One decode step of `rows`: their last tokens `input_ids` (B, 1), attention `mask` (B, L + 1) and the
        positions of the new tokens `next_positions` (B,), over their `cache`; each row with its own adapter."""
        inputs = {
            "input_ids": input_ids,
            "attention_mask": mask,
            "position_ids": decode_positions(self.family, next_positions),
            "cache": cache,
            "use_cache": True,
        }
        with torch.no_grad():
            if self._lora is None:
                return self.model(**inputs)
            return self._lora.run_rows([slot.request.adapter for slot in rows], **inputs)

    def _decode_rows_alone(
        self, rows: list[_Slot], input_ids: torch.Tensor, next_positions: torch.Tensor, length: int
    ) -> tuple[torch.Tensor, dict[int, Exception]]:
        """Runs a failed decode step again one row at a time, on the cache as it was before the step (`length`
        tokens). Returns the last logits (B, V), NaN in the rows that failed, and each failed row's error. The
        batched cache then holds every row's new token (zeros in the failed rows, which leave the batch)."""
        before = [(layer.keys[:, :, :length], layer.values[:, :, :length]) for layer in self._cache.layers]
        row_logits: dict[int, torch.Tensor] = {}
        row_layers: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        failures: dict[int, Exception] = {}
        for row, slot in enumerate(rows):
            alone = slice(row, row + 1)
            cache = DynamicCache([(keys[alone], values[alone]) for keys, values in before])
            try:
                outputs = self._decode_forward(
                    [slot], input_ids[alone], self._mask[alone], next_positions[alone], cache
                )
                row_logits[row] = outputs.logits[0, -1]
                row_layers.append([(layer.keys, layer.values) for layer in outputs.cache.layers])
            except Exception as error:
                logger.warning("The decode step of request %s failed: %s", slot.request.request_id, error)
                failures[row] = error
                new_column = (0, 0, 0, 1)
                row_layers.append(
                    [(pad_tensor(k[alone], new_column), pad_tensor(v[alone], new_column)) for k, v in before]
                )
        self._cache = DynamicCache(
            [
                tuple(torch.cat([layers[index][part] for layers in row_layers]) for part in (0, 1))
                for index in range(len(before))
            ]
        )
        vocab = next(iter(row_logits.values())).shape[-1] if row_logits else 1
        logits = torch.full((len(rows), vocab), float("nan"))
        for row, values in row_logits.items():
            logits[row] = values
        return logits, failures
