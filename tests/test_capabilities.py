"""Declared capabilities: every head class names its head kind, read by `head_kind_of`, and the family it sits on."""

import pytest
from transformers import Qwen2VLConfig

from vlmheads import (
    OrionQwen2_5Config,
    OrionQwen2_5ForTrajectory,
    OrionQwenConfig,
    OrionQwenForTrajectory,
    ReceiptVLClassifier,
    ReceiptVLConfig,
    VLAConfig,
    VLAForActionPrediction,
    VLMClassificationConfig,
    VLMForImageClassification,
    VLMForTrajectory,
    VLMTrajectoryConfig,
    create_vlm,
    tiny_vlm_config,
)
from vlmheads.configuration.constants import (
    HEAD_ACTIONS,
    HEAD_CLASSIFICATION,
    HEAD_GENERATION,
    HEAD_KINDS,
    HEAD_TRAJECTORY,
)
from vlmheads.modeling.capabilities import backbone_family_of, head_kind_of

DECLARED = {
    OrionQwenForTrajectory: (OrionQwenConfig, HEAD_TRAJECTORY),
    OrionQwen2_5ForTrajectory: (OrionQwen2_5Config, HEAD_TRAJECTORY),
    ReceiptVLClassifier: (ReceiptVLConfig, HEAD_CLASSIFICATION),
    VLMForImageClassification: (VLMClassificationConfig, HEAD_CLASSIFICATION),
    VLMForTrajectory: (VLMTrajectoryConfig, HEAD_TRAJECTORY),
    VLAForActionPrediction: (VLAConfig, HEAD_ACTIONS),
}


@pytest.mark.parametrize("model_class", DECLARED, ids=lambda cls: cls.__name__)
def test_model_and_config_classes_declare_the_same_head_kind(model_class):
    config_class, kind = DECLARED[model_class]
    assert model_class.head_kind == kind
    assert config_class.head_kind == kind
    assert kind in HEAD_KINDS


def test_head_kind_of_reads_configs_and_models_and_names_backbones_generation():
    backbone = tiny_vlm_config("llava")
    assert head_kind_of(VLMClassificationConfig(backbone_config=backbone, num_labels=3)) == HEAD_CLASSIFICATION
    assert head_kind_of(VLAConfig(backbone_config=backbone)) == HEAD_ACTIONS
    assert head_kind_of(VLMTrajectoryConfig(backbone_config=backbone)) == HEAD_TRAJECTORY
    assert head_kind_of(backbone) == HEAD_GENERATION
    model = VLMForImageClassification.from_backbone(create_vlm("llava", tiny=True), num_labels=2)
    assert head_kind_of(model) == HEAD_CLASSIFICATION
    assert head_kind_of(model.backbone) == HEAD_GENERATION
    # The config does not store the class-level declaration: saved folders keep their config.json as before.
    assert "head_kind" not in model.config.to_dict()


def test_backbone_family_of_named_and_generic_heads():
    assert backbone_family_of(OrionQwenConfig()).name == "qwen2-vl"
    assert backbone_family_of(ReceiptVLConfig()).name == "mllama"
    assert backbone_family_of(VLAConfig(backbone_config=tiny_vlm_config("smolvlm"))).name == "smolvlm"


def test_head_kind_of_refuses_what_declares_none():
    with pytest.raises(ValueError, match="predicts actions"):
        head_kind_of(tiny_vlm_config("pi0"))
    with pytest.raises(ValueError, match="not a registered VLM family"):
        head_kind_of(Qwen2VLConfig().text_config)
    with pytest.raises(ValueError, match="Expected a model or a configuration"):
        head_kind_of(object())
