"""What the HTTP server needs from whatever runs the model: one process, or a torch.distributed pipeline.

The server turns a chat request into the processor's outputs for that one prompt, submits it, and receives tokens
one by one through a callback, from the engine's own thread. Engines batch the requests they hold (continuous
batching: a request submitted while a step runs joins the next step).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .sampling import SamplingParams, TokenConstraint


@dataclass
class GenerationRequest:
    """One prompt to continue.

    Args:
        request_id: unique among the requests an engine holds.
        inputs: the processor's outputs for this prompt alone (batch of 1, torch tensors): `input_ids`,
            `attention_mask`, and with images `pixel_values`, `image_grid_thw`, `mm_token_type_ids`.
        max_new_tokens: at most this many tokens are generated (> 0).
        temperature: 0 decodes greedily; above 0 samples from the softmax of logits / temperature (see
            `vlmheads.serve.sampling`: the ranges, and the floor that keeps sampling finite).
        top_p: nucleus sampling mass (only when sampling).
        top_k: keep the k most likely tokens (0: off; only when sampling).
        seed: seeds this request's sampling generator, so a sampled answer can be reproduced.
        stop_token_ids: generation ends after emitting any of these (the eos ids; the server adds none of its own).
        logprobs: None, or report each token's log-probability and the `logprobs` most likely tokens' (engines
            with `supports_logprobs`).
        constraint: what the tokens must follow (structured output; engines with `supports_constraints`); one
            per request, as it holds the sequence's state.
        adapter: the LoRA adapter the request runs with (a name among the engine's `adapters`), None for the base
            model.
    """

    request_id: str
    inputs: dict[str, Any]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    top_k: int = 0
    logprobs: int | None = None
    constraint: TokenConstraint | None = None
    adapter: str | None = None

    def sampling_params(self) -> SamplingParams:
        """The request's sampling settings, checked: a `ValueError` names a field outside its range."""
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed)


@dataclass(frozen=True)
class EngineLoad:
    """What an engine holds now: requests decoding, requests queued, and token positions in its KV cache."""

    running: int = 0
    waiting: int = 0
    cache_tokens: int = 0


@dataclass
class TokenEvent:
    """One step of one request: a new token, or the end of the request (or both).

    `finish_reason` is None while the request runs, then "stop" (a stop token), "length" (max_new_tokens),
    "abort" (cancelled) or "error" (with `error` set); the event that carries a finish_reason is the last.
    `client_error` marks an error that is the request's own fault (its inputs failed the model's checks, or its
    logits could not be sampled): the server answers it with a 400.
    """

    request_id: str
    token_id: int | None
    finish_reason: str | None = None
    error: str | None = None
    client_error: bool = False
    #: With `GenerationRequest.logprobs`: the model's log-probability of `token_id`, and the most likely
    #: (token id, log-probability) pairs at that step.
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


class GenerationEngine(abc.ABC):
    """Runs requests to completion, batching them; thread-safe `submit` / `cancel`."""

    #: The name the server lists under GET /v1/models.
    model_id: str
    #: The processor that prepares `GenerationRequest.inputs` and decodes tokens.
    processor: Any
    #: The longest prompt + completion, in tokens, the engine accepts.
    max_context: int
    #: Token ids that end a completion (the model's generation-config eos ids); the server passes them as
    #: `stop_token_ids`, and falls back to the tokenizer's eos id when this is empty.
    eos_token_ids: tuple[int, ...] = ()
    #: The model's `PretrainedConfig` when the engine has it: the server reads the head the model declares from it
    #: (`head_kind_of`), which picks the route that answers (POST /classify, /v1/trajectory or /v1/actions).
    config: Any = None
    #: Why the engine generates no text with its model (a head without a language-model head, caches it cannot
    #: batch), or None: the server then refuses chat completions with this message before reading the prompt.
    generation_refusal: str | None = None
    #: Whether the engine reports log-probabilities (`GenerationRequest.logprobs`); the server refuses them if not.
    supports_logprobs: bool = False
    #: Whether the engine applies `GenerationRequest.constraint` (structured output); the server refuses it if not.
    supports_constraints: bool = False
    #: The LoRA adapters the engine serves beside its model, name → folder: a request names one as its `model`
    #: (`GenerationRequest.adapter`, the `adapter` of `forward` / `predict_actions`). Engines without adapters keep
    #: this default: none.
    adapters: Mapping[str, Path] = MappingProxyType({})

    @abc.abstractmethod
    def submit(self, request: GenerationRequest, on_event: Callable[[TokenEvent], None]) -> None:
        """Queues `request`; `on_event` is called from the engine's thread for every token and once at the end."""

    @abc.abstractmethod
    def cancel(self, request_id: str) -> None:
        """Stops a request (a client that went away) and frees its slot; its last event has finish_reason "abort"."""

    @abc.abstractmethod
    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stops accepting requests; with `drain`, finishes those in flight first (at most `timeout` seconds)."""

    def load(self) -> EngineLoad:
        """What the engine holds now (GET /metrics). Engines that do not count keep this default: all zero."""
        return EngineLoad()

    def forward(self, inputs: dict[str, Any], adapter: str | None = None) -> Any:
        """One forward pass of the whole model on the processor's outputs (batch of 1) for the endpoints that do not
        generate (trajectory, classify), with the LoRA `adapter` (one of `adapters`) or the base model; returns the
        model's output (`trajectory`, `logits`). These endpoints read no language-model logits: a trajectory model
        that also generates text keeps them to the last position (`trajectory_forward_options`). Thread-safe.
        Engines that only generate keep this default."""
        raise NotImplementedError(f"{type(self).__name__} runs generation only.")

    def predict_actions(self, inputs: dict[str, Any], adapter: str | None = None) -> Any:
        """A VLA's action chunk (1, chunk_size, action_dim) for the collated inputs of one observation, for POST
        /v1/actions (`VLAForActionPrediction.predict_actions`), with the LoRA `adapter` or the base model.
        Thread-safe. Engines that only generate keep this default."""
        raise NotImplementedError(f"{type(self).__name__} predicts no actions.")
