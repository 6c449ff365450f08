"""What a runtime asks of a model: which head it has (`head_kind_of`) and which VLM family it sits on
(`backbone_family_of`). The server, the ONNX export and pipeline parallelism read these declared capabilities (and the
family table's fields), never a list of class names, `hasattr` or a signature.

Every vlmheads model and configuration class declares `head_kind` (one of `HEAD_KINDS`); any other model or
configuration of a registered family is a plain backbone (`HEAD_GENERATION`).
"""

from transformers import PretrainedConfig

from ..configuration.constants import HEAD_GENERATION, HEAD_KINDS
from .families import VLMFamily, family_of


def _config_of(model_or_config) -> PretrainedConfig:
    config = (
        model_or_config if isinstance(model_or_config, PretrainedConfig) else getattr(model_or_config, "config", None)
    )
    if not isinstance(config, PretrainedConfig):
        raise ValueError(f"Expected a model or a configuration, got {type(model_or_config).__name__}.")
    return config


def backbone_config_of(model_or_config) -> PretrainedConfig:
    """The configuration of the VLM a model (or configuration) runs on: a head's `backbone_config`, or the
    configuration itself for the named models, which subclass their backbone's."""
    config = _config_of(model_or_config)
    backbone_config = getattr(config, "backbone_config", None)
    return config if backbone_config is None else backbone_config


def backbone_family_of(model_or_config) -> VLMFamily:
    """The family-table entry of the VLM a model (or configuration) runs on (`backbone_config_of`): Orion is
    Qwen2-VL, the receipt classifier Mllama."""
    return family_of(backbone_config_of(model_or_config))


def head_kind_of(model_or_config) -> str:
    """The head a model (or configuration) declares: `HEAD_CLASSIFICATION`, `HEAD_TRAJECTORY`, `HEAD_ACTIONS`, or
    `HEAD_GENERATION` for a plain backbone of a registered family that generates text.

    Models loaded as remote code declare it too (the class attribute ships with their code). Raises a `ValueError`
    for a model of no registered family, or a backbone that only predicts actions (π0).
    """
    declared = getattr(type(model_or_config), "head_kind", None)
    if declared is None and not isinstance(model_or_config, PretrainedConfig):
        declared = getattr(type(_config_of(model_or_config)), "head_kind", None)
    if declared is not None:
        if declared not in HEAD_KINDS:
            raise ValueError(
                f"{type(model_or_config).__name__}.head_kind is {declared!r}; expected one of {HEAD_KINDS}."
            )
        return declared
    family = backbone_family_of(model_or_config)
    if not family.generates_text:
        raise ValueError(
            f"{type(model_or_config).__name__} is a {family.name!r} model, which predicts actions and has no text "
            "head; only the vlmheads heads and text-generating backbones declare a head kind."
        )
    return HEAD_GENERATION
