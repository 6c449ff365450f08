"""The NumPy twin of `vlmheads.serve.sampling` for the torch-free ONNX Runtime host: the same warpers in the same
order as transformers' `generate` (temperature, top-k, top-p), the same temperature floor, and the same failure of
a row whose logits cannot be sampled. Tested equal to the torch sampler (`tests/test_onnx_sampling.py`).
"""

import numpy as np

# `vlmheads.serve.sampling.MIN_TEMPERATURE`, restated because that module imports torch; a test pins the two equal.
MIN_TEMPERATURE = 0.01


class SamplingError(ValueError):
    """One row's logits cannot be sampled (NaN, +inf, or every token at -inf)."""


def _top_k(logits: np.ndarray, top_k: int) -> np.ndarray:
    """transformers' `TopKLogitsWarper`: logits below the k-th largest of their row become -inf."""
    if top_k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -top_k, axis=-1)[:, -top_k][:, None]
    return np.where(logits < kth, -np.inf, logits)


def _top_p(logits: np.ndarray, top_p: float) -> np.ndarray:
    """transformers' `TopPLogitsWarper`: keeps the smallest set of most likely tokens whose probability reaches
    `top_p` (at least one)."""
    order = np.argsort(logits, axis=-1, kind="stable")
    sorted_logits = np.take_along_axis(logits, order, axis=-1)
    probs = np.exp(sorted_logits - sorted_logits[:, -1:])
    probs /= probs.sum(axis=-1, keepdims=True)
    removed = np.cumsum(probs, axis=-1) <= 1 - top_p
    removed[:, -1] = False
    filtered = np.where(removed, -np.inf, sorted_logits)
    result = np.empty_like(logits)
    np.put_along_axis(result, order, filtered, axis=-1)
    return result


def warp(logits: np.ndarray, temperature: float, top_k: int | None = None, top_p: float = 1.0) -> np.ndarray:
    """Float32 logits (B, V) after the temperature (raised to `MIN_TEMPERATURE` when below it), top-k (None or 0:
    off) and top-p (1: off), in that order."""
    logits = np.asarray(logits, dtype=np.float32) / np.float32(max(temperature, MIN_TEMPERATURE))
    if top_k:
        logits = _top_k(logits, top_k)
    if top_p < 1:
        logits = _top_p(logits, top_p)
    return logits


def sample(
    logits: np.ndarray, rng: np.random.Generator, temperature: float, top_k: int | None = None, top_p: float = 1.0
) -> np.ndarray:
    """One token per row of `logits` (B, V), drawn from the softmax of the warped logits with `rng`; a
    `SamplingError` names the first row whose logits hold NaN or +inf, or nothing finite."""
    logits = np.asarray(logits, dtype=np.float32)
    row_max = logits.max(axis=-1)
    bad = np.flatnonzero(~np.isfinite(row_max))
    if len(bad):
        raise SamplingError(f"row {int(bad[0])}: the model's logits hold NaN or inf (row maximum {row_max[bad[0]]}).")
    warped = warp(logits, temperature, top_k, top_p)
    probs = np.exp(warped - warped.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(len(row), p=row) for row in probs], dtype=np.int64)
