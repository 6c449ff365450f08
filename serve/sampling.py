"""The one token sampler of every runtime (the single-process server, the pipeline's last stage, ONNX's twin).

A request's `SamplingParams` are checked once, where they enter: a value the sampler cannot compute with is a
`ValueError` naming the field and its range. Sampling runs transformers' own logits warpers
(`TemperatureLogitsWarper`, `TopKLogitsWarper`, `TopPLogitsWarper`, in that order, as `generate` applies them) on
float32 logits, then draws from the softmax with the request's own `torch.Generator`, so a seeded request answers
the same alone or in any batch.

Numerics: a temperature in (0, MIN_TEMPERATURE) is raised to MIN_TEMPERATURE (vLLM does the same): logits / 1e-38
overflow float32 to inf, and the softmax of inf is NaN. A row whose logits hold NaN or +inf, or only -inf, fails
alone with a `SamplingError`; the other rows of the batch are sampled as usual.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

#: Temperatures in (0, MIN_TEMPERATURE) sample at MIN_TEMPERATURE: logits up to 3e36 stay finite in float32 after
#: the division, and the distribution is already all but greedy.
MIN_TEMPERATURE = 0.01
#: The largest temperature accepted (OpenAI's range is [0, 2]).
MAX_TEMPERATURE = 2.0
#: Seeds are taken modulo 2**64 (a torch generator's seed is a uint64); outside [SEED_MIN, SEED_MAX] they are refused.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


class SamplingError(ValueError):
    """One row's logits cannot be sampled (NaN, +inf, or every token at -inf)."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens.

    Args:
        temperature: 0 decodes greedily; in (0, MAX_TEMPERATURE] samples from softmax(logits / temperature), with
            temperatures below MIN_TEMPERATURE raised to it.
        top_p: nucleus mass in (0, 1] (1: off).
        top_k: keep the k most likely tokens (0: off).
        seed: seeds the request's generator (reduced modulo 2**64); None draws a fresh seed.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and 0.0 <= self.temperature <= MAX_TEMPERATURE):
            raise ValueError(f"temperature must be in [0, {MAX_TEMPERATURE}], got {self.temperature}.")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0: off), got {self.top_k!r}.")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not SEED_MIN <= self.seed <= SEED_MAX
        ):
            raise ValueError(f"seed must be an integer in [{SEED_MIN}, {SEED_MAX}], got {self.seed!r}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def effective_temperature(self) -> float:
        """The temperature sampling runs at: the request's, raised to MIN_TEMPERATURE (0 when greedy)."""
        return 0.0 if self.greedy else max(self.temperature, MIN_TEMPERATURE)

    def warpers(self) -> LogitsProcessorList:
        """transformers' warpers for these settings, in `generate`'s order (empty when greedy)."""
        if self.greedy:
            return LogitsProcessorList()
        warpers = [TemperatureLogitsWarper(self.effective_temperature)]
        if self.top_k > 0:
            warpers.append(TopKLogitsWarper(self.top_k))
        if self.top_p < 1.0:
            warpers.append(TopPLogitsWarper(self.top_p))
        return LogitsProcessorList(warpers)


def reduced_seed(seed: int) -> int:
    """`seed` modulo 2**64: the uint64 a torch generator holds (also what a pipeline sends between stages)."""
    return seed % 2**64


class TokenConstraint(Protocol):
    """What a sequence's tokens must follow (structured output): `mask` sets the logits (V,) of the tokens it
    forbids to -inf in place before a token is drawn; `accept` takes the drawn token (raises if it breaks it);
    `best_allowed(logits, argmax)` may find and take a greedy row's token without a mask (None: mask)."""

    def best_allowed(self, logits: torch.Tensor, argmax: int) -> int | None: ...

    def mask(self, logits: torch.Tensor) -> None: ...

    def accept(self, token: int) -> None: ...


class RequestSampler:
    """One request's sampler: its warpers, its own generator and its constraint. `sample(logits)` takes logits
    (1, V) or (V,)."""

    def __init__(self, params: SamplingParams, constraint: TokenConstraint | None = None):
        self.params = params
        self.constraint = constraint
        self.warpers = params.warpers()
        self.generator: torch.Generator | None = None
        if not params.greedy:
            self.generator = torch.Generator()
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(reduced_seed(params.seed))

    def warp(self, logits: torch.Tensor) -> torch.Tensor:
        """The warped float32 logits (1, V) that sampling draws from (softmax) for logits (1, V) or (V,)."""
        return self.warpers(None, logits.reshape(1, -1).float())

    def sample(self, logits: torch.Tensor) -> int:
        """The next token for logits (1, V) or (V,); raises `SamplingError` for logits that cannot be sampled."""
        return sample_rows(logits.reshape(1, -1), [self])[0]


def sample_rows(logits: torch.Tensor, samplers: list[RequestSampler]) -> list[int]:
    """The next token of each row of `logits` (B, V), row b drawn by `samplers[b]`; raises `SamplingError` when
    a row fails. To keep one row's failure from its batch-mates, use `sample_rows_isolated`."""
    results = sample_rows_isolated(logits, samplers)
    for result in results:
        if isinstance(result, SamplingError):
            raise result
    return results


def row_maxima(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The maximum of each row of `logits` (B, V) and the index of its first occurrence (B,), NaN counting as the
    maximum, as `torch.max(dim=-1)` gives them. On the CPU through NumPy's argmax, which takes a fraction of the time
    of torch's `max(dim=-1)` on one thread (a 16 x 151,661 batch: about 2 ms against 15 ms)."""
    if logits.device.type != "cpu":
        return logits.max(dim=-1)
    tokens = torch.from_numpy(logits.detach().numpy().argmax(axis=-1))
    return logits[torch.arange(len(tokens)), tokens], tokens


def sample_rows_isolated(logits: torch.Tensor, samplers: list[RequestSampler]) -> list[int | SamplingError]:
    """The next token of each row of `logits` (B, V), or the `SamplingError` of that row alone: greedy rows take
    the argmax, the others draw from their warped softmax with their own generator."""
    if logits.ndim != 2 or logits.shape[0] != len(samplers):
        raise ValueError(f"logits must have shape ({len(samplers)}, V), got {tuple(logits.shape)}.")
    logits = logits.float()
    # One pass gives the greedy tokens and, since max propagates NaN, the rows that cannot be sampled.
    row_max, greedy_tokens = row_maxima(logits)
    finite = torch.isfinite(row_max).tolist()
    greedy_tokens = greedy_tokens.tolist()
    results: list[int | SamplingError] = []
    for row, sampler in enumerate(samplers):
        if not finite[row]:
            results.append(SamplingError(f"the model's logits hold NaN or inf (row maximum {float(row_max[row])})."))
        elif sampler.constraint is not None:
            results.append(_constrained(sampler, logits[row], greedy_tokens[row]))
        elif sampler.params.greedy:
            results.append(greedy_tokens[row])
        else:
            results.append(_draw(sampler, logits[row]))
    return results


def _constrained(sampler: RequestSampler, logits: torch.Tensor, greedy_token: int) -> int | SamplingError:
    """The next token of a constrained row: drawn (or the argmax) among the tokens its constraint allows. A greedy
    row asks its constraint first, which may find that token without a mask (from `greedy_token`, the row's own
    argmax, and the next best)."""
    try:
        if sampler.params.greedy:
            token = sampler.constraint.best_allowed(logits, greedy_token)
            if token is not None:
                return token
        allowed = logits.clone()
        sampler.constraint.mask(allowed)
        best, best_token = allowed.max(dim=0)
        if not torch.isfinite(best):
            return SamplingError("the requested format allows no token here.")
        token = int(best_token) if sampler.params.greedy else _draw(sampler, allowed)
        if isinstance(token, int):
            sampler.constraint.accept(token)
        return token
    except SamplingError as error:
        return error


def _draw(sampler: RequestSampler, logits: torch.Tensor) -> int | SamplingError:
    probabilities = torch.softmax(sampler.warp(logits), dim=-1)
    total = float(probabilities.sum())
    if not math.isfinite(total) or total <= 0.0:
        return SamplingError(f"the warped distribution is not finite (total probability {total}).")
    return int(torch.multinomial(probabilities, 1, generator=sampler.generator)[0, 0])


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> tuple[float, tuple[tuple[int, float], ...]]:
    """The model's log-probability of `token` under logits (V,) (log-softmax of the raw logits, before any warper,
    as OpenAI and vLLM report it), and the `top` most likely (token id, log-probability) pairs, most likely first."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    values, ids = logprobs.topk(top) if top > 0 else (logprobs[:0], logprobs[:0].long())
    return float(logprobs[token]), tuple(zip(ids.tolist(), values.tolist(), strict=True))
