"""vlmheads: task models on vision-language models as Hugging Face transformers classes."""

# The ONNX Runtime host (vlmheads.onnx's OnnxVLM) runs on onnxruntime and NumPy alone: without torch, importing
# vlmheads loads none of the models, so that `import vlmheads.onnx` still works there.
try:
    import torch  # noqa: F401
except ImportError:
    __all__ = []
else:
    from ._models import *  # noqa: F403
    from ._models import __all__  # noqa: F401
