"""Pipeline-parallel inference: a Qwen2-VL / Qwen2.5-VL (or Orion) model split into stages, one process each."""

from .engine import PipelineEngine
from .runtime import StageFailure
from .stages import StageModel, StagePlan, load_stage_model, make_plan, prepare

__all__ = ["PipelineEngine", "StageFailure", "StageModel", "StagePlan", "load_stage_model", "make_plan", "prepare"]
