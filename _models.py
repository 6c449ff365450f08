"""The models, processors and registry, registered with the Auto classes (needs torch)."""

from importlib.resources import files
from pathlib import Path

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForImageTextToText,
    AutoProcessor,
)
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration.configuration_orion_qwen import OrionQwen2_5Config, OrionQwenConfig
from .configuration.configuration_receipt_vl import ReceiptVLConfig
from .configuration.configuration_vla import VLAConfig
from .configuration.configuration_vlm_classification import VLMClassificationConfig
from .configuration.configuration_vlm_trajectory import VLMTrajectoryConfig
from .configuration.constants import TASK_ACTION_PREDICTION, TASK_TRAJECTORY_PREDICTION
from .modeling.capabilities import backbone_family_of, head_kind_of
from .modeling.modeling_classifier import VLMClassifierOutput
from .modeling.modeling_orion_qwen import OrionQwen2_5ForTrajectory, OrionQwenForTrajectory, OrionTrajectoryOutput
from .modeling.modeling_receipt_vl import ReceiptVLClassifier, ReceiptVLClassifierOutput
from .modeling.modeling_vla import VLAForActionPrediction, VLAOutput
from .modeling.modeling_vlm_classification import VLMForImageClassification
from .modeling.modeling_vlm_heads import image_features, sequence_states
from .modeling.modeling_vlm_trajectory import VLMForTrajectory, VLMTrajectoryOutput
from .processing.pipeline_orion_trajectory import OrionTrajectoryPipeline
from .processing.pipeline_vla_actions import ActionPredictionPipeline
from .processing.processing_driving_placeholders import DrivingPlaceholders
from .processing.processing_orion_qwen import OrionQwen2_5Processor, OrionQwenProcessor
from .processing.processing_receipt_vl import ReceiptVLProcessor
from .publishing import ModelCardMixin
from .registry.vlms import (
    create_vlm,
    encode_images,
    hidden_size,
    list_vlms,
    load_processor,
    quantization_config,
    register_vlm,
    tiny_vlm_config,
)
from .training.backbones import add_lora, freeze

# With the package installed, the Auto classes load these classes, even from a folder that carries remote code.
for _config, _model, _processor in (
    (OrionQwenConfig, OrionQwenForTrajectory, OrionQwenProcessor),
    (OrionQwen2_5Config, OrionQwen2_5ForTrajectory, OrionQwen2_5Processor),
    (ReceiptVLConfig, ReceiptVLClassifier, ReceiptVLProcessor),
):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)
    AutoProcessor.register(_config, _processor, exist_ok=True)
AutoModelForImageClassification.register(ReceiptVLConfig, ReceiptVLClassifier, exist_ok=True)
for _config, _model in ((OrionQwenConfig, OrionQwenForTrajectory), (OrionQwen2_5Config, OrionQwen2_5ForTrajectory)):
    AutoModelForImageTextToText.register(_config, _model, exist_ok=True)
# The heads on any family: AutoConfig / AutoModel (and AutoModelForImageClassification) load them by model_type.
for _config, _model in ((VLMClassificationConfig, VLMForImageClassification), (VLMTrajectoryConfig, VLMForTrajectory)):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)
AutoModelForImageClassification.register(VLMClassificationConfig, VLMForImageClassification, exist_ok=True)
AutoConfig.register(VLAConfig.model_type, VLAConfig, exist_ok=True)
AutoModel.register(VLAConfig, VLAForActionPrediction, exist_ok=True)
PIPELINE_REGISTRY.register_pipeline(
    TASK_TRAJECTORY_PREDICTION, pipeline_class=OrionTrajectoryPipeline, pt_model=AutoModel, type="multimodal"
)
PIPELINE_REGISTRY.register_pipeline(
    TASK_ACTION_PREDICTION, pipeline_class=ActionPredictionPipeline, pt_model=AutoModel, type="multimodal"
)

ModelCardMixin.model_card_dir = Path(str(files("vlmheads.model_cards")))

__all__ = [
    "ActionPredictionPipeline",
    "VLAConfig",
    "VLAForActionPrediction",
    "VLAOutput",
    "DrivingPlaceholders",
    "VLMClassificationConfig",
    "VLMClassifierOutput",
    "VLMForImageClassification",
    "VLMForTrajectory",
    "VLMTrajectoryConfig",
    "VLMTrajectoryOutput",
    "add_lora",
    "backbone_family_of",
    "create_vlm",
    "encode_images",
    "freeze",
    "head_kind_of",
    "hidden_size",
    "image_features",
    "list_vlms",
    "load_processor",
    "quantization_config",
    "register_vlm",
    "sequence_states",
    "tiny_vlm_config",
    "OrionQwen2_5Config",
    "OrionQwen2_5ForTrajectory",
    "OrionQwen2_5Processor",
    "OrionQwenConfig",
    "OrionQwenForTrajectory",
    "OrionQwenProcessor",
    "OrionTrajectoryPipeline",
    "OrionTrajectoryOutput",
    "ReceiptVLClassifier",
    "ReceiptVLClassifierOutput",
    "ReceiptVLConfig",
    "ReceiptVLProcessor",
]
