"""Export of Qwen2-VL / Qwen2.5-VL and the Orion models on them to split ONNX graphs, with a JSON manifest.

Graphs (all with dynamic batch and sequence axes unless said otherwise):

- `vision` (onnx-vision's `vision.py`): pixel values of one fixed-size image → image embeddings.
- `embedding`: `input_ids` (B, S) → `inputs_embeds` (B, S, H), so that the host needs no PyTorch. For Orion it also
  puts the learned `<ego_wp>` embedding in place (an elementwise `Where`).
- `driving` (Orion): the projectors of scene queries (B, Ns, Ds), history queries (B, Nh, Dh) and the CAN bus
  (B, Dc) → their embeddings (B, Ns, H), (B, Nh, H), (B, 1, H). A graph of its own rather than part of the embedding
  graph: the host merges these rows at their placeholder tokens exactly as it merges image embeddings at
  `<|image_pad|>` (with the same count checks), no scatter runs inside a graph, and prompts without driving inputs
  need no dummy features.
- `decoder`: `inputs_embeds` (B, S, H), `attention_mask` (B, P + S), `position_ids` (3, B, S), past keys and values
  (B, kv_heads, P, head_dim) per layer → next-token `logits` (B, V) (float32), the present keys and values
  (B, kv_heads, P + S, head_dim) and, for Orion, the last `hidden_states` (B, S, H). A prefill is the call with P = 0.
- `trajectory` (Orion): the hidden state at `<ego_wp>` (B, H) (and the flow planner's `noise` (B, T, D)) →
  `trajectory_modes` (B, M, T, D) (float32).

Exported with the dynamo exporter (`torch.onnx.export(..., dynamo=True, dynamic_shapes=...)`): it exports the
decoder with transformers' own (vmap-free) mask and `DynamicCache` unchanged, and gives the PyTorch numbers to
within float rounding (about 1e-6 on the tiny models in fp32), so the legacy TorchScript exporter is not needed.
The decoder is traced with transformers' SDPA grouped-query switch on (`TRANSFORMERS_SDPA_FORCE_GQA`), so that
its ONNX `Attention` nodes read the (B, kv_heads, T, head_dim) keys and values as they are, instead of after a
`repeat_kv` Expand/Reshape per layer: the same numbers, about 10 % less decoder time per token on the CPU.
"""

import copy
import logging
import os
import time
from pathlib import Path
from typing import Any
from unittest import mock

import onnx
import torch
from torch import nn
from transformers import (
    DynamicCache,
    PreTrainedModel,
    ProcessorMixin,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
)

from .manifest import MROPE_RULE, write_manifest

logger = logging.getLogger(__name__)

OPSET = 23
# Graphs whose weights are larger than this keep them in an external data file beside the .onnx file.
EXTERNAL_DATA_THRESHOLD_BYTES = 2 * 1024**3
DTYPES = {"float32": torch.float32, "float16": torch.float16}
QWEN_CLASSES = (Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration)
# Example sizes for tracing: dynamic axes must not be 0 or 1 at export, and differ from each other.
EXAMPLE_BATCH, EXAMPLE_SEQUENCE, EXAMPLE_PAST = 2, 7, 5
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


class DecoderGraph(nn.Module):
    """The language model and its head over a flat list of past keys and values (see the module docstring)."""

    def __init__(self, model: PreTrainedModel, with_hidden_states: bool):
        super().__init__()
        self.language_model = model.model.language_model
        self.lm_head = model.lm_head
        self.num_layers = model.config.text_config.num_hidden_layers
        self.with_hidden_states = with_hidden_states

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past_key_values: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        cache = DynamicCache(
            ddp_cache_data=[(past_key_values[2 * i], past_key_values[2 * i + 1]) for i in range(self.num_layers)]
        )
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
        )
        hidden_states = outputs.last_hidden_state
        logits = self.lm_head(hidden_states[:, -1]).float()
        present = [tensor for layer in outputs.cache.layers for tensor in (layer.keys, layer.values)]
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


def past_names(num_layers: int, prefix: str = "past_key_values") -> list[str]:
    """`prefix.{layer}.key` and `prefix.{layer}.value` for every layer, in the decoder graph's order."""
    return [f"{prefix}.{layer}.{kind}" for layer in range(num_layers) for kind in ("key", "value")]


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


def _text_sizes(model: PreTrainedModel) -> dict[str, int]:
    text_config = model.config.text_config
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    return {
        "num_layers": text_config.num_hidden_layers,
        "num_key_value_heads": text_config.num_key_value_heads,
        "head_dim": head_dim,
        "hidden_size": text_config.hidden_size,
        "vocab_size": text_config.vocab_size,
        "max_sequence_length": text_config.max_position_embeddings,
    }


def _is_orion(model: PreTrainedModel) -> bool:
    return hasattr(model, "driving_embeddings") and hasattr(model, "trajectory_decoder")


def export_embedding(model: PreTrainedModel, out_dir: Path) -> dict[str, Any]:
    embed_tokens = model.get_input_embeddings()
    ego_token_id = getattr(model.config, "ego_token_id", None) if _is_orion(model) else None
    ego_embedding = model.driving_embeddings.ego_embedding.weight[0] if ego_token_id is not None else None
    input_ids = torch.randint(0, embed_tokens.num_embeddings, (EXAMPLE_BATCH, EXAMPLE_SEQUENCE), device=model.device)
    return export_graph(
        EmbeddingGraph(embed_tokens, ego_token_id, ego_embedding),
        (input_ids,),
        ({0: "batch", 1: "sequence"},),
        ["input_ids"],
        ["inputs_embeds"],
        out_dir / "embedding.onnx",
    )


def export_decoder(model: PreTrainedModel, out_dir: Path, with_hidden_states: bool) -> dict[str, Any]:
    sizes = _text_sizes(model)
    on_model = {"dtype": model.dtype, "device": model.device}
    batch, seq, past = EXAMPLE_BATCH, EXAMPLE_SEQUENCE, EXAMPLE_PAST
    inputs_embeds = torch.randn(batch, seq, sizes["hidden_size"], **on_model)
    attention_mask = torch.ones(batch, past + seq, dtype=torch.long, device=model.device)
    position_ids = torch.arange(past, past + seq, device=model.device).view(1, 1, -1).expand(3, batch, -1).contiguous()
    kv_shape = (batch, sizes["num_key_value_heads"], past, sizes["head_dim"])
    past_key_values = [torch.randn(kv_shape, **on_model) for _ in range(2 * sizes["num_layers"])]
    names = past_names(sizes["num_layers"])
    outputs = [
        "logits",
        *(["hidden_states"] if with_hidden_states else []),
        *past_names(sizes["num_layers"], "present"),
    ]
    with mock.patch.dict(os.environ, {FORCE_GQA_VARIABLE: "1"}):
        return export_graph(
            DecoderGraph(model, with_hidden_states),
            (inputs_embeds, attention_mask, position_ids, *past_key_values),
            (
                {0: "batch", 1: "sequence"},
                {0: "batch", 1: "total_sequence"},
                {1: "batch", 2: "sequence"},
                tuple([{0: "batch", 2: "past_sequence"}] * len(past_key_values)),
            ),
            ["inputs_embeds", "attention_mask", "position_ids", *names],
            outputs,
            out_dir / "decoder.onnx",
        )


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


def _token_ids(model: PreTrainedModel, processor: ProcessorMixin | None) -> dict[str, Any]:
    config = model.config
    generation_config = model.generation_config
    eos = generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    pad = generation_config.pad_token_id
    if pad is None and processor is not None:
        pad = processor.tokenizer.pad_token_id
    token_ids = {
        "image": config.image_token_id,
        "video": config.video_token_id,
        "vision_start": config.vision_start_token_id,
        "eos": eos,
        "pad": pad if pad is not None else (eos[0] if eos else None),
    }
    if _is_orion(model):
        token_ids.update(
            {kind: getattr(config, f"{kind}_token_id") for kind in ("scene", "history", "can_bus", "ego")}
        )
    return token_ids


def _export_classifier(
    model: PreTrainedModel, processor: ProcessorMixin, out_dir: Path, image_size: tuple[int, int], dtype: str
) -> Path:
    from .classifier import export_classifier_graph

    entry = export_classifier_graph(model, processor, out_dir, image_size, dtype)
    processor.save_pretrained(out_dir / "processor")
    return write_manifest(
        out_dir,
        {
            "kind": "classifier",
            "architecture": type(model).__name__,
            "model_type": model.config.model_type,
            "dtype": dtype,
            "graphs": {"classifier": entry},
        },
    )


def export_onnx(
    model: PreTrainedModel,
    processor: ProcessorMixin | None,
    out_dir: str | Path,
    image_size: tuple[int, int] = (672, 672),
    dtype: str = "float32",
    include_vision: bool = True,
) -> Path:
    """Exports `model` to ONNX graphs in `out_dir` and writes `manifest.json`; returns the manifest's path.

    `model`: a Qwen2-VL / Qwen2.5-VL model, an Orion model on either, or a `ReceiptVLClassifier`. `image_size`
    (H, W): the one resolution the vision graph takes. `dtype`: "float32" or "float16" (the weights and
    activations; logits and waypoints come out as float32). `include_vision=False` leaves out the vision graph
    (text-only deployments, or image embeddings computed elsewhere). The processor, when given, is saved beside
    the graphs.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from vlmheads.modeling.modeling_receipt_vl import ReceiptVLClassifier

    if isinstance(model, ReceiptVLClassifier):
        return _export_classifier(model, processor, out_dir, image_size, dtype)
    if not isinstance(model, QWEN_CLASSES):
        raise ValueError(
            "export_onnx takes Qwen2-VL / Qwen2.5-VL models (and the Orion models on them) or a ReceiptVLClassifier, "
            f"got {type(model).__name__}."
        )
    export_model = model if model.dtype == DTYPES[dtype] else copy.deepcopy(model).to(DTYPES[dtype])
    export_model.eval()
    orion = _is_orion(export_model)
    graphs = {}
    if include_vision:
        from .vision import export_vision_graph

        logger.info("Exporting the vision graph for %d x %d images...", *image_size)
        graphs["vision"] = export_vision_graph(export_model, out_dir / "vision.onnx", tuple(image_size), dtype)
    graphs["embedding"] = export_embedding(export_model, out_dir)
    graphs["decoder"] = export_decoder(export_model, out_dir, with_hidden_states=orion)
    manifest = {
        "kind": "orion" if orion else "vlm",
        "architecture": type(model).__name__,
        "model_type": model.config.model_type,
        "dtype": dtype,
        "graphs": graphs,
        "token_ids": _token_ids(model, processor),
        "decoder": _text_sizes(export_model),
        "mrope": {
            "rule": MROPE_RULE,
            "spatial_merge_size": model.config.vision_config.spatial_merge_size,
            "mrope_section": model.config.text_config.rope_parameters.get("mrope_section"),
        },
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
