"""vlmheads: task models on vision-language models as Hugging Face transformers classes."""

from importlib.resources import files
from pathlib import Path

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, AutoProcessor

from .configuration.configuration_orion_qwen import OrionQwen2_5Config, OrionQwenConfig
from .configuration.configuration_receipt_vl import ReceiptVLConfig
from .modeling.modeling_orion_qwen import OrionQwen2_5ForTrajectory, OrionQwenForTrajectory, OrionTrajectoryOutput
from .modeling.modeling_receipt_vl import ReceiptVLClassifier, ReceiptVLClassifierOutput
from .processing.processing_orion_qwen import OrionQwen2_5Processor, OrionQwenProcessor
from .processing.processing_receipt_vl import ReceiptVLProcessor
from .publishing import ModelCardMixin

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

ModelCardMixin.model_card_dir = Path(str(files("vlmheads.model_cards")))

__all__ = [
    "OrionQwen2_5Config",
    "OrionQwen2_5ForTrajectory",
    "OrionQwen2_5Processor",
    "OrionQwenConfig",
    "OrionQwenForTrajectory",
    "OrionQwenProcessor",
    "OrionTrajectoryOutput",
    "ReceiptVLClassifier",
    "ReceiptVLClassifierOutput",
    "ReceiptVLConfig",
    "ReceiptVLProcessor",
]
