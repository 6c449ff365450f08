"""vlmheads.serve: an OpenAI-compatible HTTP server in front of a generation engine (one process, or a pipeline)."""

from .engine import GenerationEngine, GenerationRequest, TokenEvent
from .local_engine import LocalEngine

__all__ = ["GenerationEngine", "GenerationRequest", "LocalEngine", "TokenEvent"]
