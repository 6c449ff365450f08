"""Fine-tuning helpers for any registered VLM family: freezing its parts and LoRA on its language model.

They work on a family's bare transformers model (`create_vlm`), on the named models that subclass one (Orion,
receipt), and on the heads that hold one as `backbone`; the family table says where the parts sit.
"""

import re
from typing import TYPE_CHECKING

from transformers import PreTrainedModel

from ..modeling.families import VLMFamily, family_of, get_module

if TYPE_CHECKING:  # peft imports bitsandbytes, whose CPU backend warns on import: load it when LoRA is asked for.
    from peft import LoraConfig, PeftModel


def model_family(model: PreTrainedModel) -> tuple[VLMFamily, str]:
    """The family of a model's backbone and the prefix of the backbone's module names inside the model.

    A head stores its backbone as `model.backbone` (prefix `"backbone."`); a subclass of a family's model class
    is the backbone itself (prefix `""`).
    """
    backbone_config = getattr(model.config, "backbone_config", None)
    if backbone_config is not None:
        return family_of(backbone_config), "backbone."
    return family_of(model.config), ""


def head_modules(model: PreTrainedModel) -> tuple[str, ...]:
    """Names of the task modules a vlmheads model adds to its backbone (none for a bare family model)."""
    return tuple(getattr(model, "head_modules", ()))


def freeze(model: PreTrainedModel, vision: bool = False, projector: bool = False, language: bool = False) -> None:
    """Stops the gradients into the vision tower, the projector and/or the language model (with its embeddings and
    LM head). Parts not named keep their `requires_grad`; task heads are never frozen here.

    Where the projector sits inside the vision tower (Qwen's merger), `vision=True` leaves the projector alone.
    """
    family, prefix = model_family(model)
    if vision:
        projector_prefix = family.projector + "."
        for name, parameter in get_module(model, prefix + family.vision_tower).named_parameters():
            if not f"{family.vision_tower}.{name}".startswith(projector_prefix):
                parameter.requires_grad_(False)
    if projector:
        get_module(model, prefix + family.projector).requires_grad_(False)
    if language:
        get_module(model, prefix + family.language_model).requires_grad_(False)
        if family.lm_head:
            get_module(model, prefix + family.lm_head).requires_grad_(False)


def lora_config(
    model: PreTrainedModel,
    r: int = 16,
    alpha: int = 16,
    dropout: float = 0.05,
    target_modules: tuple[str, ...] | None = None,
) -> "LoraConfig":
    """A `LoraConfig` on the language model's attention (the family's targets, or the leaf names in
    `target_modules`), with the model's task heads fully trained and saved (`modules_to_save`)."""
    from peft import LoraConfig

    family, prefix = model_family(model)
    names = "|".join(target_modules or family.lora_target_modules)
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=rf"{re.escape(prefix + family.language_model)}\..*\.({names})",
        modules_to_save=list(head_modules(model)) or None,
    )


def add_lora(
    model: PreTrainedModel,
    r: int = 16,
    alpha: int = 16,
    dropout: float = 0.05,
    target_modules: tuple[str, ...] | None = None,
) -> "PeftModel":
    """LoRA adapters on the language model only (vision towers use the same projection names), with the task
    heads kept fully trainable: `lora_config` applied with peft's `get_peft_model`."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(model, r, alpha, dropout, target_modules))
