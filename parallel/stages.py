"""Splitting a Qwen2-VL / Qwen2.5-VL (or Orion) model into pipeline stages, and running one stage.

Stage 0 holds the vision tower, the token embeddings (and Orion's driving-feature projectors) and the first decoder
layers; the last stage holds the last layers, the final norm, the LM head (and Orion's trajectory head). `prepare`
writes one safetensors shard per stage plus `pipeline_plan.json`, so that a node materialises only its slice: the
model skeleton is built on the meta device from the config and only the stage's modules are loaded from its shard.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from accelerate import init_empty_weights
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, DynamicCache, PretrainedConfig, PreTrainedModel
from transformers.generation.logits_process import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper
from transformers.masking_utils import create_causal_mask

import vlmheads

from ..modeling.families import VLMFamily, family_of, get_module

PLAN_FILE = "pipeline_plan.json"
# The full model's weight files, which `prepare` does not copy.
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth")
SUPPORTED_FAMILIES = ("qwen2-vl", "qwen2.5-vl")
# Task-head modules that read the prompt's embeddings (stage 0); every other head module sits on the last stage.
INPUT_HEAD_MODULES = ("driving_embeddings",)


@dataclass(frozen=True)
class StagePlan:
    """Which decoder layers each stage runs: `layer_ranges[s]` is `(start, end)`, end exclusive."""

    layer_ranges: tuple[tuple[int, int], ...]

    @property
    def num_stages(self) -> int:
        return len(self.layer_ranges)

    @property
    def num_layers(self) -> int:
        return self.layer_ranges[-1][1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_stages": self.num_stages,
            "stages": [
                {"stage": stage, "layers": list(layers), "shard": shard_name(stage)}
                for stage, layers in enumerate(self.layer_ranges)
            ],
        }

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


def check_supported(config: PretrainedConfig) -> VLMFamily:
    """The model's VLM family, or a `ValueError` when the pipeline cannot split it."""
    family = family_of(config)
    if family.name not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"The pipeline splits the families {list(SUPPORTED_FAMILIES)}; {type(config).__name__} is {family.name!r}."
        )
    layer_types = set(getattr(config.text_config, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise ValueError(f"The pipeline runs full-attention decoders only; the model's layer_types are {layer_types}.")
    return family


def model_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    """The class `config.architectures[0]` names, looked up in vlmheads, then in transformers."""
    name = (config.architectures or [None])[0]
    for namespace in (vlmheads, transformers):
        if name is not None and hasattr(namespace, name):
            return getattr(namespace, name)
    raise ValueError(f"config.architectures must name a vlmheads or transformers model class, got {name!r}.")


def load_config(model_dir: str | Path) -> PretrainedConfig:
    return AutoConfig.from_pretrained(model_dir, trust_remote_code=True)


def empty_model(config: PretrainedConfig) -> PreTrainedModel:
    """The model skeleton: parameters on the meta device (no memory), buffers (rotary frequencies) computed."""
    with init_empty_weights():
        return model_class(config)(config).eval()


def _end_modules(model: nn.Module, family: VLMFamily) -> tuple[list[str], list[str]]:
    """The module paths only stage 0 holds and those only the last stage holds (besides decoder layers)."""
    head_modules = [name for name in getattr(model, "head_modules", ()) if getattr(model, name, None) is not None]
    first = [family.vision_tower, f"{family.language_model}.embed_tokens"]
    first += [name for name in head_modules if name in INPUT_HEAD_MODULES]
    last = [f"{family.language_model}.norm", family.lm_head]
    last += [name for name in head_modules if name not in INPUT_HEAD_MODULES]
    return first, last


def stage_prefixes(model: nn.Module, family: VLMFamily, plan: StagePlan, stage: int) -> list[str]:
    """Module paths whose parameters stage `stage` holds."""
    start, end = plan.layer_ranges[stage]
    prefixes = [f"{family.language_model}.layers.{index}" for index in range(start, end)]
    first, last = _end_modules(model, family)
    if stage == 0:
        prefixes += first
    if stage == plan.num_stages - 1:
        prefixes += last
    return prefixes


def _owned(name: str, prefixes: list[str]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def _check_prefixes_cover(model: nn.Module, family: VLMFamily, plan: StagePlan) -> None:
    every = [prefix for stage in range(plan.num_stages) for prefix in stage_prefixes(model, family, plan, stage)]
    unplaced = [name for name, _ in model.named_parameters() if not _owned(name, every)]
    if unplaced:
        raise ValueError(f"The pipeline does not know which stage holds these parameters: {unplaced[:5]}.")


def parameter_counts(model: nn.Module, family: VLMFamily) -> tuple[int, int, list[int]]:
    """Parameters only stage 0 holds, parameters only the last stage holds, and those of each decoder layer.

    A tied LM head counts on both ends: each holds its own copy.
    """

    def count(prefixes: list[str]) -> int:
        return sum(p.numel() for name, p in model.named_parameters(remove_duplicate=False) if _owned(name, prefixes))

    first, last = _end_modules(model, family)
    num_layers = model.config.text_config.num_hidden_layers
    layers = [count([f"{family.language_model}.layers.{index}"]) for index in range(num_layers)]
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


def make_plan(config: PretrainedConfig, num_stages: int, layers_per_stage: list[int] | None = None) -> StagePlan:
    """A plan for `num_stages` stages: `layers_per_stage` as given, or balanced by parameter count."""
    family = check_supported(config)
    num_layers = config.text_config.num_hidden_layers
    if layers_per_stage is not None:
        if len(layers_per_stage) != num_stages:
            raise ValueError(
                f"layers per stage {layers_per_stage} name {len(layers_per_stage)} stages, not {num_stages}."
            )
        return StagePlan.from_counts(layers_per_stage, num_layers)
    first, last, layers = parameter_counts(empty_model(config), family)
    return StagePlan.from_counts(balance_layers(first, last, layers, num_stages), num_layers)


def prune_to_stage(model: PreTrainedModel, plan: StagePlan, stage: int) -> PreTrainedModel:
    """Drops every module stage `stage` does not hold (in place); the kept ones keep their full names."""
    family = check_supported(model.config)
    if not 0 <= stage < plan.num_stages:
        raise ValueError(f"stage must be in [0, {plan.num_stages}), got {stage}.")
    if plan.num_layers != model.config.text_config.num_hidden_layers:
        raise ValueError(
            f"The plan covers {plan.num_layers} layers; the model has {model.config.text_config.num_hidden_layers}."
        )
    _check_prefixes_cover(model, family, plan)
    language_model = get_module(model, family.language_model)
    start, end = plan.layer_ranges[stage]
    language_model.layers = nn.ModuleDict({str(index): language_model.layers[index] for index in range(start, end)})
    kept = stage_prefixes(model, family, plan, stage)
    first, last = _end_modules(model, family)
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
    family = check_supported(model.config)
    prefixes = stage_prefixes(model, family, plan, stage)
    return {
        name: tensor.detach().contiguous().clone()
        for name, tensor in model.state_dict(keep_vars=False).items()
        if _owned(name, prefixes)
    }


def prepare(
    model_dir: str | Path, out_dir: str | Path, num_stages: int, layers_per_stage: list[int] | None = None
) -> StagePlan:
    """Writes `out_dir/stage-{s}.safetensors` (each stage's tensors only) and `pipeline_plan.json`, and copies every
    other file of the saved model (config, generation config, processor, code) from `model_dir`."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = load_config(model_dir)
    plan = make_plan(config, num_stages, layers_per_stage)
    model = model_class(config).from_pretrained(model_dir).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in model_dir.iterdir():
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(path, out_dir / path.name)
    for stage in range(plan.num_stages):
        save_file(stage_state_dict(model, plan, stage), out_dir / shard_name(stage), metadata={"format": "pt"})
    (out_dir / PLAN_FILE).write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
    return plan


def read_plan(prepared_dir: str | Path) -> StagePlan:
    path = Path(prepared_dir) / PLAN_FILE
    data = json.loads(path.read_text())
    return StagePlan(tuple(tuple(entry["layers"]) for entry in data["stages"]))


def is_prepared(model_dir: str | Path) -> bool:
    return (Path(model_dir) / PLAN_FILE).is_file()


def load_stage_model(
    model_dir: str | Path, stage: int, num_stages: int, layers_per_stage: list[int] | None = None
) -> tuple[PreTrainedModel, StagePlan]:
    """Stage `stage`'s part of the model: from its shard when `model_dir` was prepared (only the slice is read),
    otherwise from the full saved model, pruned."""
    config = load_config(model_dir)
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
        model = prune_to_stage(empty_model(config), plan, stage)
        state = load_file(Path(model_dir) / shard_name(stage))
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        if unexpected:
            raise ValueError(f"{shard_name(stage)} holds tensors stage {stage} does not own: {unexpected[:5]}.")
        _tie_kept_embeddings(model)
    else:
        plan = make_plan(config, num_stages, layers_per_stage)
        model = prune_to_stage(model_class(config).from_pretrained(model_dir).eval(), plan, stage)
    left_empty = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if left_empty:
        raise ValueError(f"Stage {stage}'s shard in {model_dir} lacks {left_empty[:5]}.")
    return model, plan


def _tie_kept_embeddings(model: PreTrainedModel) -> None:
    """A single-stage model holds both tied matrices: share one tensor again."""
    family = family_of(model.config)
    language_model = get_module(model, family.language_model)
    lm_head = getattr(model, family.lm_head, None)
    tied = getattr(model.config, "tie_word_embeddings", False)
    if tied and lm_head is not None and language_model.embed_tokens is not None:
        lm_head.weight = language_model.embed_tokens.weight


@dataclass
class SamplingSettings:
    """How the last stage picks a request's tokens: greedy at temperature 0, else seeded sampling."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")


class TokenSampler:
    """Picks the next token from logits (1, V): argmax, or transformers' temperature and top-p warpers, then a draw
    from this request's own seeded generator."""

    def __init__(self, settings: SamplingSettings):
        self.settings = settings
        self.generator = torch.Generator().manual_seed(settings.seed)
        warpers = []
        if settings.temperature > 0:
            warpers.append(TemperatureLogitsWarper(settings.temperature))
            if settings.top_p < 1:
                warpers.append(TopPLogitsWarper(settings.top_p))
        self.warpers = LogitsProcessorList(warpers)

    def __call__(self, logits: torch.Tensor) -> int:
        logits = logits.float().cpu()
        if self.settings.temperature == 0:
            return int(logits.argmax(dim=-1)[0])
        probabilities = torch.softmax(self.warpers(None, logits), dim=-1)
        return int(torch.multinomial(probabilities, 1, generator=self.generator)[0, 0])


class StageModel:
    """One stage's modules and the computation it runs for one request (batch of 1).

    `embed` (stage 0) turns the processor's outputs into embeddings (1, S, H) and M-RoPE positions (3, 1, S);
    `run_layers` runs the stage's decoder layers over a request's own cache, which holds only these layers;
    `next_token_logits` (last stage) normalises and applies the LM head at the last position: (1, V).
    """

    def __init__(self, model: PreTrainedModel, plan: StagePlan, stage: int):
        self.model = model
        self.plan = plan
        self.stage = stage
        self.family = check_supported(model.config)
        self.text_config = model.config.text_config
        self.language_model = get_module(model, self.family.language_model)
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
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def new_cache(self) -> DynamicCache:
        return DynamicCache()

    @torch.no_grad()
    def embed(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Prompt embeddings (1, S, H), positions (3, 1, S) and the M-RoPE offset of later tokens."""
        input_ids = inputs["input_ids"].to(self.device)
        embeddings = self.token_embeddings(input_ids, inputs)
        backbone = self.model.model
        pixel_values, grid = inputs.get("pixel_values"), inputs.get("image_grid_thw")
        if pixel_values is not None:
            features = backbone.get_image_features(
                pixel_values.to(self.device), grid.to(self.device), return_dict=True
            )
            image_embeddings = torch.cat(features.pooler_output, dim=0).to(embeddings.dtype)
            mask, _ = backbone.get_placeholder_mask(
                input_ids, inputs_embeds=embeddings, image_features=image_embeddings
            )
            embeddings = embeddings.masked_scatter(mask, image_embeddings)
        if grid is not None:
            if inputs.get("mm_token_type_ids") is None:
                raise ValueError("Images need mm_token_type_ids (the processor returns them) for M-RoPE.")
            positions, deltas = backbone.get_rope_index(
                input_ids,
                mm_token_type_ids=inputs["mm_token_type_ids"].to(self.device),
                image_grid_thw=grid.to(self.device),
                attention_mask=inputs.get("attention_mask"),
            )
            return embeddings, positions, int(deltas[0, 0])
        return embeddings, self.positions(0, input_ids.shape[1], 0), 0

    def token_embeddings(self, input_ids: torch.Tensor, driving_inputs: dict[str, Any]) -> torch.Tensor:
        """`embed_tokens`, then (Orion) the driving features at their placeholders: (1, S) → (1, S, H)."""
        embeddings = self.language_model.embed_tokens(input_ids)
        driving = getattr(self.model, "driving_embeddings", None)
        if driving is not None:
            features = {
                name: None if driving_inputs.get(name) is None else driving_inputs[name].to(self.device)
                for name in ("scene_queries", "history_queries", "can_bus")
            }
            embeddings = driving(input_ids, embeddings, **features)
        return embeddings

    def positions(self, start: int, length: int, rope_delta: int) -> torch.Tensor:
        """Text positions start..start+length, shifted by the prompt's M-RoPE offset, in all 3 rows: (3, 1, length)."""
        row = torch.arange(start, start + length, device=self.device) + rope_delta
        return row.view(1, 1, -1).expand(3, 1, -1)

    @torch.no_grad()
    def run_layers(self, hidden: torch.Tensor, positions: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        """The stage's decoder layers: hidden (1, S, H), positions (3, 1, S) → (1, S, H); `cache` grows by S."""
        mask = create_causal_mask(
            config=self.text_config, inputs_embeds=hidden, attention_mask=None, cache=cache, position_ids=None
        )
        position_embeddings = self.language_model.rotary_emb(hidden, positions)
        for layer in self.layers:
            hidden = layer(
                hidden, attention_mask=mask, position_embeddings=position_embeddings, cache=cache, use_cache=True
            )
        return hidden

    @torch.no_grad()
    def next_token_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head at the last position: (1, S, H) → (1, V)."""
        return self.model.lm_head(self.language_model.norm(hidden)[:, -1])
