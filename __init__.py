"""vlmheads: task models on vision-language models as Hugging Face transformers classes."""

import importlib.util
import logging

__all__: list[str] = []

# The Trainer imports peft, and peft imports bitsandbytes whenever both are installed; bitsandbytes then warns on every
# CPU run that the optional `kernels` package for its 4-bit kernel is missing. Its 4-bit layers run without it.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

# The ONNX Runtime host (vlmheads.onnx_export's OnnxVLM) runs on onnxruntime and NumPy alone: without torch, importing
# vlmheads loads none of the models, so that `import vlmheads.onnx_export` still works there. The repository root is
# this package, and pytest imports its `__init__.py` once more under the folder's name: only the import as `vlmheads`
# loads the models, so that the Auto classes map to one set of classes.
if __name__ == "vlmheads" and importlib.util.find_spec("torch") is not None:
    from ._models import *  # noqa: F403
    from ._models import __all__  # noqa: F401
