"""Export of the VLM families the family table marks `onnx_exportable` (Qwen2-VL, Qwen2.5-VL, SmolVLM), the Orion
models on Qwen, and image classifiers, to split ONNX graphs with a JSON manifest.

What is exported follows the model's declared capabilities, never its class name: the family table entry
(`backbone_family_of`: `onnx_exportable`, `positions` (M-RoPE or 1-D), `image_inputs`, module paths) and the head
(`head_kind_of`: generation, trajectory, classification).

Graphs (all with dynamic batch and sequence axes unless said otherwise):

- `vision`: image embeddings. Qwen (`vision.py`): pixel values of one fixed-size image. Families whose processor
  gives whole images or tiles (SmolVLM, `image_graph.py`): any number of them, (N, 3, S, S) → (N * tokens, H).
- `embedding`: `input_ids` (B, S) → `inputs_embeds` (B, S, H), so that the host needs no PyTorch. For Orion it also
  puts the learned `<ego_wp>` embedding in place (an elementwise `Where`).
- `driving` (Orion): the projectors of scene queries (B, Ns, Ds), history queries (B, Nh, Dh) and the CAN bus
  (B, Dc) → their embeddings (B, Ns, H), (B, Nh, H), (B, 1, H). A graph of its own rather than part of the embedding
  graph: the host merges these rows at their placeholder tokens exactly as it merges image embeddings at
  `<|image_pad|>` (with the same count checks), no scatter runs inside a graph, and prompts without driving inputs
  need no dummy features.
- `decoder`: `inputs_embeds` (B, S, H), `attention_mask` (B, T) over the whole key/value buffer, `position_ids`
  (3, B, S) for M-RoPE families or (B, S) for 1-D ones, `past_sequence_length` (0-d int64: P, the positions already
  filled) and one key and one value buffer (B, kv_heads, T, head_dim) per layer (`past_key_values.{i}.key|value`)
  → next-token `logits` (B, V) (float32, the last position only), the buffers with the S new keys and values
  written at P … P + S - 1 (`present.{i}.key|value`) and, for Orion, the last `hidden_states` (B, S, H). The
  traced graph is rewritten into the layout of ONNX Runtime GenAI's model builder (`fusion.py`: packed
  projections, skip RMS normalization, `RotaryEmbedding`, and each layer's attention as `GroupQueryAttention` over
  the buffers; a decoder whose rotary embedding does not match keeps ONNX `Attention` after one ScatterND per
  buffer). Either way a host that binds one preallocated buffer as both past and present (`OnnxVLM`, through ONNX
  Runtime IO binding) has it written in place: no per-token concatenation or copy of the cache. A prefill is the
  call with P = 0; T is the capacity the host chose.
- `trajectory` (Orion): the hidden state at `<ego_wp>` (B, H) (and the flow planner's `noise` (B, T, D)) →
  `trajectory_modes` (B, M, T, D) (float32).
- classifiers with `pooling="vision"`: `classifier` (Mllama, the receipt classifier: pixels → logits in one graph,
  `classifier.py`), or the `vision` graph and `classifier_head`: the mean image feature (B, H) → logits (B, C).

Every export is written into a scratch folder that replaces `out_dir` only once it is complete
(`manifest.staged_export`).

Exported with the dynamo exporter (`torch.onnx.export(..., dynamo=True, dynamic_shapes=...)`): it exports the
decoder with transformers' own (vmap-free) mask and a `StaticLayer` cache over the buffers, and gives the PyTorch
numbers to within float rounding (about 1e-6 on the tiny models in fp32), so the legacy TorchScript exporter is
not needed.
The decoder is traced with transformers' SDPA grouped-query switch on (`TRANSFORMERS_SDPA_FORCE_GQA`), so that
its ONNX `Attention` nodes read the (B, kv_heads, T, head_dim) keys and values as they are, instead of after a
`repeat_kv` Expand/Reshape per layer: the same numbers, about 10 % less decoder time per token on the CPU.
"""

import copy
import functools
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import onnx
import torch
from torch import nn
from transformers import PreTrainedModel, ProcessorMixin
from transformers.cache_utils import Cache, StaticLayer

from ..configuration.constants import HEAD_CLASSIFICATION, HEAD_GENERATION, HEAD_TRAJECTORY
from ..modeling.capabilities import backbone_family_of, head_kind_of
from ..modeling.families import CROSS_ATTENTION, POSITIONS_MROPE, VLM_FAMILIES, VLMFamily, get_module
from .fusion import fuse_decoder
from .manifest import MANIFEST_NAME, MROPE_RULE, staged_export, write_manifest
from .runtime import (
    ATTENTION_MASK_INPUT,
    HIDDEN_STATES_OUTPUT,
    INPUTS_EMBEDS_INPUT,
    LOGITS_OUTPUT,
    PAST_LENGTH_INPUT,
    PAST_PREFIX,
    PRESENT_PREFIX,
)

logger = logging.getLogger(__name__)

OPSET = 23
# Graphs whose weights are larger than this keep them in an external data file beside the .onnx file.
EXTERNAL_DATA_THRESHOLD_BYTES = 2 * 1024**3
DTYPES = {"float32": torch.float32, "float16": torch.float16}
# Example sizes for tracing: dynamic axes must not be 0 or 1 at export, and differ from each other.
EXAMPLE_BATCH, EXAMPLE_SEQUENCE, EXAMPLE_PAST, EXAMPLE_CAPACITY = 2, 7, 5, 15
# Read by `transformers.integrations.sdpa_attention.use_gqa_in_sdpa`.
FORCE_GQA_VARIABLE = "TRANSFORMERS_SDPA_FORCE_GQA"


class EmbeddingGraph(nn.Module):
    """`input_ids` (B, S) → `inputs_embeds` (B, S, H); with an `<ego_wp>` id, its learned embedding in place."""

    def __init__(self, embed_tokens: nn.Embedding, ego_token_id: int | None, ego_embedding: torch.Tensor | None):
        super().__init__()
        self.embed_tokens = embed_tokens
        self.ego_token_id = ego_token_id
        self.ego_embedding = None if ego_embedding is None else nn.Parameter(ego_embedding.detach().clone())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        inputs_embeds = self.embed_tokens(input_ids)
        if self.ego_embedding is None:
            return inputs_embeds
        ego_mask = (input_ids == self.ego_token_id).unsqueeze(-1)
        return torch.where(ego_mask, self.ego_embedding.to(inputs_embeds.dtype), inputs_embeds)


class DrivingGraph(nn.Module):
    """Orion's projectors: float32 scene (B, Ns, Ds), history (B, Nh, Dh), CAN bus (B, Dc) → (B, N, H) each."""

    def __init__(self, driving_embeddings: nn.Module):
        super().__init__()
        self.driving_embeddings = driving_embeddings

    def forward(
        self, scene_queries: torch.Tensor, history_queries: torch.Tensor, can_bus: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        embeddings = self.driving_embeddings
        dtype = embeddings.scene_projector.weight.dtype
        return (
            embeddings.scene_projector(scene_queries.to(dtype)),
            embeddings.history_projector(history_queries.to(dtype)),
            embeddings.can_bus_projector(can_bus.unsqueeze(1).to(dtype)),
        )


class BufferLayer(StaticLayer):
    """A transformers `StaticLayer` over key/value buffers that are graph inputs, (B, kv_heads, T, head_dim) each,
    whose first `past_length` positions hold the past; a call writes its S new keys and values at `past_length` …
    `past_length + S - 1`."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, past_length: torch.Tensor):
        super().__init__(max_cache_len=keys.shape[2])
        self.keys, self.values, self.cumulative_length = keys, values, past_length
        self.device = keys.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # Out of place, on the leading (batch, head, position) axes (StaticLayer writes in place along axis 2): the
        # graph then holds one ScatterND per buffer that reads the past input and is the present output, which ONNX
        # Runtime runs in place when the host binds one buffer to both.
        batch, heads, length = key_states.shape[:3]
        positions = torch.arange(length, device=key_states.device) + self.cumulative_length
        index = (
            torch.arange(batch, device=key_states.device).view(-1, 1, 1),
            torch.arange(heads, device=key_states.device).view(1, -1, 1),
            positions.view(1, 1, -1),
        )
        self.keys = self.keys.index_put(index, key_states)
        self.values = self.values.index_put(index, value_states)
        return self.keys, self.values


class DecoderGraph(nn.Module):
    """The language model and its head over preallocated key/value buffers (see the module docstring); the head
    runs on the last position only: logits (B, V) float32."""

    def __init__(self, model: PreTrainedModel, family: VLMFamily, with_hidden_states: bool):
        super().__init__()
        self.language_model = get_module(model, family.language_model)
        self.lm_head = get_module(model, family.lm_head)
        self.num_layers = model.config.get_text_config().num_hidden_layers
        self.with_hidden_states = with_hidden_states

    def hidden_states(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache: Cache
    ) -> torch.Tensor:
        """The language model's last hidden states (B, S, H); `cache` takes the new keys and values."""
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
        ).last_hidden_state

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past_sequence_length: torch.Tensor,
        *key_value_buffers: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        cache = Cache(
            layers=[
                BufferLayer(key_value_buffers[2 * i], key_value_buffers[2 * i + 1], past_sequence_length)
                for i in range(self.num_layers)
            ]
        )
        hidden_states = self.hidden_states(inputs_embeds, attention_mask, position_ids, cache)
        # (B, 1, H) @ (H, V): a MatMul, which the weight quantizers take (a 2-D input would export as Gemm).
        logits = self.lm_head(hidden_states[:, -1:]).float()[:, 0]
        present = [tensor for layer in cache.layers for tensor in (layer.keys, layer.values)]
        return (logits, hidden_states, *present) if self.with_hidden_states else (logits, *present)


class TrajectoryGraph(nn.Module):
    """The trajectory decoder: ego features (B, H) (and, for the flow planner, noise (B, T, D)) → (B, M, T, D)."""

    def __init__(self, trajectory_decoder: nn.Module):
        super().__init__()
        self.trajectory_decoder = trajectory_decoder

    def forward(self, ego_features: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        if noise is None:
            return self.trajectory_decoder(ego_features).float()
        return self.trajectory_decoder(ego_features, noise.to(ego_features.dtype)).float()


def past_names(num_layers: int, prefix: str = PAST_PREFIX) -> list[str]:
    """`{prefix}{layer}.key` and `{prefix}{layer}.value` for every layer, in the decoder graph's order."""
    return [f"{prefix}{layer}.{kind}" for layer in range(num_layers) for kind in ("key", "value")]


def _value_info(value: onnx.ValueInfoProto) -> dict[str, Any]:
    tensor_type = value.type.tensor_type
    shape = [dim.dim_param or dim.dim_value for dim in tensor_type.shape.dim]
    return {
        "name": value.name,
        "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name,
        "shape": shape,
    }


def graph_entry(path: Path) -> dict[str, Any]:
    """The manifest entry of a saved graph: its file, external data files, inputs and outputs with dtypes/shapes."""
    graph = onnx.load(str(path), load_external_data=False)
    external = sorted(
        {
            entry.value
            for initializer in graph.graph.initializer
            for entry in initializer.external_data
            if entry.key == "location"
        }
    )
    return {
        "file": path.name,
        "external_data": external,
        "inputs": [_value_info(value) for value in graph.graph.input],
        "outputs": [_value_info(value) for value in graph.graph.output],
    }


def export_graph(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    dynamic_shapes: tuple[Any, ...],
    input_names: list[str],
    output_names: list[str],
    path: Path,
) -> dict[str, Any]:
    """Exports `module` on example `args` with the dynamo exporter to `path`; returns its manifest entry."""
    weight_bytes = sum(tensor.numel() * tensor.element_size() for tensor in module.state_dict().values())
    logger.info("Exporting the %s graph (%.1f MB of weights)...", path.stem, weight_bytes / 1e6)
    start = time.perf_counter()
    with torch.no_grad():
        program = torch.onnx.export(
            module.eval(),
            args,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            input_names=input_names,
            output_names=output_names,
            opset_version=OPSET,
            optimize=True,
            verbose=False,
        )
    program.save(str(path), external_data=weight_bytes > EXTERNAL_DATA_THRESHOLD_BYTES)
    logger.info("Wrote %s in %.1f s.", path, time.perf_counter() - start)
    return graph_entry(path)


def rewrite_graph(path: Path, rewrite: Callable[[onnx.ModelProto], dict[str, int]]) -> dict[str, int]:
    """Loads the graph at `path`, applies `rewrite` to it in place and saves it back (its weights in one external
    data file when they were external); returns what `rewrite` returns."""
    model = onnx.load(str(path))
    external = any(
        tensor.data_location == onnx.TensorProto.EXTERNAL
        for tensor in onnx.load(str(path), load_external_data=False).graph.initializer
    )
    counts = rewrite(model)
    for stale in path.parent.glob(f"{path.name}*.data"):
        stale.unlink()
    onnx.save_model(
        model, str(path), save_as_external_data=external, all_tensors_to_one_file=True, location=f"{path.name}.data"
    )
    logger.info("Rewrote %s: %s", path, counts)
    return counts


def text_sizes(model: PreTrainedModel) -> dict[str, int]:
    """The decoder's sizes the host needs: layers, key/value heads, head and hidden size, vocabulary, context."""
    text_config = model.config.get_text_config()
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    return {
        "num_layers": text_config.num_hidden_layers,
        "num_key_value_heads": text_config.num_key_value_heads,
        "head_dim": head_dim,
        "hidden_size": text_config.hidden_size,
        "vocab_size": text_config.vocab_size,
        "max_sequence_length": text_config.max_position_embeddings,
    }


def exportable_family(model: PreTrainedModel) -> VLMFamily:
    """The family-table entry of `model`'s backbone, or a `ValueError` when the table does not mark it
    `onnx_exportable`."""
    family = backbone_family_of(model)
    if not family.onnx_exportable:
        exportable = sorted(entry.name for entry in VLM_FAMILIES.values() if entry.onnx_exportable)
        raise ValueError(
            f"{type(model).__name__} runs on the {family.name!r} family, which the family table does not mark "
            f"onnx_exportable; ONNX export runs on {exportable} (and receipt-style classifiers on Mllama)."
        )
    return family


def _is_orion(model: PreTrainedModel, family: VLMFamily) -> bool:
    """A trajectory head that is the family's own model class (Orion: Qwen2-VL plus driving inputs and a planner),
    as opposed to a wrapper head around a backbone."""
    return head_kind_of(model) == HEAD_TRAJECTORY and isinstance(model, family.model_cls)


def export_embedding(model: PreTrainedModel, out_dir: Path, orion: bool) -> dict[str, Any]:
    embed_tokens = model.get_input_embeddings()
    ego_token_id = model.config.ego_token_id if orion else None
    ego_embedding = model.driving_embeddings.ego_embedding.weight[0] if orion else None
    input_ids = torch.randint(0, embed_tokens.num_embeddings, (EXAMPLE_BATCH, EXAMPLE_SEQUENCE), device=model.device)
    return export_graph(
        EmbeddingGraph(embed_tokens, ego_token_id, ego_embedding),
        (input_ids,),
        ({0: "batch", 1: "sequence"},),
        ["input_ids"],
        ["inputs_embeds"],
        out_dir / "embedding.onnx",
    )


def export_decoder(
    model: PreTrainedModel, family: VLMFamily, out_dir: Path, with_hidden_states: bool
) -> dict[str, Any]:
    """The decoder graph over key/value buffers; its `position_ids` are (3, B, S) for M-RoPE families and (B, S)
    for the others."""
    sizes = text_sizes(model)
    on_model = {"dtype": model.dtype, "device": model.device}
    batch, seq, past, total = EXAMPLE_BATCH, EXAMPLE_SEQUENCE, EXAMPLE_PAST, EXAMPLE_CAPACITY
    inputs_embeds = torch.randn(batch, seq, sizes["hidden_size"], **on_model)
    attention_mask = torch.zeros(batch, total, dtype=torch.long, device=model.device)
    attention_mask[:, : past + seq] = 1
    position_ids = torch.arange(past, past + seq, device=model.device).view(1, -1).expand(batch, -1)
    position_axes = {0: "batch", 1: "sequence"}
    if family.positions == POSITIONS_MROPE:
        position_ids = position_ids[None].expand(3, -1, -1)
        position_axes = {1: "batch", 2: "sequence"}
    kv_shape = (batch, sizes["num_key_value_heads"], total, sizes["head_dim"])
    buffers = [torch.randn(kv_shape, **on_model) for _ in range(2 * sizes["num_layers"])]
    outputs = [
        LOGITS_OUTPUT,
        *([HIDDEN_STATES_OUTPUT] if with_hidden_states else []),
        *past_names(sizes["num_layers"], PRESENT_PREFIX),
    ]
    with mock.patch.dict(os.environ, {FORCE_GQA_VARIABLE: "1"}):
        export_graph(
            DecoderGraph(model, family, with_hidden_states),
            (inputs_embeds, attention_mask, position_ids.contiguous(), torch.tensor(past), *buffers),
            (
                {0: "batch", 1: "sequence"},
                {0: "batch", 1: "capacity"},
                position_axes,
                None,
                tuple([{0: "batch", 2: "capacity"}] * len(buffers)),
            ),
            [
                INPUTS_EMBEDS_INPUT,
                ATTENTION_MASK_INPUT,
                "position_ids",
                PAST_LENGTH_INPUT,
                *past_names(sizes["num_layers"]),
            ],
            outputs,
            out_dir / "decoder.onnx",
        )
    fusions = rewrite_graph(
        out_dir / "decoder.onnx",
        functools.partial(
            fuse_decoder,
            attention_mask=ATTENTION_MASK_INPUT,
            past_sequence_length=PAST_LENGTH_INPUT,
            inputs_embeds=INPUTS_EMBEDS_INPUT,
        ),
    )
    return {**graph_entry(out_dir / "decoder.onnx"), "fusions": fusions}


def export_driving(model: PreTrainedModel, out_dir: Path) -> dict[str, Any]:
    config = model.config
    return export_graph(
        DrivingGraph(model.driving_embeddings),
        (
            torch.randn(EXAMPLE_BATCH, config.num_scene_queries + 2, config.scene_query_dim, device=model.device),
            torch.randn(EXAMPLE_BATCH, config.num_history_queries + 3, config.history_query_dim, device=model.device),
            torch.randn(EXAMPLE_BATCH, config.can_bus_dim, device=model.device),
        ),
        ({0: "batch", 1: "num_scene_queries"}, {0: "batch", 1: "num_history_queries"}, {0: "batch"}),
        ["scene_queries", "history_queries", "can_bus"],
        ["scene_embeds", "history_embeds", "can_bus_embeds"],
        out_dir / "driving.onnx",
    )


def export_trajectory(model: PreTrainedModel, out_dir: Path) -> dict[str, Any]:
    config = model.config
    args = [torch.randn(EXAMPLE_BATCH, config.text_config.hidden_size, dtype=model.dtype, device=model.device)]
    dynamic_shapes = [{0: "batch"}]
    names = ["ego_features"]
    if config.trajectory_head == "flow":
        args.append(torch.randn(EXAMPLE_BATCH, config.num_waypoints, config.waypoint_dim, device=model.device))
        dynamic_shapes.append({0: "batch"})
        names.append("noise")
    return export_graph(
        TrajectoryGraph(model.trajectory_decoder),
        tuple(args),
        tuple(dynamic_shapes),
        names,
        ["trajectory_modes"],
        out_dir / "trajectory.onnx",
    )


def special_token_ids(model: PreTrainedModel, processor: ProcessorMixin | None, orion: bool) -> dict[str, Any]:
    """The token ids the host needs: image, stop (`eos`), padding, Qwen's video and vision markers, Orion's
    placeholders."""
    from ..modeling.modeling_vlm_heads import image_token_id

    config = model.config
    generation_config = model.generation_config
    eos = generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    pad = generation_config.pad_token_id
    if pad is None and processor is not None:
        pad = processor.tokenizer.pad_token_id
    token_ids = {
        "image": image_token_id(config),
        "eos": eos,
        "pad": pad if pad is not None else (eos[0] if eos else None),
    }
    # Qwen's video and vision-start tokens, where the family has them (ONNX Runtime GenAI's config names them).
    for kind in ("video", "vision_start", "vision_end"):
        token_id = getattr(config, f"{kind}_token_id", None)
        if token_id is not None:
            token_ids[kind] = token_id
    if orion:
        token_ids.update(
            {kind: getattr(config, f"{kind}_token_id") for kind in ("scene", "history", "can_bus", "ego")}
        )
    return token_ids


def _export_classifier(
    model: PreTrainedModel, processor: ProcessorMixin, out_dir: Path, image_size: tuple[int, int], dtype: str
) -> Path:
    """A `pooling="vision"` classifier: Mllama's in one graph (`classifier.py`), any other exportable family's as
    its vision graph and a head graph (`image_graph.py`)."""
    if model.config.pooling != "vision":
        raise ValueError(
            f'Only pooling="vision" classifiers export (pixels → logits); this model has '
            f"pooling={model.config.pooling!r}, whose head reads the text decoder."
        )
    family = backbone_family_of(model)
    if family.architecture == CROSS_ATTENTION:
        from .classifier import export_classifier_graph

        graphs = {"classifier": export_classifier_graph(model, processor, out_dir, image_size, dtype)}
    else:
        from .image_graph import export_classifier_head_graph, export_image_features_graph

        exportable_family(model)
        graphs = {
            "vision": export_image_features_graph(model, family, processor, out_dir / "vision.onnx", dtype),
            "classifier_head": export_classifier_head_graph(model, out_dir / "classifier_head.onnx", dtype),
        }
    processor.save_pretrained(out_dir / "processor")
    return write_manifest(
        out_dir,
        {
            "kind": "classifier",
            "architecture": type(model).__name__,
            "model_type": model.config.model_type,
            "family": family.name,
            "head_kind": HEAD_CLASSIFICATION,
            "dtype": dtype,
            "graphs": graphs,
        },
    )


def _export_generation(
    model: PreTrainedModel,
    processor: ProcessorMixin | None,
    out_dir: Path,
    image_size: tuple[int, int],
    dtype: str,
    include_vision: bool,
) -> Path:
    family = exportable_family(model)
    export_model = model if model.dtype == DTYPES[dtype] else copy.deepcopy(model).to(DTYPES[dtype])
    export_model.eval()
    orion = _is_orion(export_model, family)
    graphs = {}
    if include_vision:
        if family.positions == POSITIONS_MROPE:
            from .vision import export_vision_graph

            # The Qwen image processors keep max_pixels as size["longest_edge"].
            max_pixels = None if processor is None else processor.image_processor.size["longest_edge"]
            logger.info("Exporting the vision graph (traced on a %d x %d image)...", *image_size)
            graphs["vision"] = export_vision_graph(
                export_model, out_dir / "vision.onnx", tuple(image_size), dtype, max_pixels
            )
        else:
            from .image_graph import export_image_features_graph

            if processor is None:
                raise ValueError(f"Exporting a {family.name} vision graph needs the processor (its image sizes).")
            graphs["vision"] = export_image_features_graph(
                export_model, family, processor, out_dir / "vision.onnx", dtype
            )
    graphs["embedding"] = export_embedding(export_model, out_dir, orion)
    graphs["decoder"] = export_decoder(export_model, family, out_dir, with_hidden_states=orion)
    manifest = {
        "kind": "orion" if orion else "vlm",
        "architecture": type(model).__name__,
        "model_type": model.config.model_type,
        "family": family.name,
        "head_kind": head_kind_of(model),
        "dtype": dtype,
        "graphs": graphs,
        "token_ids": special_token_ids(model, processor, orion),
        "decoder": text_sizes(export_model),
        "positions": family.positions,
    }
    if family.positions == POSITIONS_MROPE:
        manifest["mrope"] = {
            "rule": MROPE_RULE,
            "spatial_merge_size": model.config.vision_config.spatial_merge_size,
            "mrope_section": model.config.text_config.rope_parameters.get("mrope_section"),
        }
    if orion:
        config = model.config
        graphs["driving"] = export_driving(export_model, out_dir)
        graphs["trajectory"] = export_trajectory(export_model, out_dir)
        manifest["trajectory"] = {
            "head": config.trajectory_head,
            "num_modes": config.num_modes,
            "num_waypoints": config.num_waypoints,
            "waypoint_dim": config.waypoint_dim,
        }
    if processor is not None:
        processor.save_pretrained(out_dir / "processor")
    return write_manifest(out_dir, manifest)


def export_onnx(
    model: PreTrainedModel,
    processor: ProcessorMixin | None,
    out_dir: str | Path,
    image_size: tuple[int, int] = (672, 672),
    dtype: str = "float32",
    include_vision: bool = True,
) -> Path:
    """Exports `model` to ONNX graphs in `out_dir` and writes `manifest.json`; returns the manifest's path.

    `model`: a backbone of a family the table marks `onnx_exportable` (Qwen2-VL, Qwen2.5-VL, SmolVLM), an Orion
    model, or an image classifier with `pooling="vision"` (`ReceiptVLClassifier`, `VLMForImageClassification`).
    `image_size` (H, W): the example image Qwen's vision graph is traced on (it then takes any size up to the
    processor's `max_pixels`). `dtype`: "float32" or "float16" (the weights and activations; logits and waypoints come
    out as float32). `include_vision=False` leaves out the vision graph (text-only deployments, or image
    embeddings computed elsewhere). The processor, when given, is saved beside the graphs.

    `out_dir` must be missing, empty or an earlier export, which is replaced only once the new one is complete: a
    failed export leaves nothing behind.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
    if not isinstance(model, PreTrainedModel):
        raise ValueError(
            f"export_onnx takes a transformers PreTrainedModel (a VLM or a vlmheads head model), got "
            f"{type(model).__name__}."
        )
    head_kind = head_kind_of(model)
    with staged_export(Path(out_dir)) as staging:
        if head_kind == HEAD_CLASSIFICATION:
            if processor is None:
                raise ValueError("Exporting a classifier needs its processor (the graphs are traced on its output).")
            _export_classifier(model, processor, staging, image_size, dtype)
        elif head_kind in (HEAD_GENERATION, HEAD_TRAJECTORY):
            if head_kind == HEAD_TRAJECTORY and not _is_orion(model, exportable_family(model)):
                raise ValueError(
                    f"{type(model).__name__} is a trajectory head around a backbone; ONNX export runs the Orion "
                    "models, whose planner sits on the Qwen model class."
                )
            _export_generation(model, processor, staging, image_size, dtype, include_vision)
        else:
            raise ValueError(
                f"{type(model).__name__} has a {head_kind!r} head; ONNX export runs text generation, Orion "
                "trajectories and pooling='vision' classifiers."
            )
    return Path(out_dir) / MANIFEST_NAME
