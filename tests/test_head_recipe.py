"""The "Adding a head" recipe of the README, enforced: every head model that vlmheads exports has a pipeline task, a
model card template and a server route for its declared head kind."""

import inspect

import pytest
from transformers import PreTrainedModel
from transformers.pipelines import PIPELINE_REGISTRY

import vlmheads
from vlmheads.configuration.constants import HEAD_GENERATION, HEAD_KINDS, HEAD_TASKS
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


@pytest.mark.parametrize("head", HEADS, ids=lambda cls: cls.__name__)
def test_a_head_has_its_kind_pipeline_card_and_route(head):
    kind = head.head_kind
    assert kind in HEAD_KINDS and kind != HEAD_GENERATION, f"{head.__name__}.head_kind={kind!r}: {RECIPE} (step 1)"
    assert head.config_class.head_kind == kind, (
        f"{head.config_class.__name__} must declare head_kind={kind!r} like {head.__name__}: {RECIPE} (step 1)"
    )
    task = HEAD_TASKS.get(kind)
    assert task is not None, f"head kind {kind!r} has no pipeline task in constants.HEAD_TASKS: {RECIPE} (step 3)"
    assert task in PIPELINE_REGISTRY.get_supported_tasks(), f"no pipeline runs {task!r}: {RECIPE} (step 3)"
    for task_name, reference in head.pipelines.items():
        assert task_name == task, f"{head.__name__}.pipelines names {task_name!r}, its kind's task is {task!r}"
        assert reference.rsplit(".", 2)[-2].startswith("pipeline_"), f"{reference}: {RECIPE} (step 3)"
    assert issubclass(head, ModelCardMixin) and head.model_card_template, (
        f"{head.__name__}: no card, {RECIPE} (step 4)"
    )
    assert (ModelCardMixin.model_card_dir / head.model_card_template).is_file(), (
        f"model_cards/{head.model_card_template} is missing: {RECIPE} (step 4)"
    )
    assert kind in HEAD_ROUTES, (
        f"the server has no route for head kind {kind!r} (serve/heads.py HEAD_ROUTES): {RECIPE}"
    )
