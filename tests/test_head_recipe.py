"""The "Adding a head" recipe of the README, enforced: every head model that vlmheads exports has a pipeline task, a
model card template and a server route for its declared head kind."""

import inspect

import pytest
from transformers import PreTrainedModel
from transformers.pipelines import PIPELINE_REGISTRY

import vlmheads
from vlmheads.configuration import constants
from vlmheads.configuration.configuration_vlm_heads import VLMHeadConfig
from vlmheads.modeling.modeling_vlm_heads import VLMHeadPreTrainedModel
from vlmheads.publishing import ModelCardMixin
from vlmheads.serve.heads import HEAD_ROUTES

RECIPE = "see README.md, 'Adding a head'"
HEADS = sorted(
    (
        obj
        for obj in (getattr(vlmheads, name) for name in vlmheads.__all__)
        if inspect.isclass(obj) and issubclass(obj, PreTrainedModel) and getattr(obj, "head_kind", None)
    ),
    key=lambda cls: cls.__name__,
)


def test_every_exported_head_model_is_found():
    names = {cls.__name__ for cls in HEADS}
    assert {"OrionQwenForTrajectory", "ReceiptVLClassifier", "VLAForActionPrediction"} <= names
    assert {"VLMForImageClassification", "VLMForTrajectory"} <= names


def recipe_gaps(head: type) -> list[str]:
    """What an exported head model lacks of the recipe, each with a pointer to it (empty: nothing)."""
    kind = getattr(head, "head_kind", None)
    if kind not in constants.HEAD_KINDS or kind == constants.HEAD_GENERATION:
        return [f"{head.__name__}.head_kind={kind!r} is not a head kind of constants.HEAD_KINDS: {RECIPE} (step 2)"]
    gaps = []
    if getattr(head.config_class, "head_kind", None) != kind:
        config_name = head.config_class.__name__
        gaps.append(f"{config_name} must declare head_kind={kind!r} like {head.__name__}: {RECIPE} (step 1)")
    task = constants.HEAD_TASKS.get(kind)
    if task is None:
        gaps.append(f"head kind {kind!r} has no pipeline task in constants.HEAD_TASKS: {RECIPE} (step 1)")
    elif task not in PIPELINE_REGISTRY.get_supported_tasks():
        gaps.append(f"no pipeline runs {task!r}: register one in _models.py, {RECIPE} (step 3)")
    for task_name, reference in getattr(head, "pipelines", {}).items():
        if task_name != task or not reference.rsplit(".", 2)[-2].startswith("pipeline_"):
            gaps.append(f"{head.__name__}.pipelines = {{{task_name!r}: {reference!r}}}: {RECIPE} (step 2)")
    template = getattr(head, "model_card_template", "")
    if not (issubclass(head, ModelCardMixin) and template and (ModelCardMixin.model_card_dir / template).is_file()):
        gaps.append(f"{head.__name__} has no model card template in model_cards/: {RECIPE} (step 4)")
    if kind not in HEAD_ROUTES:
        gaps.append(f"serve/heads.py HEAD_ROUTES has no route for head kind {kind!r}: {RECIPE}")
    return gaps


@pytest.mark.parametrize("head", HEADS, ids=lambda cls: cls.__name__)
def test_a_head_has_its_kind_pipeline_card_and_route(head):
    assert recipe_gaps(head) == []


def test_a_head_registered_without_its_parts_gets_pointers_to_the_recipe(monkeypatch):
    monkeypatch.setattr(constants, "HEAD_KINDS", (*constants.HEAD_KINDS, "segmentation"))

    class SegmentationConfig(VLMHeadConfig):
        head_kind = "segmentation"

    class VLMForSegmentation(VLMHeadPreTrainedModel):
        config_class = SegmentationConfig
        head_kind = "segmentation"

    gaps = recipe_gaps(VLMForSegmentation)
    assert any("HEAD_TASKS" in gap for gap in gaps)
    assert any("model card template" in gap for gap in gaps)
    assert any("HEAD_ROUTES" in gap for gap in gaps)
    assert all(RECIPE in gap for gap in gaps)
