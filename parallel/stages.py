"""Splitting a decoder-only VLM (or a vlmheads head on one) into pipeline stages, and running one stage.

What is split is read from declared capabilities, never from class names: the family table's `pipeline_splittable`
and `positions` (3-D M-RoPE or 1-D), and the model's head kind (`head_kind_of`). Stage 0 holds the vision tower and
projector, the token embeddings (and the driving-feature projectors of a trajectory head) and the first decoder
layers; the last stage holds the last layers, the final norm, the LM head and the task head (trajectory decoder,
classifier). `prepare` writes one safetensors shard per stage plus `pipeline_plan.json` (with each shard's SHA-256),
so that a node materialises only its slice: the model skeleton is built on the meta device from the config and only
the stage's modules are loaded from its shard.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    DynamicCache,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.masking_utils import create_causal_mask
from transformers.utils import ModelOutput

from ..configuration.constants import HEAD_ACTIONS, HEAD_CLASSIFICATION, HEAD_GENERATION, HEAD_TRAJECTORY
from ..modeling.capabilities import backbone_config_of, backbone_family_of, head_kind_of
from ..modeling.families import DECODER_ONLY, POSITIONS_MROPE, VLM_FAMILIES, VLMFamily, get_module
from ..modeling.heads import last_token_state
from ..modeling.modeling_vlm_heads import image_features, image_token_id
from ..modeling.positions import decode_positions, prompt_positions
from ..training.backbones import head_modules, model_family

PLAN_FILE = "pipeline_plan.json"
PLAN_VERSION = 1
# The full model's weight files, which `prepare` does not copy.
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth")
# Task-head modules that read the prompt's embeddings (stage 0); every other head module sits on the last stage.
INPUT_HEAD_MODULES = ("driving_embeddings",)
# The heads whose output the last stage computes from the prompt's last hidden states (`StageModel.head_output`).
FORWARD_HEADS = (HEAD_TRAJECTORY, HEAD_CLASSIFICATION)
# The processor outputs the last stage's head reads besides the hidden states.
HEAD_INPUTS = ("input_ids", "attention_mask", "command")


@dataclass(frozen=True)
class StagePlan:
    """Which decoder layers each stage runs: `layer_ranges[s]` is `(start, end)`, end exclusive.

    A plan read from a prepared folder also carries each stage's shard file and its SHA-256 (not compared).
    """

    layer_ranges: tuple[tuple[int, int], ...]
    shards: tuple[str, ...] = field(default=(), compare=False)
    sha256: tuple[str, ...] = field(default=(), compare=False)

    @property
    def num_stages(self) -> int:
        return len(self.layer_ranges)

    @property
    def num_layers(self) -> int:
        return self.layer_ranges[-1][1]

    def to_dict(self) -> dict[str, Any]:
        stages = []
        for stage, layers in enumerate(self.layer_ranges):
            entry = {"stage": stage, "layers": list(layers), "shard": shard_name(stage)}
            if self.sha256:
                entry["sha256"] = self.sha256[stage]
            stages.append(entry)
        return {"version": PLAN_VERSION, "num_stages": self.num_stages, "stages": stages}

    @classmethod
    def from_counts(cls, counts: list[int] | tuple[int, ...], num_layers: int) -> StagePlan:
        """A plan from the number of layers of each stage, e.g. `[3, 5]`; they must add up to `num_layers`."""
        if not counts or any(count < 1 for count in counts) or sum(counts) != num_layers:
            raise ValueError(
                f"layers per stage must be positive and add up to the model's {num_layers} decoder layers, got "
                f"{list(counts)}."
            )
        bounds = [0]
        for count in counts:
            bounds.append(bounds[-1] + count)
        return cls(tuple(zip(bounds[:-1], bounds[1:], strict=True)))


def shard_name(stage: int) -> str:
    return f"stage-{stage}.safetensors"


def splittable_families() -> list[str]:
    return sorted(name for name, family in VLM_FAMILIES.items() if family.pipeline_splittable)


def check_supported(model_or_config: PreTrainedModel | PretrainedConfig) -> VLMFamily:
    """The backbone's VLM family, or a `ValueError` when the pipeline cannot split the model (read from the family
    table's `pipeline_splittable` and `architecture`, the text config's `layer_types` and the head kind)."""
    family = backbone_family_of(model_or_config)
    if not family.pipeline_splittable or family.architecture != DECODER_ONLY:
        raise ValueError(
            f"The pipeline splits the families {splittable_families()}; {type(model_or_config).__name__} is on "
            f"{family.name!r}, which the family table does not declare pipeline_splittable."
        )
    if head_kind_of(model_or_config) == HEAD_ACTIONS:
        raise ValueError("The pipeline does not split action models (VLAs): they sample action chunks, not tokens.")
    text_config = text_config_of(model_or_config)
    layer_types = set(getattr(text_config, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise ValueError(f"The pipeline runs full-attention decoders only; the model's layer_types are {layer_types}.")
    return family


def text_config_of(model_or_config: PreTrainedModel | PretrainedConfig) -> PretrainedConfig:
    """The decoder's configuration: the backbone's text config (a head holds its backbone's as `backbone_config`)."""
    return backbone_config_of(model_or_config).get_text_config()


def load_config(model_dir: str | Path, trust_remote_code: bool = False) -> PretrainedConfig:
    """The folder's configuration; vlmheads' own model types load from the installed package, other code in the
    folder runs only with `trust_remote_code`."""
    return AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)


def _auto_class(config: PretrainedConfig) -> type:
    """A plain backbone generates with its `ForConditionalGeneration` class; every vlmheads head loads with
    `AutoModel` (they register there)."""
    return AutoModelForImageTextToText if head_kind_of(config) == HEAD_GENERATION else AutoModel


def load_model(model_dir: str | Path, config: PretrainedConfig, trust_remote_code: bool = False) -> PreTrainedModel:
    return _auto_class(config).from_pretrained(model_dir, config=config, trust_remote_code=trust_remote_code).eval()


def empty_model(config: PretrainedConfig, trust_remote_code: bool = False) -> PreTrainedModel:
    """The model skeleton: parameters on the meta device (no memory), buffers (rotary frequencies) computed."""
    with init_empty_weights():
        return _auto_class(config).from_config(config, trust_remote_code=trust_remote_code).eval()


def _end_modules(model: nn.Module) -> tuple[list[str], list[str]]:
    """The module paths only stage 0 holds and those only the last stage holds (besides decoder layers)."""
    family, prefix = model_family(model)
    heads = [name for name in head_modules(model) if _has_module(model, name)]
    first = [prefix + family.vision_tower, f"{prefix}{family.language_model}.embed_tokens"]
    if not family.projector.startswith(family.vision_tower + "."):
        first.append(prefix + family.projector)
    first += [name for name in heads if name in INPUT_HEAD_MODULES]
    last = [f"{prefix}{family.language_model}.norm", prefix + family.lm_head]
    last += [name for name in heads if name not in INPUT_HEAD_MODULES]
    return first, last


def _layers_path(model: nn.Module) -> str:
    family, prefix = model_family(model)
    return f"{prefix}{family.language_model}.layers"


def stage_prefixes(model: nn.Module, plan: StagePlan, stage: int) -> list[str]:
    """Module paths whose parameters stage `stage` holds."""
    start, end = plan.layer_ranges[stage]
    prefixes = [f"{_layers_path(model)}.{index}" for index in range(start, end)]
    first, last = _end_modules(model)
    if stage == 0:
        prefixes += first
    if stage == plan.num_stages - 1:
        prefixes += last
    return prefixes


def _owned(name: str, prefixes: list[str]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def _check_prefixes_cover(model: nn.Module, plan: StagePlan) -> None:
    every = [prefix for stage in range(plan.num_stages) for prefix in stage_prefixes(model, plan, stage)]
    unplaced = [name for name, _ in model.named_parameters() if not _owned(name, every)]
    if unplaced:
        raise ValueError(f"The pipeline does not know which stage holds these parameters: {unplaced[:5]}.")


def parameter_counts(model: nn.Module) -> tuple[int, int, list[int]]:
    """Parameters only stage 0 holds, parameters only the last stage holds, and those of each decoder layer.

    A tied LM head counts on both ends: each holds its own copy.
    """

    def count(prefixes: list[str]) -> int:
        return sum(p.numel() for name, p in model.named_parameters(remove_duplicate=False) if _owned(name, prefixes))

    first, last = _end_modules(model)
    num_layers = text_config_of(model).num_hidden_layers
    layers = [count([f"{_layers_path(model)}.{index}"]) for index in range(num_layers)]
    return count(first), count(last), layers


def balance_layers(first: int, last: int, layers: list[int], num_stages: int) -> tuple[int, ...]:
    """Layers per stage that minimise the largest stage's parameter count, every stage holding at least one layer.

    `first` / `last` are the parameters only stage 0 / the last stage hold; `layers[i]` those of layer i.
    """
    num_layers = len(layers)
    if not 1 <= num_stages <= num_layers:
        raise ValueError(f"stages must be between 1 and the model's {num_layers} decoder layers, got {num_stages}.")
    prefix = [0]
    for size in layers:
        prefix.append(prefix[-1] + size)

    def cost(stage: int, start: int, end: int) -> int:
        extra = (first if stage == 0 else 0) + (last if stage == num_stages - 1 else 0)
        return extra + prefix[end] - prefix[start]

    # best[s][i]: (largest stage, layers per stage) of stages s.. over layers i..
    best: dict[tuple[int, int], tuple[int, tuple[int, ...]]] = {}
    for stage in range(num_stages - 1, -1, -1):
        remaining = num_stages - stage
        for start in range(num_layers - remaining, -1, -1) if stage else [0]:
            if stage == num_stages - 1:
                best[stage, start] = (cost(stage, start, num_layers), (num_layers - start,))
                continue
            options = []
            for end in range(start + 1, num_layers - remaining + 2):
                tail_cost, tail = best[stage + 1, end]
                options.append((max(cost(stage, start, end), tail_cost), (end - start, *tail)))
            best[stage, start] = min(options)
    return best[0, 0][1]


def make_plan(
    config: PretrainedConfig,
    num_stages: int,
    layers_per_stage: list[int] | None = None,
    trust_remote_code: bool = False,
) -> StagePlan:
    """A plan for `num_stages` stages: `layers_per_stage` as given, or balanced by parameter count."""
    check_supported(config)
    num_layers = text_config_of(config).num_hidden_layers
    if layers_per_stage is not None:
        if len(layers_per_stage) != num_stages:
            raise ValueError(
                f"layers per stage {layers_per_stage} name {len(layers_per_stage)} stages, not {num_stages}."
            )
        return StagePlan.from_counts(layers_per_stage, num_layers)
    first, last, layers = parameter_counts(empty_model(config, trust_remote_code))
    return StagePlan.from_counts(balance_layers(first, last, layers, num_stages), num_layers)


def prune_to_stage(model: PreTrainedModel, plan: StagePlan, stage: int) -> PreTrainedModel:
    """Drops every module stage `stage` does not hold (in place); the kept ones keep their full names."""
    check_supported(model)
    num_layers = text_config_of(model).num_hidden_layers
    if not 0 <= stage < plan.num_stages:
        raise ValueError(f"stage must be in [0, {plan.num_stages}), got {stage}.")
    if plan.num_layers != num_layers:
        raise ValueError(f"The plan covers {plan.num_layers} layers; the model has {num_layers}.")
    _check_prefixes_cover(model, plan)
    family, prefix = model_family(model)
    language_model = get_module(model, prefix + family.language_model)
    start, end = plan.layer_ranges[stage]
    language_model.layers = nn.ModuleDict({str(index): language_model.layers[index] for index in range(start, end)})
    kept = stage_prefixes(model, plan, stage)
    first, last = _end_modules(model)
    for path in first + last:
        if path not in kept and _has_module(model, path):
            parent, _, name = path.rpartition(".")
            setattr(get_module(model, parent) if parent else model, name, None)
    return model


def _has_module(model: nn.Module, path: str) -> bool:
    try:
        return model.get_submodule(path) is not None
    except AttributeError:
        return False


def stage_state_dict(model: PreTrainedModel, plan: StagePlan, stage: int) -> dict[str, torch.Tensor]:
    """The tensors stage `stage` holds, under the model's own names (tied weights appear under both names)."""
    check_supported(model)
    prefixes = stage_prefixes(model, plan, stage)
    return {
        name: tensor.detach().contiguous().clone()
        for name, tensor in model.state_dict(keep_vars=False).items()
        if _owned(name, prefixes)
    }


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def prepare(
    model_dir: str | Path,
    out_dir: str | Path,
    num_stages: int,
    layers_per_stage: list[int] | None = None,
    trust_remote_code: bool = False,
) -> StagePlan:
    """Writes `out_dir/stage-{s}.safetensors` (each stage's tensors only) and `pipeline_plan.json` (layers, shard
    and SHA-256 of each stage), and copies every other file of the saved model (config, generation config,
    processor, code) from `model_dir`."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = load_config(model_dir, trust_remote_code)
    plan = make_plan(config, num_stages, layers_per_stage, trust_remote_code)
    model = load_model(model_dir, config, trust_remote_code)
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in model_dir.iterdir():
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES) and path.name != PLAN_FILE:
            shutil.copy2(path, out_dir / path.name)
    checksums = []
    for stage in range(plan.num_stages):
        save_file(stage_state_dict(model, plan, stage), out_dir / shard_name(stage), metadata={"format": "pt"})
        checksums.append(file_sha256(out_dir / shard_name(stage)))
    plan = StagePlan(plan.layer_ranges, tuple(map(shard_name, range(plan.num_stages))), tuple(checksums))
    (out_dir / PLAN_FILE).write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
    return plan


class PlanError(ValueError):
    """A `pipeline_plan.json` that cannot be used; the message names the file and the key."""


def _plan_value(path: Path, data: dict, key: str, where: str, kind: type) -> Any:
    if key not in data:
        raise PlanError(f"{path}: {where}{key} is missing; prepare the folder again.")
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise PlanError(f"{path}: {where}{key} must be a {kind.__name__}, got {value!r}.")
    return value


def read_plan(prepared_dir: str | Path) -> StagePlan:
    """The plan `prepare` wrote, validated: version, keys, types, contiguous layer ranges, shard files inside the
    folder, and a SHA-256 per shard. Anything else is a `PlanError` naming the file and the key."""
    folder = Path(prepared_dir).resolve()
    path = folder / PLAN_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PlanError(f"{path}: not a readable JSON file ({error}).") from error
    if not isinstance(data, dict):
        raise PlanError(f"{path}: must hold a JSON object, got {type(data).__name__}.")
    version = _plan_value(path, data, "version", "", int)
    if version != PLAN_VERSION:
        raise PlanError(f"{path}: version {version} is not supported (this vlmheads reads version {PLAN_VERSION}).")
    num_stages = _plan_value(path, data, "num_stages", "", int)
    stages = _plan_value(path, data, "stages", "", list)
    if num_stages < 1 or len(stages) != num_stages:
        raise PlanError(f"{path}: num_stages is {num_stages} but stages lists {len(stages)} entries.")
    ranges, shards, checksums = [], [], []
    for index, entry in enumerate(stages):
        where = f"stages[{index}]."
        if not isinstance(entry, dict):
            raise PlanError(f"{path}: stages[{index}] must be an object, got {entry!r}.")
        if _plan_value(path, entry, "stage", where, int) != index:
            raise PlanError(f"{path}: {where}stage must be {index}, got {entry['stage']!r}.")
        layers = _plan_value(path, entry, "layers", where, list)
        start = ranges[-1][1] if ranges else 0
        if (
            len(layers) != 2
            or not all(isinstance(bound, int) and not isinstance(bound, bool) for bound in layers)
            or layers[0] != start
            or layers[1] <= start
        ):
            raise PlanError(f"{path}: {where}layers must be [{start}, end] with end > {start}, got {layers!r}.")
        shard = _plan_value(path, entry, "shard", where, str)
        shard_path = (folder / shard).resolve()
        if not shard_path.is_relative_to(folder) or not shard_path.is_file():
            raise PlanError(f"{path}: {where}shard {shard!r} must name a file inside {folder}.")
        checksum = _plan_value(path, entry, "sha256", where, str)
        if not re.fullmatch(r"[0-9a-f]{64}", checksum):
            raise PlanError(f"{path}: {where}sha256 must be 64 lowercase hex digits, got {checksum!r}.")
        ranges.append(tuple(layers))
        shards.append(shard)
        checksums.append(checksum)
    return StagePlan(tuple(ranges), tuple(shards), tuple(checksums))


def is_prepared(model_dir: str | Path) -> bool:
    return (Path(model_dir) / PLAN_FILE).is_file()


def load_stage_model(
    model_dir: str | Path,
    stage: int,
    num_stages: int,
    layers_per_stage: list[int] | None = None,
    trust_remote_code: bool = False,
    verify_shards: bool = True,
) -> tuple[PreTrainedModel, StagePlan]:
    """Stage `stage`'s part of the model: from its shard when `model_dir` was prepared (only the slice is read,
    after its SHA-256 is checked against the plan unless `verify_shards` is False), otherwise from the full saved
    model, pruned."""
    config = load_config(model_dir, trust_remote_code)
    check_supported(config)
    if is_prepared(model_dir):
        plan = read_plan(model_dir)
        if plan.num_stages != num_stages or (
            layers_per_stage is not None and plan != StagePlan.from_counts(layers_per_stage, plan.num_layers)
        ):
            raise ValueError(
                f"{model_dir} was prepared for layers {list(plan.layer_ranges)}; asked for {num_stages} stages "
                f"with layers per stage {layers_per_stage}: prepare it again."
            )
        shard = Path(model_dir) / plan.shards[stage]
        if verify_shards and file_sha256(shard) != plan.sha256[stage]:
            raise ValueError(
                f"{shard}'s SHA-256 differs from the one {PLAN_FILE} records: the file changed since `prepare` "
                "(copy it again, or skip the check with --no-verify-shards)."
            )
        model = prune_to_stage(empty_model(config, trust_remote_code), plan, stage)
        missing, unexpected = model.load_state_dict(load_file(shard), strict=False, assign=True)
        if unexpected:
            raise ValueError(f"{shard} holds tensors stage {stage} does not own: {unexpected[:5]}.")
        _tie_kept_embeddings(model)
    else:
        plan = make_plan(config, num_stages, layers_per_stage, trust_remote_code)
        model = prune_to_stage(load_model(model_dir, config, trust_remote_code), plan, stage)
    left_empty = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if left_empty:
        raise ValueError(f"Stage {stage}'s shard in {model_dir} lacks {left_empty[:5]}.")
    return model, plan


def _tie_kept_embeddings(model: PreTrainedModel) -> None:
    """A single-stage model holds both tied matrices: share one tensor again."""
    family, prefix = model_family(model)
    language_model = get_module(model, prefix + family.language_model)
    lm_head = get_module(model, prefix + family.lm_head) if _has_module(model, prefix + family.lm_head) else None
    tied = getattr(text_config_of(model), "tie_word_embeddings", False)
    if tied and lm_head is not None and language_model.embed_tokens is not None:
        lm_head.weight = language_model.embed_tokens.weight


def head_inputs(inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The inputs of a forward request that the last stage's head reads (`HEAD_INPUTS`), as tensors."""
    return {name: torch.as_tensor(inputs[name]) for name in HEAD_INPUTS if inputs.get(name) is not None}


@dataclass
class HeadOutput(ModelOutput):
    """What the last stage's task head computes from one prompt (batch of 1), the fields of the head's own output.

    trajectory `(1, T, D)` and trajectory_modes `(1, M, T, D)` (trajectory heads); logits `(1, num_labels)`
    (classifiers).
    """

    trajectory: torch.FloatTensor | None = None
    trajectory_modes: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None


class StageModel:
    """One stage's modules and the computation it runs for one request (batch of 1).

    `embed` (stage 0) turns the processor's outputs into embeddings (1, S, H) and positions (R, 1, S), R = 3 for
    M-RoPE families and 1 otherwise; `run_layers` runs the stage's decoder layers over a request's own cache, which
    holds only these layers; `next_token_logits` (last stage) normalises and applies the LM head at the last
    position: (1, V); `head_output` (last stage) runs the task head over the prompt's hidden states.
    """

    def __init__(self, model: PreTrainedModel, plan: StagePlan, stage: int):
        self.model = model
        self.plan = plan
        self.stage = stage
        check_supported(model)
        self.family, prefix = model_family(model)
        self.head_kind = head_kind_of(model)
        self.backbone = get_module(model, prefix.rstrip(".")) if prefix else model
        self.text_config = self.backbone.config.get_text_config()
        self.language_model = get_module(model, prefix + self.family.language_model)
        self.lm_head = get_module(model, prefix + self.family.lm_head) if self.is_last else None
        self.mrope = self.family.positions == POSITIONS_MROPE
        layers = self.language_model.layers
        # A pruned model keeps its layers in a ModuleDict under their global indices; a whole one in a ModuleList.
        self.layers = list(layers.values()) if isinstance(layers, nn.ModuleDict) else list(layers)
        # A stage's cache holds its layers only, numbered from 0.
        for local_index, layer in enumerate(self.layers):
            layer.self_attn.layer_idx = local_index

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.plan.num_stages - 1

    @property
    def position_rows(self) -> int:
        """Rows of the positions (R, 1, S): 3 (temporal, height, width) for M-RoPE, else 1."""
        return 3 if self.mrope else 1

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def new_cache(self) -> DynamicCache:
        return DynamicCache()

    @torch.no_grad()
    def embed(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Prompt embeddings (1, S, H) with the image features at the image tokens, positions (R, 1, S) and the
        M-RoPE offset of later tokens (0 for 1-D positions)."""
        input_ids = inputs["input_ids"].to(self.device)
        embeddings = self.token_embeddings(input_ids, inputs)
        if inputs.get("pixel_values") is not None:
            image_inputs = {name: inputs.get(name) for name in self.family.image_inputs}
            image_inputs = {name: value.to(self.device) for name, value in image_inputs.items() if value is not None}
            features, valid = image_features(self.backbone, **image_inputs)
            rows = features[valid].to(embeddings.dtype)
            mask = input_ids == image_token_id(self.backbone.config)
            if int(mask.sum()) != rows.shape[0]:
                raise ValueError(
                    f"The prompt holds {int(mask.sum())} image tokens but the images give {rows.shape[0]} feature "
                    "rows: build the prompt with the model's processor."
                )
            embeddings = embeddings.masked_scatter(mask.unsqueeze(-1).expand_as(embeddings), rows)
        on_device = {
            name: value.to(self.device) if isinstance(value, torch.Tensor) else value for name, value in inputs.items()
        }
        positions, offsets = prompt_positions(self.backbone, self.family, on_device)
        return embeddings, positions.reshape(self.position_rows, 1, -1), int(offsets[0, 0])

    def token_embeddings(self, input_ids: torch.Tensor, driving_inputs: dict[str, Any]) -> torch.Tensor:
        """`embed_tokens`, then (trajectory heads) the driving features at their placeholders: (1, S) → (1, S, H)."""
        embeddings = self.language_model.embed_tokens(input_ids)
        if self.head_kind == HEAD_TRAJECTORY:
            features = {
                name: None if driving_inputs.get(name) is None else driving_inputs[name].to(self.device)
                for name in ("scene_queries", "history_queries", "can_bus")
            }
            embeddings = self.model.driving_embeddings(input_ids, embeddings, **features)
        return embeddings

    def positions(self, start: int, rope_delta: int) -> torch.Tensor:
        """The position of the token at index `start`, shifted by the prompt's M-RoPE offset: (R, 1, 1)."""
        next_position = torch.tensor([start + rope_delta], device=self.device)
        return decode_positions(self.family, next_position).reshape(self.position_rows, 1, 1)

    @torch.no_grad()
    def run_layers(self, hidden: torch.Tensor, positions: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        """The stage's decoder layers: hidden (1, S, H), positions (R, 1, S) → (1, S, H); `cache` grows by S."""
        mask = create_causal_mask(
            config=self.text_config, inputs_embeds=hidden, attention_mask=None, cache=cache, position_ids=None
        )
        position_embeddings = self.language_model.rotary_emb(hidden, positions if self.mrope else positions[0])
        for layer in self.layers:
            hidden = layer(
                hidden, attention_mask=mask, position_embeddings=position_embeddings, cache=cache, use_cache=True
            )
        return hidden

    @torch.no_grad()
    def next_token_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head at the last position: (1, S, H) → (1, V)."""
        return self.lm_head(self.language_model.norm(hidden)[:, -1])

    @torch.no_grad()
    def head_output(self, hidden: torch.Tensor, head_inputs: dict[str, torch.Tensor]) -> HeadOutput:
        """The task head over the prompt's last-layer hidden states (1, S, H), before the final norm.

        `head_inputs`: `input_ids` (1, S), and `command` (1,) for a multi-mode trajectory head or `attention_mask`
        (1, S) for a classifier, as the model's forward takes them. A `ValueError` is the request's fault.
        """
        if self.head_kind not in FORWARD_HEADS:
            raise ValueError(f"The model has no task head the pipeline runs: its head kind is {self.head_kind!r}.")
        states = self.language_model.norm(hidden)
        if self.head_kind == HEAD_CLASSIFICATION:
            if self.model.config.pooling != "multimodal":
                raise ValueError('The pipeline runs classifiers with pooling="multimodal" (they read the prompt).')
            pooled = last_token_state(states, head_inputs.get("attention_mask"))
            return HeadOutput(logits=self.model.classify(pooled).logits)
        features = self.model.ego_features(head_inputs["input_ids"].to(self.device), states)
        if features is None:
            raise ValueError("The prompt holds no <ego_wp> token to read a trajectory at.")
        command = head_inputs.get("command")
        modes, trajectory, _ = self.model.trajectory_outputs(
            features, None if command is None else command.to(self.device)
        )
        return HeadOutput(trajectory=trajectory, trajectory_modes=modes)
