"""Prefix caching for `LocalEngine`: the KV cache of a recent prompt is reused for a new prompt that starts with the
same tokens and carries the same images and driving features.

A prompt is cut into blocks of BLOCK_TOKENS tokens; block i's key chains a hash of every token up to its end onto a
content hash of all of the request's non-text tensors (pixel values, image grids, scene / history queries, CAN bus,
...). So a request with the same text and a different image shares no key with the cached one and never hits
(vLLM keys on the text alone and returns the other image's answer: vllm#20261). A hit must also cover every token
whose embedding comes from a non-text input (`feature_token_ids`): the rest of the prompt is then run as text alone.

An entry stored with its prompt's tokens and last logits also answers a repeat of that whole prompt (`repeat`: the
same block keys, so the same non-text inputs, and the same tokens after the last whole block): its cache and first
logits are reused and no token runs. The logits are what the model computed for that prompt, so the answer is the
same; this is what makes the `n` choices of one request, and retried requests, cost one prefill.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import DynamicCache

#: Tokens per block: prefixes are shared in whole blocks.
BLOCK_TOKENS = 16


def feature_token_ids(processor: Any) -> frozenset[int]:
    """The ids of the tokens a processor expands for non-text inputs: its `image_token` and `video_token`
    (transformers' VLM processors declare them) and a driving processor's `placeholder_tokens`."""
    tokenizer = getattr(processor, "tokenizer", processor)
    tokens = [getattr(processor, "image_token", None), getattr(processor, "video_token", None)]
    tokens += list(getattr(processor, "placeholder_tokens", {}).values())
    return frozenset(tokenizer.convert_tokens_to_ids(token) for token in tokens if token)


def content_inputs(inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A request's non-text tensors: all but `input_ids` and the tensors aligned with it token for token
    (`attention_mask`, `mm_token_type_ids`: they follow from the tokens)."""
    shape = inputs["input_ids"].shape
    return {
        name: value
        for name, value in inputs.items()
        if isinstance(value, torch.Tensor) and name != "input_ids" and value.shape != shape
    }


def content_digest(inputs: dict[str, Any]) -> bytes:
    """A SHA-256 over every non-text tensor of a request (`content_inputs`): name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    content = content_inputs(inputs)
    for name in sorted(content):
        tensor = content[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.digest()


def block_keys(input_ids: torch.Tensor, digest: bytes) -> list[bytes]:
    """The key of each whole block of `input_ids` (S,): a hash chain over the tokens, seeded by `digest`."""
    keys, key = [], digest
    ids = input_ids.tolist()
    for start in range(0, len(ids) - BLOCK_TOKENS + 1, BLOCK_TOKENS):
        key = hashlib.sha256(key + str(ids[start : start + BLOCK_TOKENS]).encode()).digest()
        keys.append(key)
    return keys


@dataclass
class _Entry:
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    keys: list[bytes]
    #: The whole prompt's token ids (S,) and the logits of its last position (1, 1, V), when stored with them.
    input_ids: torch.Tensor | None = None
    last_logits: torch.Tensor | None = None


@dataclass
class RepeatedPrompt:
    """What a repeated prompt's prefill returns from the cache, as the model's output would: the prompt's KV `cache`
    and the `logits` (1, 1, V) of its last position."""

    cache: DynamicCache
    logits: torch.Tensor


class PrefixCache:
    """The KV caches (keys and values of each layer, (1, heads, S, head_dim)) of the last `max_entries` prompts,
    found by block key; least recently used first out."""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self.entries: OrderedDict[int, _Entry] = OrderedDict()
        self.index: dict[bytes, int] = {}
        #: Prefix hits (`longest_prefix`), the tokens they covered, and whole prompts repeated (`repeat`).
        self.hits = 0
        self.hit_tokens = 0
        self.repeats = 0
        self._next_id = 0

    def longest_prefix(
        self, keys: list[bytes], minimum: int, limit: int
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
        """The cached layers of the longest prefix among `keys` of `minimum` to `limit` tokens, and its length in
        tokens (0 and no layers on a miss)."""
        first = max(1, -(-minimum // BLOCK_TOKENS))
        for block in range(min(len(keys), limit // BLOCK_TOKENS), first - 1, -1):
            entry_id = self.index.get(keys[block - 1])
            if entry_id is not None:
                self.entries.move_to_end(entry_id)
                length = block * BLOCK_TOKENS
                layers = [(k[:, :, :length], v[:, :, :length]) for k, v in self.entries[entry_id].layers]
                self.hits += 1
                self.hit_tokens += length
                return layers, length
        return [], 0

    def repeat(self, keys: list[bytes], input_ids: torch.Tensor) -> RepeatedPrompt | None:
        """The cache and last logits of a stored prompt equal to this one (its block `keys` and token ids (S,)), or
        None. The layers are copied into a fresh cache, which the engine then grows, and the logits are copied too:
        what the caller does with them leaves the entry as it was."""
        entry_id = self.index.get(keys[-1]) if keys else None
        if entry_id is None:
            return None
        entry = self.entries[entry_id]
        if entry.last_logits is None or not torch.equal(entry.input_ids, input_ids):
            return None
        self.entries.move_to_end(entry_id)
        self.repeats += 1
        return RepeatedPrompt(DynamicCache(entry.layers), entry.last_logits.clone())

    def store(
        self,
        keys: list[bytes],
        layers: list[tuple[torch.Tensor, torch.Tensor]],
        input_ids: torch.Tensor | None = None,
        last_logits: torch.Tensor | None = None,
    ) -> None:
        """Keeps `layers` (a prompt's whole cache) under its block keys, evicting the least recently used; with the
        prompt's `input_ids` (S,) and `last_logits` (1, 1, V), the entry also answers a repeat of the whole prompt.
        An entry all of whose keys the new one takes over (the same prompt again, or a shorter prefix of it) is
        dropped, so that a repeated prompt holds one entry, not one per repeat."""
        if not keys or self.max_entries < 1:
            return
        entry_id, self._next_id = self._next_id, self._next_id + 1
        logits = None if last_logits is None else last_logits.detach().clone()
        self.entries[entry_id] = _Entry(layers, keys, input_ids, logits)
        superseded = {self.index[key] for key in keys if key in self.index}
        for key in keys:
            self.index[key] = entry_id
        for old_id in superseded:
            if all(self.index.get(key) != old_id for key in self.entries[old_id].keys):
                del self.entries[old_id]
        while len(self.entries) > self.max_entries:
            _, evicted = self.entries.popitem(last=False)
            for key in evicted.keys:
                if self.index.get(key) not in self.entries:
                    self.index.pop(key, None)
