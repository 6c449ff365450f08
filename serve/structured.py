"""Structured output through xgrammar: OpenAI's `response_format` (`json_schema`, `json_object`) and a regular
expression (vLLM's `guided_regex`). Each generated sequence gets its own grammar matcher; before each token, the
tokens the grammar forbids are set to -inf in that sequence's logits, so greedy and sampled decoding both stay in the
grammar, and once it is complete only a stop token may follow."""

from __future__ import annotations

import json
import threading
from typing import Any

import torch
import xgrammar

from .sampling import SamplingError

#: How many of the model's best tokens a greedy row offers the grammar, one by one, before it fills the bitmask.
PROBED_TOKENS = 8


class GrammarConstraint:
    """One sequence's grammar state: `best_allowed(logits, argmax)` (greedy rows) or `mask(logits)` before a token is
    drawn from logits (V,), `accept(token)` after. The bitmask (1, ceil(V / 32)) int32 is allocated once, filled at
    most once per token, and not applied when it allows every token.

    Filling the bitmask checks the whole vocabulary against the grammar (for a regular expression over Qwen's 151k
    tokens, milliseconds), while offering one token to the matcher costs about a microsecond. So a greedy row first
    offers the model's own best tokens in turn, the way llama.cpp checks a sampled token before it masks: the first
    one the grammar takes is the argmax over the allowed tokens, and no bitmask is filled."""

    def __init__(self, compiled: xgrammar.CompiledGrammar, vocab_size: int):
        self.matcher = xgrammar.GrammarMatcher(compiled)
        self.vocab_size = vocab_size
        self.bitmask = xgrammar.allocate_token_bitmask(1, vocab_size)
        #: Whether the filled bitmask forbids any token; None until it is filled for the next token.
        self.restricts: bool | None = None

    def _fill(self) -> bool:
        if self.restricts is None:
            self.restricts = bool(self.matcher.fill_next_token_bitmask(self.bitmask))
        return self.restricts

    def best_allowed(self, logits: torch.Tensor, argmax: int) -> int | None:
        """The argmax of logits (V,) over the tokens the grammar allows, taken (accepted) already, found by offering
        the unconstrained `argmax`, then the PROBED_TOKENS best tokens in order; None when none of them is allowed,
        or the one allowed ties with the next best (then the bitmask decides, and nothing was taken)."""
        if self.matcher.accept_token(argmax):
            self.restricts = None
            return argmax
        values, tokens = logits.topk(PROBED_TOKENS + 1)
        values, tokens = values.tolist(), tokens.tolist()
        for rank in range(PROBED_TOKENS):
            if self.matcher.accept_token(tokens[rank]):
                if values[rank] > values[rank + 1]:
                    self.restricts = None
                    return tokens[rank]
                self.matcher.rollback(1)
                return None
        return None

    def mask(self, logits: torch.Tensor) -> None:
        """Sets the logits (V,) of every token the grammar forbids now to -inf, in place."""
        if self._fill():
            xgrammar.apply_token_bitmask_inplace(logits.view(1, -1), self.bitmask, vocab_size=self.vocab_size)

    def accept(self, token: int) -> None:
        self.restricts = None
        if not self.matcher.accept_token(token):
            raise SamplingError(f"token {token} does not continue the requested format.")


class GrammarCompiler:
    """Compiles the formats requests ask for against one tokenizer (compiled grammars are cached by xgrammar)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: tuple[int, ...]):
        self.vocab_size = vocab_size
        info = xgrammar.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids) or None
        )
        self.compiler = xgrammar.GrammarCompiler(info)
        self.lock = threading.Lock()

    def compile(self, kind: str, spec: Any) -> xgrammar.CompiledGrammar:
        """`kind` "json_schema" (spec: the schema), "json_object" (any JSON object) or "regex" (spec: the pattern);
        a schema or pattern xgrammar cannot compile is a ValueError naming it. Output has no free whitespace, so a
        closed format ends."""
        try:
            with self.lock:
                if kind == "json_schema":
                    return self.compiler.compile_json_schema(json.dumps(spec), any_whitespace=False)
                if kind == "json_object":
                    return self.compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
                if kind == "regex":
                    return self.compiler.compile_regex(spec)
        except RuntimeError as error:
            raise ValueError(f"the {kind} cannot be compiled into a grammar: {error}") from error
        raise ValueError(f"unknown structured output kind {kind!r}")

    def constraint(self, compiled: xgrammar.CompiledGrammar) -> GrammarConstraint:
        return GrammarConstraint(compiled, self.vocab_size)
