"""ONNX export of the VLM families the family table marks `onnx_exportable` (Qwen2-VL, Qwen2.5-VL, SmolVLM), the
Orion models and image classifiers, and their ONNX Runtime host.

`OnnxVLM` runs on onnxruntime and NumPy alone; `export_onnx` (which needs torch) loads only when first used, so
importing this package never imports torch.
"""

from typing import Any

from .manifest import FORMAT_VERSION
from .runtime import OnnxVLM

__all__ = ["FORMAT_VERSION", "OnnxVLM", "export_onnx"]


def __getattr__(name: str) -> Any:
    if name == "export_onnx":
        from .export import export_onnx

        return export_onnx
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
