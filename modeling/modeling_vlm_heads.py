"""The base of the task heads on any registered VLM family, and what they read from a backbone: the backbone is the
family's own transformers model, held as `self.backbone`, and the head reads what the family table says the backbone
produces (`image_features`, `sequence_states`). The heads themselves live one per file
(`modeling_vlm_classification.py`, `modeling_vlm_trajectory.py`, `modeling_vla.py`), so that a saved folder ships
only its own head's code.
"""

import copy
import os
import re
from typing import ClassVar

import torch
from torch import nn
from transformers import AutoConfig, PreTrainedModel

from ..configuration.configuration_vlm_heads import VLMHeadConfig
from ..publishing import ModelCardMixin
from .families import POSITIONS_MROPE, VLMFamily, family_of, get_module, registry_names
from .heads import init_head_module, tiled_image_features
from .modeling_base import QuantizedLoadingMixin, SelfContainedModelMixin, with_skip_modules
from .positions import ROPE_INPUTS, mrope_positions


class VLMHeadPreTrainedModel(ModelCardMixin, SelfContainedModelMixin, QuantizedLoadingMixin, PreTrainedModel):
    """Base of the heads: builds or wraps the backbone, keeps the heads in full precision under bitsandbytes and
    initialises the head layers with the one policy all vlmheads heads share."""

    config: VLMHeadConfig
    base_model_prefix = "backbone"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    auto_classes: ClassVar[tuple[str, ...]] = ("AutoModel",)
    # The modules the head adds to the backbone: trained in full under LoRA, kept in full precision.
    head_modules: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: VLMHeadConfig, backbone: PreTrainedModel | None = None):
        super().__init__(config)
        family = self.family
        if backbone is None:
            backbone = family.model_cls._from_config(config.backbone_config)
        elif family_of(backbone.config).name != family.name:
            found = family_of(backbone.config).name
            raise ValueError(f"backbone is a {found!r} model but the config's backbone is {family.name!r}.")
        self.backbone = backbone
        self.config.backbone_config = backbone.config

    @property
    def family(self) -> VLMFamily:
        """The backbone's entry in the family table."""
        return family_of(self.config.backbone_config)

    def _init_weights(self, module: nn.Module) -> None:
        if not init_head_module(module):
            super()._init_weights(module)

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.backbone.set_input_embeddings(value)

    @classmethod
    def from_backbone(cls, backbone: str | PreTrainedModel, **kwargs) -> "VLMHeadPreTrainedModel":
        """A new head on `backbone`: a model of a registered family, a registry name (`"qwen2-vl-2b"`, its default
        checkpoint) or a checkpoint (Hub id or folder). The backbone keeps its weights; the head is initialised.

        `kwargs` that are fields of this head's configuration set it (e.g. `num_labels=3`); the rest go to the
        backbone's `from_pretrained` when a checkpoint is loaded.
        """
        config_fields = set(cls.config_class.__dataclass_fields__) | {"id2label", "label2id", "num_labels"}
        config_kwargs = {key: kwargs.pop(key) for key in list(kwargs) if key in config_fields}
        if isinstance(backbone, str):
            checkpoint = _checkpoint_of(backbone)
            family = family_of(AutoConfig.from_pretrained(checkpoint, **_hub_kwargs(kwargs)))
            if "quantization_config" in kwargs:
                kwargs["quantization_config"] = with_skip_modules(
                    kwargs["quantization_config"], list(family.quantization_skip_modules)
                )
            backbone = family.model_cls.from_pretrained(checkpoint, **kwargs)
            config_kwargs.setdefault("base_model", checkpoint)
        elif kwargs:
            raise ValueError(f"{sorted(kwargs)} are not fields of {cls.config_class.__name__}.")
        if not isinstance(backbone, PreTrainedModel):
            raise ValueError(f"backbone must be a model, a registry name or a checkpoint, got {type(backbone)}.")
        family_of(backbone.config)
        cls.prepare_backbone(backbone, config_kwargs)
        config_kwargs.setdefault("base_model", getattr(backbone.config, "name_or_path", None) or None)
        # A copy: building a configuration resets its sub-configs' attention implementation, which the backbone's
        # own configuration must keep (the head then holds the backbone's configuration itself).
        config = cls.config_class(backbone_config=copy.deepcopy(backbone.config), **config_kwargs)
        model = cls(config, backbone=backbone)
        for name in model.head_modules:
            model.get_submodule(name).to(backbone.device)
        return model

    @classmethod
    def prepare_backbone(cls, backbone: PreTrainedModel, config_kwargs: dict) -> None:
        """What a head changes on its backbone before `from_backbone` builds the configuration from the backbone's
        (nothing by default); `config_kwargs` are the head configuration's settings."""

    @classmethod
    def quantization_skip_modules_for(cls, pretrained_model_name_or_path, **kwargs) -> list[str]:
        """The backbone family's skip list (under `backbone.`) and the head modules."""
        config = kwargs.get("config") or cls.config_class.from_pretrained(
            pretrained_model_name_or_path, **_hub_kwargs(kwargs)
        )
        family = family_of(config.backbone_config)
        return [*(f"backbone.{name}" for name in family.quantization_skip_modules), *cls.head_modules]


def _checkpoint_of(name: str) -> str:
    """A registry name's default checkpoint; anything else is taken as a checkpoint already."""
    names = registry_names()
    if name in names:
        return names[name][1]
    if not os.path.isdir(name) and not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        raise ValueError(
            f"backbone {name!r} is neither a registry name, a folder nor a Hub id (owner/name); known names: "
            f"{', '.join(sorted(names))}."
        )
    return name


def _hub_kwargs(kwargs: dict) -> dict:
    """The `from_pretrained` arguments that also locate a config (revision, token, cache, trust_remote_code...)."""
    keys = ("revision", "token", "cache_dir", "local_files_only", "trust_remote_code", "subfolder")
    return {key: kwargs[key] for key in keys if key in kwargs}


def image_token_id(config) -> int | None:
    """The id of the token a family's model replaces with image features (`image_token_id` / `image_token_index`)."""
    for name in ("image_token_id", "image_token_index"):
        if getattr(config, name, None) is not None:
            return getattr(config, name)
    return None


def _stack_rows(features: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...]):
    """Per-image features (a (B, N, D) tensor, or B tensors (N_i, D)) → (B, N, D) and a valid mask (B, N).

    Images of different sizes are padded to the longest; the mask marks the real rows.
    """
    if isinstance(features, torch.Tensor):
        if features.ndim == 2:
            features = features.unsqueeze(0)
        return features, torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)
    rows = [part.reshape(-1, part.shape[-1]) for part in features]
    longest = max(part.shape[0] for part in rows)
    padded = rows[0].new_zeros(len(rows), longest, rows[0].shape[-1])
    valid = torch.zeros(len(rows), longest, dtype=torch.bool, device=rows[0].device)
    for index, part in enumerate(rows):
        padded[index, : part.shape[0]] = part
        valid[index, : part.shape[0]] = True
    return padded, valid


def image_features(
    backbone: PreTrainedModel, num_patches: torch.Tensor | list[int] | None = None, **image_inputs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected image features of a family's model, at the width D = its language model's hidden size.

    `image_inputs` are the processor outputs named by the family's `image_inputs` (e.g. `pixel_values` and
    `image_grid_thw` for Qwen). Returns features (B, N, D) and a valid mask (B, N), one row block per image for
    the families that encode each image on its own (Qwen, LLaVA, PaliGemma, InternVL, Gemma 3, Florence-2: the
    image tokens the encoder reads), per sample for those that group a sample's images (SmolVLM: its tiles and
    global image, (B * tiles, N, D) → (B, tiles * N, D); Mllama: images x tiles x patches). Images of different
    sizes are padded to the longest and masked. `num_patches` (InternVL's image processor: tiles per image) groups
    the tiles of each image: (tiles, N, D) → (B, tiles_i * N, D).
    """
    family = family_of(backbone.config)
    missing = [name for name in family.image_inputs if image_inputs.get(name) is None]
    if missing:
        raise ValueError(
            f"{missing} missing: {family.name} images come as {list(family.image_inputs)} from its processor."
        )
    unknown = sorted(set(image_inputs) - set(family.image_inputs))
    if unknown:
        raise ValueError(f"{unknown} are not image inputs of {family.name}; it takes {list(family.image_inputs)}.")
    pixel_values = image_inputs["pixel_values"]
    if not isinstance(pixel_values, torch.Tensor) or not pixel_values.is_floating_point():
        raise ValueError(f"pixel_values must be a floating-point tensor, got {type(pixel_values).__name__}.")
    if pixel_values.shape[0] == 0:
        raise ValueError("pixel_values hold no image: the batch is empty.")
    model = backbone.model
    if not hasattr(model, "get_image_features"):
        # Mllama: the decoder cross-attends to the tiles, so transformers has no image-feature method for it.
        vision_model = get_module(backbone, family.vision_tower)
        projector = get_module(backbone, family.projector)
        return tiled_image_features(vision_model, projector, **image_inputs)
    features = model.get_image_features(**image_inputs).pooler_output
    if num_patches is not None:
        counts = [int(count) for count in num_patches]
        if sum(counts) != len(features):
            raise ValueError(f"num_patches {counts} add up to {sum(counts)} tiles; pixel_values hold {len(features)}.")
        features = torch.split(features, counts) if isinstance(features, torch.Tensor) else features
    return _stack_rows(features)


def _position_ids(backbone: PreTrainedModel, input_ids: torch.LongTensor, inputs: dict) -> torch.Tensor | None:
    """Position ids of families that compute them from the token ids (M-RoPE, `mrope_positions`), or None."""
    if family_of(backbone.config).positions != POSITIONS_MROPE or inputs.get("position_ids") is not None:
        return inputs.get("position_ids")
    return mrope_positions(backbone, input_ids, **{name: inputs.get(name) for name in ROPE_INPUTS})[0]


def sequence_states(
    backbone: PreTrainedModel,
    input_ids: torch.LongTensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    **inputs,
) -> torch.Tensor:
    """The backbone's last hidden states over the prompt, images included: (B, L, H).

    Decoder-only families: the language model's last hidden state. Florence-2 (encoder-decoder): the encoder's,
    over the image tokens and the prompt (the decoder only starts the answer). With `inputs_embeds` (B, L, H), e.g.
    spliced driving features, `input_ids` still locate the images and give positions where a family computes
    them from the ids (Qwen's M-RoPE); the embeddings are what the model reads.
    """
    inputs.setdefault("use_cache", False)
    if inputs_embeds is not None and input_ids is not None:
        inputs["position_ids"] = _position_ids(backbone, input_ids, inputs)
        input_ids = None
    outputs = backbone.model(input_ids=input_ids, inputs_embeds=inputs_embeds, **inputs)
    if backbone.config.is_encoder_decoder:
        return outputs.encoder_last_hidden_state
    return outputs.last_hidden_state


def check_image_tokens(config, input_ids: torch.LongTensor, has_images: bool) -> None:
    """Raises a `ValueError` unless each prompt holds the family's image token exactly when images are given."""
    token_id = image_token_id(config)
    if token_id is None:
        return
    counts = (input_ids == token_id).sum(dim=1).tolist()
    if has_images and 0 in counts:
        raise ValueError(
            f"input_ids of sample {counts.index(0)} hold no image token (id {token_id}) but images were given: build "
            "the prompt with the family's processor (its chat template places the image token)."
        )
    if not has_images and any(counts):
        raise ValueError(
            f"input_ids hold image tokens (id {token_id}; counts per sample {counts}) but no pixel_values were given."
        )


def batch_size_of(**tensors: torch.Tensor | None) -> int | None:
    """The batch size B the given tensors agree on (their first dimension), or None when none is given."""
    sizes = {name: tensor.shape[0] for name, tensor in tensors.items() if isinstance(tensor, torch.Tensor)}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"The inputs disagree on the batch size: {sizes}.")
    return next(iter(sizes.values()), None)


class DelegatedGeneration:
    """`generate()` of a head runs its backbone's: the head reads the prompt, the backbone answers in text."""

    def generate(self, *args, **kwargs) -> torch.LongTensor:
        """The backbone's `generate`: same inputs (the processor's outputs), same token ids out."""
        return self.backbone.generate(*args, **kwargs)
