"""Prometheus metrics of the server (`GET /metrics`), named after vLLM's: requests running and waiting, cache use,
prompt and generated tokens, time to first token, inter-token latency and end-to-end latency histograms, and
finished requests by reason. Each app has its own registry, so that several servers in one process count apart."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .engine import GenerationEngine

PREFIX = "vlmheads:"
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


class ServerMetrics:
    """The server's metrics over `engine`; `registry` is what GET /metrics exposes."""

    def __init__(self, engine: GenerationEngine):
        self.registry = CollectorRegistry()
        running = Gauge(f"{PREFIX}num_requests_running", "Requests decoding.", registry=self.registry)
        waiting = Gauge(f"{PREFIX}num_requests_waiting", "Requests queued for a slot.", registry=self.registry)
        cached = Gauge(f"{PREFIX}kv_cache_tokens", "Token positions in the engine's KV cache.", registry=self.registry)
        running.set_function(lambda: engine.load().running)
        waiting.set_function(lambda: engine.load().waiting)
        cached.set_function(lambda: engine.load().cache_tokens)
        self.prompt_tokens = Counter(f"{PREFIX}prompt_tokens", "Prompt tokens submitted.", registry=self.registry)
        self.generation_tokens = Counter(f"{PREFIX}generation_tokens", "Tokens generated.", registry=self.registry)
        self.time_to_first_token = self._latency("time_to_first_token", "From arrival to the first token.")
        self.inter_token_latency = self._latency("inter_token_latency", "Between consecutive tokens of a request.")
        self.e2e_latency = self._latency("e2e_request_latency", "From the request's arrival to its end.")
        self.finished = Counter(
            f"{PREFIX}request_success",
            "Requests ended, by finish reason.",
            ["finished_reason"],
            registry=self.registry,
        )

    def _latency(self, name: str, documentation: str) -> Histogram:
        return Histogram(f"{PREFIX}{name}_seconds", documentation, buckets=_LATENCY_BUCKETS, registry=self.registry)


class RequestTimer:
    """The timing of one generated sequence, reported to `metrics` token by token."""

    def __init__(self, metrics: ServerMetrics, arrival: float):
        self.metrics, self.arrival, self.last_token_at = metrics, arrival, None

    def token(self) -> None:
        now = time.perf_counter()
        if self.last_token_at is None:
            self.metrics.time_to_first_token.observe(now - self.arrival)
        else:
            self.metrics.inter_token_latency.observe(now - self.last_token_at)
        self.last_token_at = now
        self.metrics.generation_tokens.inc()

    def finish(self, reason: str) -> None:
        self.metrics.e2e_latency.observe(time.perf_counter() - self.arrival)
        self.metrics.finished.labels(finished_reason=reason).inc()
