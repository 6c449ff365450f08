"""Every registered VLM family behind one interface: create a model or its processor by name, list and add families.

The models are the families' own transformers classes (what `AutoModelForImageTextToText` maps to), with no wrapper
in the way of `save_pretrained`, `generate`, peft or the `Trainer`. The differences between families live in the
family table (`vlmheads.modeling.families`); the tiny offline configurations in `vlmheads.offline.tiny`.
"""

import importlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import PIL.Image
import torch
from transformers import (
    AutoConfig,
    AutoProcessor,
    BitsAndBytesConfig,
    PretrainedConfig,
    PreTrainedModel,
    ProcessorMixin,
)

from ..modeling.families import VLM_FAMILIES, VLMFamily, family_of, registry_names
from ..modeling.modeling_vlm_heads import image_features
from ..processing.image_inputs import open_image


@dataclass(frozen=True)
class TinyBuilders:
    """How to build a family's tiny offline processor and the tiny random configuration matching it."""

    processor: Callable[[], ProcessorMixin]
    config: Callable[..., PretrainedConfig]


_TINY_BUILDERS: dict[str, TinyBuilders] = {}


def register_vlm(
    family: VLMFamily,
    tiny_processor: Callable[[], ProcessorMixin] | None = None,
    tiny_config: Callable[..., PretrainedConfig] | None = None,
    overwrite: bool = False,
) -> None:
    """Adds a family to the table: `create_vlm(family.name)` and every helper and head then work on it.

    `tiny_processor()` and `tiny_config(processor, **overrides)` build it offline for `tiny=True`.
    """
    known = registry_names()
    names = {family.name, *family.checkpoints}
    taken = sorted(name for name in names if name in known and known[name][0].name != family.name)
    if family.name in VLM_FAMILIES and not overwrite:
        raise ValueError(f"A VLM family named {family.name!r} is registered already; pass overwrite=True to replace.")
    if taken:
        raise ValueError(f"The names {taken} already load another family.")
    if (tiny_processor is None) != (tiny_config is None):
        raise ValueError("Give both tiny_processor and tiny_config, or neither.")
    VLM_FAMILIES[family.name] = family
    _TINY_BUILDERS.pop(family.name, None)
    if tiny_processor is not None:
        _TINY_BUILDERS[family.name] = TinyBuilders(tiny_processor, tiny_config)


def list_vlms() -> list[str]:
    """Every name `create_vlm` takes: the family names and the model names (e.g. `"qwen2-vl-7b"`)."""
    return sorted(registry_names())


def resolve_vlm(name: str) -> tuple[VLMFamily, str]:
    """The family a registry name belongs to, and the checkpoint it loads by default."""
    index = registry_names()
    if not isinstance(name, str) or name not in index:
        raise ValueError(f"Unknown VLM {name!r}; known names: {', '.join(sorted(index))}.")
    return index[name]


def _tiny_builders(family: VLMFamily) -> TinyBuilders:
    if family.name not in _TINY_BUILDERS:
        module_name = re.sub(r"[^a-z0-9]+", "_", family.name)
        try:
            module = importlib.import_module(f"{__package__.rsplit('.', 1)[0]}.offline.tiny.{module_name}")
        except ModuleNotFoundError as error:
            raise ValueError(
                f"The VLM family {family.name!r} has no tiny offline configuration: register one with "
                "register_vlm(family, tiny_processor=..., tiny_config=...)."
            ) from error
        _TINY_BUILDERS[family.name] = TinyBuilders(module.tiny_processor, module.tiny_config)
    return _TINY_BUILDERS[family.name]


def quantization_config(
    family: str | VLMFamily, bits: int, compute_dtype: torch.dtype = torch.bfloat16, keep: tuple[str, ...] = ()
) -> BitsAndBytesConfig:
    """A bitsandbytes config (`bits` 4: nf4, or 8) that keeps the family's vision tower, projector and LM head,
    plus the modules named in `keep` (e.g. task heads), in full precision."""
    family = family if isinstance(family, VLMFamily) else resolve_vlm(family)[0]
    skip = [*family.quantization_skip_modules, *keep]
    if bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=skip,
        )
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    raise ValueError(f"bits must be 4 or 8, got {bits!r}.")


def create_vlm(
    name: str,
    pretrained: str | None = None,
    config: PretrainedConfig | None = None,
    tiny: bool = False,
    bits: int | None = None,
    dtype: torch.dtype | str | None = None,
    gradient_checkpointing: bool = False,
    seed: int = 0,
    **overrides,
) -> PreTrainedModel:
    """The family's transformers model: loaded from `pretrained` (a Hub id or folder; default: the name's
    checkpoint), built with random weights from `config`, or, with `tiny=True`, a tiny random offline model.

    `bits` (4 or 8) loads the language model with bitsandbytes and keeps the family's skip list in full precision;
    `dtype` (e.g. `torch.bfloat16`) sets the weights' dtype; `overrides` go to the config (`tiny`, `config`) or to
    `from_pretrained`. Random models come in eval mode, seeded by `seed`.
    """
    family, checkpoint = resolve_vlm(name)
    if sum((pretrained is not None, config is not None, tiny)) > 1:
        raise ValueError("Give at most one of pretrained, config and tiny=True.")
    if config is not None or tiny:
        if bits is not None:
            raise ValueError("bits quantizes pretrained weights: it needs a checkpoint, not config or tiny=True.")
        if tiny:
            config = tiny_vlm_config(name, **overrides)
        else:
            _check_family(family, config, "config")
            config = config.__class__.from_dict({**config.to_dict(), **overrides}) if overrides else config
        torch.manual_seed(seed)
        model = family.model_cls(config).eval()
        if dtype is not None:
            model = model.to(dtype)
    else:
        load_kwargs = dict(overrides)
        if bits is not None:
            load_kwargs["quantization_config"] = quantization_config(family, bits)
        if dtype is not None:
            load_kwargs["dtype"] = dtype
        source = pretrained or checkpoint
        _check_family(family, AutoConfig.from_pretrained(source), f"the checkpoint {source!r}")
        model = family.model_cls.from_pretrained(source, **load_kwargs)
    if gradient_checkpointing:
        model.activation_checkpointing_enable()
    return model


def tiny_vlm_config(name: str, processor: ProcessorMixin | None = None, **overrides) -> PretrainedConfig:
    """The tiny random configuration of a family (hidden 64 at most, 1-2 layers) matching its tiny processor, or
    `processor` (e.g. the tiny processor with added tokens: the vocabulary then covers them)."""
    family, _ = resolve_vlm(name)
    builders = _tiny_builders(family)
    return builders.config(processor or builders.processor(), **overrides)


def load_processor(name: str, pretrained: str | None = None, tiny: bool = False) -> ProcessorMixin:
    """The family's processor: from `pretrained` (default: the name's checkpoint), or built offline with
    `tiny=True` to match `create_vlm(name, tiny=True)`."""
    family, checkpoint = resolve_vlm(name)
    if tiny:
        if pretrained is not None:
            raise ValueError("Give pretrained or tiny=True, not both.")
        return _tiny_builders(family).processor()
    return AutoProcessor.from_pretrained(pretrained or checkpoint)


def _check_family(family: VLMFamily, config: PretrainedConfig, what: str) -> None:
    found = family_of(config)
    if found.name != family.name:
        raise ValueError(f"{what} is a {found.name!r} configuration ({type(config).__name__}), not {family.name!r}.")


def _backbone_of(model: PreTrainedModel) -> PreTrainedModel:
    """The family model inside a vlmheads head (`model.backbone`), or the model itself."""
    backbone = getattr(model, "backbone", None)
    return backbone if isinstance(backbone, PreTrainedModel) else model


def hidden_size(model: PreTrainedModel) -> int:
    """Width D of the features the model's language model reads (`text_config.hidden_size` of its backbone)."""
    return _backbone_of(model).config.get_text_config().hidden_size


def _checked_images(images: Sequence) -> list:
    if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
        raise ValueError(f"images must be a list of images, got {type(images).__name__}.")
    if len(images) == 0:
        raise ValueError("images is empty: encode_images needs at least one image.")
    opened = [open_image(image, f"images[{index}]") for index, image in enumerate(images)]
    sizes = []
    for index, image in enumerate(opened):
        if isinstance(image, PIL.Image.Image):
            sizes.append((image.height, image.width))
            continue
        shape = tuple(image.shape)
        channels_first = len(shape) == 3 and shape[0] in (1, 3, 4) and shape[-1] not in (1, 3, 4)
        channels = 1 if len(shape) == 2 else shape[0] if channels_first else shape[-1]
        if channels != 3:
            raise ValueError(
                f"images[{index}] has {channels} channel(s) (shape {shape}); expected RGB, (H, W, 3) or (3, H, W)."
            )
        sizes.append(shape[1:] if channels_first else shape[:2])
    if len(set(sizes)) > 1:
        raise ValueError(f"encode_images takes images of one size, got sizes (H, W) {sizes}.")
    return opened


def encode_images(model: PreTrainedModel, processor: ProcessorMixin, images: Sequence) -> torch.Tensor:
    """Projected image features (B, N, D) of B images of one size, D = `hidden_size(model)`: what the language
    model reads in place of the image tokens (for Florence-2: what its encoder reads).

    `model` is a family's model (`create_vlm`) or a vlmheads head on one; `processor` the family's processor;
    `images` PIL images (converted to RGB), or RGB arrays / tensors (H, W, 3) or (3, H, W).
    """
    backbone = _backbone_of(model)
    family = family_of(backbone.config)
    opened = _checked_images(images)
    outputs = processor.image_processor(images=[[image] for image in opened], return_tensors="pt")
    inputs = {name: outputs[name].to(backbone.device) for name in family.image_inputs if name in outputs}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(backbone.dtype)
    # InternVL's image processor may tile an image: `num_patches` says how many tiles each image has.
    features, _ = image_features(backbone, num_patches=outputs.get("num_patches"), **inputs)
    return features
