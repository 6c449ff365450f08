"""Decoder position ids of every family, as the family table declares them (`VLMFamily.positions`).

`POSITIONS_MROPE` families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) place image tokens on a 3-D (temporal, height, width)
grid: transformers' own `get_rope_index` computes the prompt's positions (3, B, S) and each row's offset, the
distance between the last prompt position and the number of tokens; decoding continues at `tokens + offset` on all
three rows. `POSITIONS_1D` families count tokens. The server's engine, pipeline parallelism and the heads' spliced
embeddings all take their positions from here; the ONNX Runtime host has a NumPy twin
(`vlmheads.onnx_export.mrope`), tested equal.

Imports only torch, transformers and the family table: this file ships as remote code with the head models.
"""

from collections.abc import Mapping
from typing import Any

import torch
from transformers import PreTrainedModel

from .families import POSITIONS_MROPE, VLMFamily

ROPE_INPUTS = ("attention_mask", "mm_token_type_ids", "image_grid_thw", "video_grid_thw", "second_per_grid_ts")
"""The processor outputs, besides `input_ids`, that M-RoPE positions are computed from."""


def mrope_positions(
    vlm: PreTrainedModel,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    mm_token_type_ids: torch.Tensor | None = None,
    image_grid_thw: torch.LongTensor | None = None,
    video_grid_thw: torch.LongTensor | None = None,
    second_per_grid_ts: torch.Tensor | None = None,
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """The M-RoPE positions (3, B, S) of a prompt `input_ids` (B, S) and each row's decode offset (B, 1), from
    `get_rope_index` of the family's model (`vlm.model`, e.g. `Qwen2VLModel`).

    `mm_token_type_ids` (B, S) marks image (1) and video (2) tokens, as the processor returns them; it is required
    with `image_grid_thw` / `video_grid_thw` (Qwen2.5-VL would otherwise silently fall back to 1-D positions), and
    taken as all text without them. `second_per_grid_ts`: Qwen2.5-VL's video timing.
    """
    grids = {"image_grid_thw": image_grid_thw, "video_grid_thw": video_grid_thw}
    if mm_token_type_ids is None:
        given = [name for name, grid in grids.items() if grid is not None]
        if given:
            raise ValueError(f"{given} need mm_token_type_ids (the processor returns them) for M-RoPE positions.")
        mm_token_type_ids = torch.zeros_like(input_ids)
    present = {
        name: value for name, value in {**grids, "second_per_grid_ts": second_per_grid_ts}.items() if value is not None
    }
    return vlm.model.get_rope_index(
        input_ids, mm_token_type_ids=mm_token_type_ids, attention_mask=attention_mask, **present
    )


def prompt_positions(
    vlm: PreTrainedModel, family: VLMFamily, inputs: Mapping[str, Any]
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """The positions of a prompt (the processor's `inputs`, `input_ids` (B, S)) and each row's decode offset
    (B, 1), by `family.positions`: M-RoPE (3, B, S) from `mrope_positions`, else (B, S) the running count of the
    real tokens (`attention_mask`; 0 at padding) with offsets 0."""
    input_ids = inputs["input_ids"]
    if family.positions == POSITIONS_MROPE:
        return mrope_positions(vlm, input_ids, **{name: inputs.get(name) for name in ROPE_INPUTS})
    attention_mask = inputs.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    positions = (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)
    return positions, torch.zeros(input_ids.shape[0], 1, dtype=torch.long, device=input_ids.device)


def decode_positions(family: VLMFamily, next_positions: torch.LongTensor) -> torch.LongTensor:
    """Positions of one new token per row, `next_positions` (B,) (tokens so far + the row's offset): (3, B, 1) for
    M-RoPE families, the same on all three rows; (B, 1) otherwise."""
    positions = next_positions.reshape(-1, 1)
    if family.positions == POSITIONS_MROPE:
        return positions.unsqueeze(0).expand(3, -1, -1)
    return positions
