"""An ONNX Runtime GenAI folder for a Qwen2-VL / Qwen2.5-VL model: the graphs and `genai_config.json` that GenAI's
`qwen2_5_vl` multimodal pipeline loads (vision → embedding → decoder), and the tokenizer.

GenAI drives its own decode loop, so its decoder keeps GenAI's contract (`past_present_share_buffer: false`):
`inputs_embeds` (B, S, H), `attention_mask` (B, P + S), `position_ids` (3, B, S) and `past_key_values.{i}.key|value`
(B, kv_heads, P, head_dim) → `logits` (B, S, V) and `present.{i}.key|value` (B, kv_heads, P + S, head_dim). Its
embedding graph merges the image features itself: `input_ids` (B, S) and `image_features` (N, H) → `inputs_embeds`.
The vision graph is `vision.export_vision_graph`'s; GenAI's own image processor does not compute its grid inputs,
so GenAI runs this folder's text path, and `OnnxVLM` its images.
"""

import json
import os
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel, ProcessorMixin

from ..modeling.families import POSITIONS_MROPE, VLMFamily
from .export import (
    FORCE_GQA_VARIABLE,
    DecoderGraph,
    export_graph,
    exportable_family,
    past_names,
    special_token_ids,
    text_sizes,
)
from .manifest import staged_export
from .runtime import PAST_PREFIX, PRESENT_PREFIX
from .vision import VISION_OUTPUT, export_vision_graph

GENAI_CONFIG = "genai_config.json"
GENAI_DECODER, GENAI_EMBEDDING, GENAI_VISION = "model.onnx", "embedding.onnx", "vision.onnx"
# GenAI's model type of the Qwen multimodal pipeline (3-D M-RoPE positions), for Qwen2-VL and Qwen2.5-VL alike.
GENAI_MODEL_TYPE = "qwen2_5_vl"


class GenAIDecoderGraph(DecoderGraph):
    """`DecoderGraph` over a concatenated key/value cache (GenAI's contract), logits for every position (B, S, V)."""

    def __init__(self, model: PreTrainedModel, family: VLMFamily):
        super().__init__(model, family, with_hidden_states=False)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past_key_values: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        pairs = [(past_key_values[2 * i], past_key_values[2 * i + 1]) for i in range(self.num_layers)]
        cache = DynamicCache(ddp_cache_data=pairs)
        logits = self.lm_head(self.hidden_states(inputs_embeds, attention_mask, position_ids, cache)).float()
        return (logits, *[tensor for layer in cache.layers for tensor in (layer.keys, layer.values)])


class GenAIEmbeddingGraph(nn.Module):
    """`input_ids` (B, S) and `image_features` (N, H) → `inputs_embeds` (B, S, H), the N image tokens replaced by the
    features in order (the model's `masked_scatter`)."""

    def __init__(self, embed_tokens: nn.Embedding, image_token_id: int):
        super().__init__()
        self.embed_tokens = embed_tokens
        self.image_token_id = image_token_id

    def forward(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        inputs_embeds = self.embed_tokens(input_ids)
        mask = (input_ids == self.image_token_id).unsqueeze(-1).expand_as(inputs_embeds)
        return inputs_embeds.masked_scatter(mask, image_features.to(inputs_embeds.dtype))


def _session_options() -> dict[str, Any]:
    return {"log_id": "onnxruntime-genai", "provider_options": []}


def genai_config(model: PreTrainedModel, processor: ProcessorMixin | None, vision: bool) -> dict[str, Any]:
    """The `genai_config.json` content for `model`'s GenAI folder."""
    sizes = text_sizes(model)
    token_ids = special_token_ids(model, processor, orion=False)
    layers = sizes["num_layers"]
    context = sizes["max_sequence_length"]
    config = {
        "model": {
            "type": GENAI_MODEL_TYPE,
            "vocab_size": sizes["vocab_size"],
            "context_length": context,
            "bos_token_id": token_ids["pad"],
            "eos_token_id": token_ids["eos"] or [token_ids["pad"]],
            "pad_token_id": token_ids["pad"],
            "image_token_id": token_ids["image"],
            "video_token_id": token_ids.get("video"),
            "vision_start_token_id": token_ids.get("vision_start"),
            "decoder": {
                "session_options": _session_options(),
                "filename": GENAI_DECODER,
                "head_size": sizes["head_dim"],
                "hidden_size": sizes["hidden_size"],
                "num_attention_heads": model.config.get_text_config().num_attention_heads,
                "num_hidden_layers": layers,
                "num_key_value_heads": sizes["num_key_value_heads"],
                "inputs": {
                    "inputs_embeds": "inputs_embeds",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": f"{PAST_PREFIX}%d.key",
                    "past_value_names": f"{PAST_PREFIX}%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": f"{PRESENT_PREFIX}%d.key",
                    "present_value_names": f"{PRESENT_PREFIX}%d.value",
                },
            },
            "embedding": {
                "session_options": _session_options(),
                "filename": GENAI_EMBEDDING,
                "inputs": {"input_ids": "input_ids", "image_features": "image_features"},
                "outputs": {"inputs_embeds": "inputs_embeds"},
            },
            "vision": {
                "session_options": _session_options(),
                "filename": GENAI_VISION if vision else "",
                "spatial_merge_size": model.config.vision_config.spatial_merge_size,
                "inputs": {"pixel_values": "pixel_values", "image_grid_thw": "image_grid_thw"},
                "outputs": {"image_features": VISION_OUTPUT},
            },
        },
        "search": {
            "do_sample": False,
            "early_stopping": True,
            "max_length": context,
            "min_length": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 50,
            "top_p": 1.0,
        },
    }
    return config


def export_genai(
    model: PreTrainedModel,
    processor: ProcessorMixin | None,
    out_dir: str | Path,
    image_size: tuple[int, int] = (672, 672),
    include_vision: bool = True,
) -> Path:
    """Writes the ONNX Runtime GenAI folder of a Qwen2-VL / Qwen2.5-VL `model` (fp32) to `out_dir`, staged then
    renamed like `export_onnx`; returns the path of its `genai_config.json`. The processor's tokenizer is saved
    beside it (GenAI's `Tokenizer` reads `tokenizer.json`)."""
    family = exportable_family(model)
    if family.positions != POSITIONS_MROPE:
        raise ValueError(
            f"ONNX Runtime GenAI's {GENAI_MODEL_TYPE!r} pipeline takes Qwen models (3-D M-RoPE positions); "
            f"{family.name} has {family.positions!r} positions."
        )
    model = model.eval()
    text = model.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    with staged_export(Path(out_dir)) as staging:
        if include_vision:
            export_vision_graph(model, staging / GENAI_VISION, image_size, "float32")
        ids = torch.randint(0, text.vocab_size, (2, 7))
        ids[0, 1:3] = model.config.image_token_id
        export_graph(
            GenAIEmbeddingGraph(model.get_input_embeddings(), model.config.image_token_id),
            (ids, torch.randn(2, text.hidden_size)),
            ({0: "batch", 1: "sequence"}, {0: "num_image_tokens"}),
            ["input_ids", "image_features"],
            ["inputs_embeds"],
            staging / GENAI_EMBEDDING,
        )
        batch, sequence, past = 2, 7, 5
        past_values = [
            torch.randn(batch, text.num_key_value_heads, past, head_dim) for _ in range(2 * text.num_hidden_layers)
        ]
        positions = torch.arange(past, past + sequence).view(1, 1, -1).expand(3, batch, -1).contiguous()
        with mock.patch.dict(os.environ, {FORCE_GQA_VARIABLE: "1"}):
            export_graph(
                GenAIDecoderGraph(model, family),
                (
                    torch.randn(batch, sequence, text.hidden_size),
                    torch.ones(batch, past + sequence, dtype=torch.long),
                    positions,
                    *past_values,
                ),
                (
                    {0: "batch", 1: "sequence"},
                    {0: "batch", 1: "total_sequence"},
                    {1: "batch", 2: "sequence"},
                    tuple([{0: "batch", 2: "past_sequence"}] * len(past_values)),
                ),
                ["inputs_embeds", "attention_mask", "position_ids", *past_names(text.num_hidden_layers)],
                ["logits", *past_names(text.num_hidden_layers, PRESENT_PREFIX)],
                staging / GENAI_DECODER,
            )
        (staging / GENAI_CONFIG).write_text(json.dumps(genai_config(model, processor, include_vision), indent=2))
        if processor is not None:
            processor.tokenizer.save_pretrained(staging)
    return Path(out_dir) / GENAI_CONFIG
