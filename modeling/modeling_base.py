"""What every vlmheads model mixes in: self-contained saving, and loading under bitsandbytes that keeps the vision
tower, the projector and the head in full precision.

Imports only torch, transformers and the other model-side files: this file ships as remote code.
"""

import copy
from pathlib import Path
from typing import ClassVar

from transformers import BitsAndBytesConfig
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..configuration.remote_code import SelfContainedCodeMixin


def with_skip_modules(
    quantization_config: QuantizationConfigMixin | dict | None, skip_modules: list[str]
) -> QuantizationConfigMixin | dict | None:
    """A copy of a `BitsAndBytesConfig` that names no `llm_int8_skip_modules`, with `skip_modules` kept in full
    precision; any other quantization setting is returned as given.

    transformers' default bitsandbytes skip list holds only `lm_head` and the last module: it would quantize the
    vision tower, the projector and most of a head.
    """
    if isinstance(quantization_config, BitsAndBytesConfig) and quantization_config.llm_int8_skip_modules is None:
        quantization_config = copy.deepcopy(quantization_config)
        quantization_config.llm_int8_skip_modules = list(skip_modules)
    return quantization_config


class SelfContainedModelMixin(SelfContainedCodeMixin):
    """`SelfContainedCodeMixin` for models: `auto_map` and `custom_pipelines` go into the model's configuration."""

    def code_owner(self):
        return self.config

    def save_pretrained(self, save_directory: str | Path, *args, **kwargs):
        # Write transformers' own key layout, not the legacy Hub one: the Trainer resumes a checkpoint with a plain
        # `load_state_dict`, which skips renamed keys (transformers issue #43701).
        kwargs.setdefault("save_original_format", False)
        return super().save_pretrained(save_directory, *args, **kwargs)


class QuantizedLoadingMixin:
    """`from_pretrained(..., quantization_config=BitsAndBytesConfig(...))` keeps `quantization_skip_modules` in full
    precision when the configuration names no `llm_int8_skip_modules`: only the language model is quantized."""

    head_modules: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def quantization_skip_modules_for(cls, pretrained_model_name_or_path, **kwargs) -> list[str]:
        """The modules kept in full precision when loading `pretrained_model_name_or_path` (the family's skip list
        and the head); `kwargs` are `from_pretrained`'s."""
        raise NotImplementedError(f"{cls.__name__} names no modules to keep in full precision.")

    @classmethod
    def from_pretrained(cls, *args, quantization_config: QuantizationConfigMixin | dict | None = None, **kwargs):
        if isinstance(quantization_config, BitsAndBytesConfig) and quantization_config.llm_int8_skip_modules is None:
            source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            skip_modules = cls.quantization_skip_modules_for(source, **kwargs)
            quantization_config = with_skip_modules(quantization_config, skip_modules)
        return super().from_pretrained(*args, quantization_config=quantization_config, **kwargs)
