"""Vision graph of Qwen2-VL and Qwen2.5-VL (and the Orion models on them) for images of any size.

The vision towers compute their rotary positions, attention segments (`cu_seqlens`) and, for Qwen2.5-VL, the window
order and window segments from `grid_thw` with data-dependent Python (`grid_thw.tolist()`, loops, `torch.split` on
`lengths.tolist()`), which a graph cannot hold for every size. The graph takes them as inputs instead, computed on
the host in NumPy (`vision_grid.py`, tested equal to transformers' own helpers), and runs attention over the
segments as one masked SDPA (`segment_attention`). It reads `pixel_values` (num_patches, patch_dim) of one image of
any size and returns its embeddings (num_image_tokens, hidden). Several images are several calls, concatenated
(`vision_runtime.VisionEncoder`).
"""

import contextlib
import copy
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

from .vision_grid import vision_cu_seqlens, vision_position_ids, vision_window_index

ONNX_OPSET = 18
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}
# One protobuf file holds at most 2 GiB; bigger graphs keep their weights in one external data file beside it.
PROTOBUF_LIMIT_BYTES = 2**31 - 1
VISION_INPUT = "pixel_values"
VISION_OUTPUT = "image_embeds"
# The vision graph's grid-dependent inputs after pixel_values, in order (the last two for Qwen2.5-VL only).
GRID_INPUTS = ("position_ids", "cu_seqlens", "window_index", "cu_window_seqlens")


def torch_dtype(dtype: str) -> torch.dtype:
    """The torch dtype of an export `dtype` name ("float32" or "float16")."""
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(TORCH_DTYPES)}, got {dtype!r}.")
    return TORCH_DTYPES[dtype]


def module_in_dtype(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`module` itself when all its floating-point weights are already `dtype`, else a converted copy (the caller's
    model is never changed)."""
    weights = [tensor for tensor in (*module.parameters(), *module.buffers()) if tensor.is_floating_point()]
    if all(tensor.dtype == dtype for tensor in weights):
        return module
    return copy.deepcopy(module).to(dtype)


def trace_to_onnx(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: dict[str, dict[int, str]] | None = None,
) -> list[str]:
    """Exports `module` called on `args` to `path` with the TorchScript tracer, in eval mode (each submodule's mode
    is restored after): data-dependent Python values (grid sizes, segment lengths) are frozen to the values they
    take on `args`. Graphs over 2 GiB keep their weights in one external data file `<name>.data` beside `path`.
    Returns the external data files' names."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    training_modes = {submodule: submodule.training for submodule in module.modules()}
    module.eval()
    with tempfile.TemporaryDirectory() as scratch, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # Chosen on purpose: torch.export cannot trace the towers' `torch.split(lengths.tolist())` per segment.
        warnings.filterwarnings("ignore", "You are using the legacy TorchScript-based ONNX export", DeprecationWarning)
        traced_path = Path(scratch) / "graph.onnx"
        torch.onnx.export(
            module,
            args,
            str(traced_path),
            dynamo=False,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes=dynamic_axes,
            opset_version=ONNX_OPSET,
        )
        graph = onnx.load(str(traced_path))
        weight_bytes = sum(tensor.numel() * tensor.element_size() for tensor in module.state_dict().values())
        external = weight_bytes > PROTOBUF_LIMIT_BYTES
        onnx.save_model(
            graph,
            str(path),
            save_as_external_data=external,
            all_tensors_to_one_file=True,
            location=f"{path.name}.data",
        )
    for submodule, training in training_modes.items():
        submodule.training = training
    return [f"{path.name}.data"] if external else []


def vision_tower(
    model: PreTrainedModel,
) -> Qwen2VisionTransformerPretrainedModel | Qwen2_5_VisionTransformerPretrainedModel:
    """The Qwen2-VL / Qwen2.5-VL vision tower of `model` (a `*ForConditionalGeneration`, an Orion model or a
    `*Model`)."""
    backbone = getattr(model, "model", model)
    visual = getattr(backbone, "visual", None)
    if not isinstance(visual, (Qwen2VisionTransformerPretrainedModel, Qwen2_5_VisionTransformerPretrainedModel)):
        raise ValueError(
            f"The vision graph exports Qwen2-VL and Qwen2.5-VL vision towers (`model.model.visual`); "
            f"{type(model).__name__} has {type(visual).__name__ if visual is not None else 'none'}."
        )
    return visual


def image_grid(vision_config: Any, image_size: tuple[int, int]) -> list[int]:
    """`image_grid_thw` [1, h, w] of one `image_size` (H, W) image in patches; H and W must be multiples of
    patch_size * spatial_merge_size (28 for Qwen2-VL)."""
    height, width = image_size
    patch, merge = vision_config.patch_size, vision_config.spatial_merge_size
    factor = patch * merge
    if height <= 0 or width <= 0 or height % factor or width % factor:
        raise ValueError(
            f"image_size must be (H, W) with positive multiples of patch_size * spatial_merge_size = {factor}, "
            f"got {tuple(image_size)}."
        )
    return [1, height // patch, width // patch]


class MatMulPatchEmbed(nn.Module):
    """A tower's patch embedding (a Conv3d whose kernel is its stride) as one MatMul: pixel_values (num_patches,
    C·T·P·P) @ weight (C·T·P·P, hidden) → (num_patches, hidden). Each patch row is exactly one kernel window, and
    ONNX Runtime runs this MatMul far faster than the same product as a 5-D Conv."""

    def __init__(self, patch_embed: nn.Module):
        super().__init__()
        self.patch_embed = patch_embed

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        proj = self.patch_embed.proj
        return nn.functional.linear(hidden_states.to(proj.weight.dtype), proj.weight.flatten(1), proj.bias)


def segment_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The towers' packed attention over segments (`cu_seq_lens_q` (segments + 1,)) as one SDPA over all patches
    with a block-diagonal mask: tensor operations only, so one graph holds every patch count and segment layout.
    query, key, value (1, heads, N, head_dim) → (1, N, heads, head_dim), as transformers' attention functions
    return."""
    positions = torch.arange(query.shape[2], device=query.device)
    segments = (positions[:, None] >= cu_seq_lens_q[None, 1:].to(positions.dtype)).sum(-1)
    mask = segments[:, None] == segments[None, :]
    output = nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return output.transpose(1, 2).contiguous(), None


# The towers send their attention through transformers' packed ("varlen", `cu_seqlens`) branch only for
# implementations whose name says flash; registered under such a name, `segment_attention` takes that branch.
SEGMENT_ATTENTION = "flash_compatible_segment_sdpa"
AttentionInterface.register(SEGMENT_ATTENTION, segment_attention)


@contextlib.contextmanager
def exportable_tower(visual: nn.Module) -> Iterator[None]:
    """Within the block, `visual` runs its patch embedding as `MatMulPatchEmbed` and its attention as
    `segment_attention`; both are put back after."""
    patch_embed, implementation = visual.patch_embed, visual.config._attn_implementation
    visual.patch_embed = MatMulPatchEmbed(patch_embed)
    visual.config._attn_implementation = SEGMENT_ATTENTION
    try:
        yield
    finally:
        visual.patch_embed = patch_embed
        visual.config._attn_implementation = implementation


class GridInputsVision(nn.Module):
    """A Qwen2-VL / Qwen2.5-VL vision tower whose grid-dependent tensors are inputs (`vision_grid.py` computes
    them on the host): pixel_values (N, patch_dim) float32, position_ids (N, 2), cu_seqlens (segments + 1,) and,
    with windows (Qwen2.5-VL), window_index (N / m², ) and cu_window_seqlens (windows + 1,) → image embeddings
    (N / m², hidden) in the tower's dtype. transformers' vision helpers take them precomputed (`vision_utils`)."""

    def __init__(self, visual: nn.Module, windows: bool):
        super().__init__()
        self.visual = visual
        self.windows = windows

    def forward(
        self,
        pixel_values: torch.Tensor,
        position_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        window_index: torch.Tensor | None = None,
        cu_window_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        precomputed = {"position_ids": position_ids, "cu_seqlens": cu_seqlens, "max_seqlen": 0}
        if self.windows:
            precomputed.update(window_index=window_index, cu_window_seqlens=cu_window_seqlens, max_window_seqlen=0)
        # Every grid-dependent value is given, so the grid itself is never read.
        unused_grid = torch.zeros(1, 3, dtype=torch.int64, device=pixel_values.device)
        return self.visual(pixel_values.to(self.visual.dtype), grid_thw=unused_grid, **precomputed).pooler_output


def grid_inputs(vision_config: Any, grid_thw: np.ndarray, windows: bool) -> dict[str, np.ndarray]:
    """The host-computed inputs of the vision graph for `grid_thw` (num_images, 3)."""
    merge = vision_config.spatial_merge_size
    inputs = {
        "position_ids": vision_position_ids(grid_thw, merge),
        "cu_seqlens": vision_cu_seqlens(grid_thw),
    }
    if windows:
        window_index, cu_window_seqlens = vision_window_index(
            grid_thw, merge, vision_config.window_size, vision_config.patch_size
        )
        inputs.update(window_index=window_index, cu_window_seqlens=cu_window_seqlens)
    return inputs


def export_vision_graph(
    model: PreTrainedModel, path: Path, image_size: tuple[int, int], dtype: str, max_pixels: int | None = None
) -> dict:
    """Exports the vision tower of a Qwen2-VL / Qwen2.5-VL based `model` for images of any size.

    The graph reads one image's `pixel_values` (t·h·w, C·temporal·patch·patch) float32, as the Qwen processor
    returns them, and its grid inputs (`GridInputsVision`), and returns `image_embeds` (num_image_tokens, hidden)
    in `dtype`. It is traced on one `image_size` (H, W) example; every other size runs the same graph.
    `max_pixels`: the largest image (H·W pixels) the host accepts, the processor's limit.

    Returns the manifest entry: file, external_data, inputs, outputs, layout "grid", windows, patch_dim,
    hidden_size, spatial_merge_size, window_size, patch_size, max_pixels, dtype.
    """
    from .export import export_graph

    path = Path(path)
    visual = vision_tower(model)
    config = visual.config
    windows = isinstance(visual, Qwen2_5_VisionTransformerPretrainedModel)
    grid_thw = np.array([image_grid(config, image_size)])
    patch_dim = config.in_channels * config.temporal_patch_size * config.patch_size**2
    tower = module_in_dtype(visual, torch_dtype(dtype))
    graph = GridInputsVision(tower, windows)
    num_patches = int(grid_thw.prod())
    example = [torch.randn(num_patches, patch_dim, generator=torch.Generator().manual_seed(0))]
    example += [torch.from_numpy(value) for value in grid_inputs(config, grid_thw, windows).values()]
    names = [VISION_INPUT, *GRID_INPUTS[: len(example) - 1]]
    tokens = torch.export.Dim("image_tokens")
    patches = config.spatial_merge_size**2 * tokens
    dynamic_shapes = [{0: patches}, {0: patches}, {0: torch.export.Dim("segments_plus_one")}]
    if windows:
        dynamic_shapes += [{0: tokens}, {0: torch.export.Dim("windows_plus_one")}]
    training_modes = {submodule: submodule.training for submodule in tower.modules()}
    tower.eval()
    try:
        with exportable_tower(tower):
            entry = export_graph(graph, tuple(example), tuple(dynamic_shapes), names, [VISION_OUTPUT], path)
    finally:
        for submodule, training in training_modes.items():
            submodule.training = training
    return {
        **entry,
        "layout": "grid",
        "windows": windows,
        "patch_dim": patch_dim,
        "hidden_size": int(model.config.get_text_config().hidden_size),
        "spatial_merge_size": int(config.spatial_merge_size),
        "window_size": int(config.window_size) if windows else None,
        "patch_size": int(config.patch_size),
        "max_pixels": None if max_pixels is None else int(max_pixels),
        "dtype": dtype,
    }
