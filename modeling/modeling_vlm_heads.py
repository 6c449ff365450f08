"""Task heads on any registered VLM family: the backbone is the family's own transformers model, held as
`self.backbone`, and the head reads what the family table says the backbone produces.
"""

import copy
import os
import re
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoConfig, BitsAndBytesConfig, PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.utils import ModelOutput, can_return_tuple
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..configuration.configuration_vlm_classification import VLMClassificationConfig
from ..configuration.configuration_vlm_heads import VLMHeadConfig
from ..configuration.configuration_vlm_trajectory import VLMTrajectoryConfig
from ..configuration.constants import HEAD_CLASSIFICATION, HEAD_TRAJECTORY
from ..processing.pipeline_orion_trajectory import OrionTrajectoryPipeline
from ..processing.pipeline_vlm_classification import VLMImageClassificationPipeline
from ..publishing import ModelCardMixin, SelfContainedCodeMixin
from .families import POSITIONS_MROPE, VLMFamily, family_of, get_module, registry_names
from .heads import (
    ClassificationHead,
    DrivingEmbeddings,
    check_tensor,
    init_head_module,
    last_token_state,
    masked_mean,
    select_mode,
    tiled_image_features,
    trajectory_decoder,
    waypoint_loss,
)
from .positions import ROPE_INPUTS, mrope_positions


class VLMHeadPreTrainedModel(ModelCardMixin, SelfContainedCodeMixin, PreTrainedModel):
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
            quantization = kwargs.get("quantization_config")
            if isinstance(quantization, BitsAndBytesConfig) and quantization.llm_int8_skip_modules is None:
                kwargs["quantization_config"] = copy.deepcopy(quantization)
                kwargs["quantization_config"].llm_int8_skip_modules = list(family.quantization_skip_modules)
            backbone = family.model_cls.from_pretrained(checkpoint, **kwargs)
            config_kwargs.setdefault("base_model", checkpoint)
        elif kwargs:
            raise ValueError(f"{sorted(kwargs)} are not fields of {cls.config_class.__name__}.")
        if not isinstance(backbone, PreTrainedModel):
            raise ValueError(f"backbone must be a model, a registry name or a checkpoint, got {type(backbone)}.")
        family_of(backbone.config)
        config_kwargs.setdefault("base_model", getattr(backbone.config, "name_or_path", None) or None)
        # A copy: building a configuration resets its sub-configs' attention implementation, which the backbone's
        # own configuration must keep (the head then holds the backbone's configuration itself).
        config = cls.config_class(backbone_config=copy.deepcopy(backbone.config), **config_kwargs)
        model = cls(config, backbone=backbone)
        for name in model.head_modules:
            model.get_submodule(name).to(backbone.device)
        return model

    @classmethod
    def from_pretrained(
        cls, *args, quantization_config: QuantizationConfigMixin | dict | None = None, **kwargs
    ) -> "VLMHeadPreTrainedModel":
        # transformers' default bitsandbytes skip list holds only the last module: it would quantize the vision
        # tower, the projector and the head. Keep the family's skip list and the head in full precision.
        if isinstance(quantization_config, BitsAndBytesConfig) and quantization_config.llm_int8_skip_modules is None:
            config = kwargs.get("config") or cls.config_class.from_pretrained(*args[:1], **_hub_kwargs(kwargs))
            family = family_of(config.backbone_config)
            quantization_config = copy.deepcopy(quantization_config)
            quantization_config.llm_int8_skip_modules = [
                *(f"backbone.{name}" for name in family.quantization_skip_modules),
                *cls.head_modules,
            ]
        return super().from_pretrained(*args, quantization_config=quantization_config, **kwargs)


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


def _batch_size(**tensors: torch.Tensor | None) -> int | None:
    sizes = {name: tensor.shape[0] for name, tensor in tensors.items() if isinstance(tensor, torch.Tensor)}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"The inputs disagree on the batch size: {sizes}.")
    return next(iter(sizes.values()), None)


class _DelegatedGeneration:
    """`generate()` of a head runs its backbone's: the head reads the prompt, the backbone answers in text."""

    def generate(self, *args, **kwargs) -> torch.LongTensor:
        """The backbone's `generate`: same inputs (the processor's outputs), same token ids out."""
        return self.backbone.generate(*args, **kwargs)


@dataclass
class VLMClassifierOutput(ImageClassifierOutput):
    r"""
    pooled_features (`torch.FloatTensor` of shape `(B, H)`):
        What the head read: the mean projected image feature (`pooling="vision"`) or the backbone's hidden state at
        the last non-padding token (`pooling="multimodal"`).
    """

    pooled_features: torch.FloatTensor | None = None


class VLMForImageClassification(_DelegatedGeneration, VLMHeadPreTrainedModel):
    """Image (+ prompt) classification on any registered VLM family: the receipt classifier's head generalised.

    `pooling="vision"`: images → `image_features` (B, N, H) → masked mean (B, H) → head → logits (B, num_labels);
    the language model does not run. `pooling="multimodal"`: the prompt with its image tokens → `sequence_states`
    (B, L, H) → state at the last non-padding token (B, H) → head. `generate()` answers in text with the backbone.
    """

    config: VLMClassificationConfig
    config_class = VLMClassificationConfig
    head_kind = HEAD_CLASSIFICATION
    auto_classes = ("AutoModel", "AutoModelForImageClassification")
    model_card_template = "vlm_classification.md"
    pipeline_tag = "image-classification"
    model_card_tags = ("image-classification",)
    # The cross-entropy is a per-batch mean: the Trainer must average it over gradient accumulation itself.
    accepts_loss_kwargs = False
    head_modules = ("classifier",)

    def __init__(self, config: VLMClassificationConfig, backbone: PreTrainedModel | None = None):
        config.check_classifier_settings()
        super().__init__(config, backbone)
        if config.pooling == "multimodal":
            # The head reads a prompt: the folder ships a pipeline that builds it. A "vision" head needs none:
            # transformers' own image-classification pipeline feeds it the image processor's outputs.
            self.pipeline_classes = {"image-classification": VLMImageClassificationPipeline}
        self.classifier = ClassificationHead(
            config.hidden_size,
            config.classifier_hidden_dims,
            config.num_labels,
            config.classifier_dropout_rates,
            config.classifier_batch_norm,
            config.classifier_activation,
        )
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **backbone_inputs,
    ) -> VLMClassifierOutput:
        r"""
        pixel_values (`torch.FloatTensor`):
            The images as the family's processor returns them, with its other image inputs in `backbone_inputs`
            (e.g. `image_grid_thw`, `aspect_ratio_ids`, `pixel_attention_mask`). One image per sample.
        input_ids, attention_mask (`torch.LongTensor` of shape `(B, L)`, *optional*):
            The prompt with the family's image token; read by `pooling="multimodal"` only.
        labels (`torch.LongTensor` of shape `(B,)`, *optional*):
            Class ids in `[0, num_labels)`; adds the cross-entropy `loss`.
        backbone_inputs:
            The processor's other outputs (`mm_token_type_ids`, `cross_attention_mask`, `token_type_ids`, ...).

        Returns `logits` (B, num_labels), `pooled_features` (B, H) and, with `labels`, `loss`.
        """
        if pixel_values is None:
            raise ValueError("pixel_values are required: the classifier reads the image.")
        batch_size = _batch_size(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        if labels is not None:
            check_tensor("labels", labels, (batch_size,), "(B,)")
            if labels.is_floating_point() or labels.min() < 0 or labels.max() >= self.config.num_labels:
                raise ValueError(
                    f"labels must be class ids in [0, {self.config.num_labels}) of {self.config.id2label}, "
                    f"got {labels.tolist()}."
                )
        if self.config.pooling == "vision":
            image_inputs = {name: backbone_inputs.get(name) for name in self.family.image_inputs}
            features, valid = image_features(self.backbone, **{**image_inputs, "pixel_values": pixel_values})
            if batch_size is not None and features.shape[0] != batch_size:
                raise ValueError(
                    f"The images give features for {features.shape[0]} images but the batch has {batch_size} "
                    'samples: pooling="vision" reads one image per sample.'
                )
            pooled = masked_mean(features, valid)
        else:
            if input_ids is None:
                raise ValueError(
                    'pooling="multimodal" reads the prompt: it needs input_ids holding the family\'s image token.'
                )
            check_image_tokens(self.config.backbone_config, input_ids, has_images=True)
            states = sequence_states(
                self.backbone,
                input_ids=input_ids,
                attention_mask=attention_mask,
                pixel_values=pixel_values,
                **backbone_inputs,
            )
            pooled = last_token_state(states, attention_mask)
        logits = self.classifier(pooled)
        loss = None if labels is None else F.cross_entropy(logits.float(), labels.to(logits.device))
        return VLMClassifierOutput(loss=loss, logits=logits, pooled_features=pooled)


@dataclass
class VLMTrajectoryOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor`, *optional*):
        The waypoint loss (the flow-matching loss for `trajectory_head="flow"`), when `ego_waypoints` are given.
    trajectory (`torch.FloatTensor` of shape `(B, num_waypoints, waypoint_dim)`):
        Predicted ego waypoints of the commanded mode (of the only mode when `num_modes` is 1).
    trajectory_modes (`torch.FloatTensor` of shape `(B, num_modes, num_waypoints, waypoint_dim)`):
        The waypoints of every mode.
    ego_features (`torch.FloatTensor` of shape `(B, H)`):
        The backbone's last hidden state at the `<ego_wp>` token.
    """

    loss: torch.FloatTensor | None = None
    trajectory: torch.FloatTensor | None = None
    trajectory_modes: torch.FloatTensor | None = None
    ego_features: torch.FloatTensor | None = None


class VLMForTrajectory(_DelegatedGeneration, VLMHeadPreTrainedModel):
    """The Orion driving head on any registered VLM family.

    Scene queries (B, Ns, Ds), history queries (B, Nh, Dh) and the CAN-bus vector (B, Dc) are projected to the
    width H and replace the embeddings of their placeholder tokens (`DrivingEmbeddings`, shared with the Orion
    models); the backbone reads the prompt with its images (`sequence_states`), and its state at `<ego_wp>` (B, H)
    feeds the trajectory head (`"mlp"` or `"flow"`) → waypoints (B, T, D). The placeholders need token ids: add
    them to the family's processor with `DrivingPlaceholders`, grow the backbone's embeddings to the tokenizer
    (`resize_token_embeddings`) and pass `placeholders.model_config_kwargs()` to the config.
    """

    config: VLMTrajectoryConfig
    config_class = VLMTrajectoryConfig
    head_kind = HEAD_TRAJECTORY
    model_card_template = "vlm_trajectory.md"
    pipeline_tag = "robotics"
    model_card_tags = ("autonomous-driving", "trajectory-prediction")
    pipeline_classes = {"trajectory-prediction": OrionTrajectoryPipeline}
    accepts_loss_kwargs = False
    head_modules = ("driving_embeddings", "trajectory_decoder")

    def __init__(self, config: VLMTrajectoryConfig, backbone: PreTrainedModel | None = None):
        config.check_driving_settings()
        super().__init__(config, backbone)
        self.driving_embeddings = DrivingEmbeddings(config, config.hidden_size)
        self.trajectory_decoder = trajectory_decoder(config, config.hidden_size)
        self.post_init()

    def _check_driving_inputs(self, batch_size: int, **tensors: torch.Tensor | None) -> None:
        config = self.config
        expected = {
            "scene_queries": ((batch_size, None, config.scene_query_dim), "(B, Ns, scene_query_dim)"),
            "history_queries": ((batch_size, None, config.history_query_dim), "(B, Nh, history_query_dim)"),
            "can_bus": ((batch_size, config.can_bus_dim), "(B, can_bus_dim)"),
            "ego_waypoints": (
                (batch_size, config.num_waypoints, config.waypoint_dim),
                "(B, num_waypoints, waypoint_dim)",
            ),
            "command": ((batch_size,), "(B,)"),
        }
        for name, (shape, layout) in expected.items():
            if tensors[name] is not None:
                check_tensor(name, tensors[name], shape, layout)
        command = tensors["command"]
        if command is not None and (
            command.is_floating_point() or command.min() < 0 or command.max() >= config.num_modes
        ):
            raise ValueError(f"command must hold mode indices in [0, {config.num_modes}), got {command.tolist()}.")
        if tensors["ego_waypoints"] is not None and config.num_modes > 1 and command is None:
            raise ValueError(f"command (B,) is required to train a model with num_modes={config.num_modes}.")

    def _ego_features(self, input_ids: torch.LongTensor, states: torch.Tensor) -> torch.Tensor | None:
        """The state (B, H) at each prompt's `<ego_wp>`, or None when no prompt holds one (plain questions)."""
        ego_id = self.config.ego_token_id
        if ego_id is None:
            raise ValueError("config.ego_token_id is not set: add the placeholders with DrivingPlaceholders.")
        ego_mask = input_ids == ego_id
        per_sample = ego_mask.sum(dim=1)
        if not per_sample.any():
            return None
        if (per_sample != 1).any():
            raise ValueError(
                f"Each prompt needs exactly one <ego_wp> token (id {ego_id}); input_ids hold {per_sample.tolist()}."
            )
        return states[ego_mask]

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        scene_queries: torch.FloatTensor | None = None,
        history_queries: torch.FloatTensor | None = None,
        can_bus: torch.FloatTensor | None = None,
        command: torch.LongTensor | None = None,
        ego_waypoints: torch.FloatTensor | None = None,
        **backbone_inputs,
    ) -> VLMTrajectoryOutput:
        r"""
        input_ids, attention_mask (`torch.LongTensor` of shape `(B, L)`):
            The prompt: expanded driving placeholders, one `<ego_wp>`, and the family's image tokens with images.
            Prompts without `<ego_wp>` (plain questions) give an output without trajectory.
        pixel_values (`torch.FloatTensor`, *optional*):
            Camera images as the family's processor returns them, its other outputs in `backbone_inputs`.
        scene_queries (`torch.FloatTensor` of shape `(B, Ns, scene_query_dim)`, *optional*):
            One row per `<scene>` token of each sample.
        history_queries (`torch.FloatTensor` of shape `(B, Nh, history_query_dim)`, *optional*):
            One row per `<history>` token of each sample.
        can_bus (`torch.FloatTensor` of shape `(B, can_bus_dim)`, *optional*):
            Ego CAN-bus state, for the one `<can_bus>` token of each sample.
        command (`torch.LongTensor` of shape `(B,)`, *optional*):
            Navigation command picking the trajectory mode; required to train when `num_modes` > 1.
        ego_waypoints (`torch.FloatTensor` of shape `(B, num_waypoints, waypoint_dim)`, *optional*):
            Target waypoints; adds the waypoint loss.
        """
        if input_ids is None:
            raise ValueError("input_ids are required: the trajectory is read at the prompt's <ego_wp> token.")
        batch_size = _batch_size(input_ids=input_ids, attention_mask=attention_mask)
        self._check_driving_inputs(
            batch_size,
            scene_queries=scene_queries,
            history_queries=history_queries,
            can_bus=can_bus,
            ego_waypoints=ego_waypoints,
            command=command,
        )
        check_image_tokens(self.config.backbone_config, input_ids, has_images=pixel_values is not None)
        inputs_embeds = self.get_input_embeddings()(input_ids)
        inputs_embeds = self.driving_embeddings(input_ids, inputs_embeds, scene_queries, history_queries, can_bus)
        if pixel_values is not None:
            backbone_inputs["pixel_values"] = pixel_values
        states = sequence_states(
            self.backbone,
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            **backbone_inputs,
        )
        ego_features = self._ego_features(input_ids, states)
        if ego_features is None:
            if ego_waypoints is not None:
                raise ValueError(
                    "ego_waypoints were given but input_ids hold no <ego_wp> token to read a trajectory at."
                )
            return VLMTrajectoryOutput(ego_features=None)
        trajectory_modes = self.trajectory_decoder(ego_features)
        trajectory = None
        if self.config.num_modes == 1:
            trajectory = trajectory_modes[:, 0]
        elif command is not None:
            trajectory = select_mode(trajectory_modes, command)
        loss = None
        if ego_waypoints is not None:
            if self.config.trajectory_head == "flow":
                loss = self.trajectory_decoder.loss(ego_features, ego_waypoints, command)
            else:
                loss = waypoint_loss(trajectory, ego_waypoints, self.config.waypoint_loss)
            loss = self.config.waypoint_loss_weight * loss
        return VLMTrajectoryOutput(
            loss=loss, trajectory=trajectory, trajectory_modes=trajectory_modes, ego_features=ego_features
        )
