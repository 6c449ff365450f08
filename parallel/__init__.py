"""Pipeline-parallel inference: a decoder-only VLM (or a vlmheads head on one) whose family the table declares
`pipeline_splittable`, split into stages, one process each."""

from .engine import PipelineEngine
from .runtime import StageFailure
from .stages import PlanError, StageModel, StagePlan, load_stage_model, make_plan, prepare

__all__ = [
    "PipelineEngine",
    "PlanError",
    "StageFailure",
    "StageModel",
    "StagePlan",
    "load_stage_model",
    "make_plan",
    "prepare",
]
