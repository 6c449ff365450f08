"""Vision graph of Qwen2-VL and Qwen2.5-VL (and the Orion models on them) at one image resolution fixed at export.

The vision towers compute their rotary positions, attention segments (`cu_seqlens`) and, for Qwen2.5-VL, the window
order and window segments from `grid_thw` with data-dependent Python (`grid_thw.tolist()`, `torch.split` on
`lengths.tolist()`). The graph is traced for one grid, so all of these become constants of that resolution: the
graph reads `pixel_values` (num_patches, patch_dim) of ONE image of `image_size` pixels and returns its embeddings
(num_image_tokens, hidden). Several images are several calls, concatenated (`vision_runtime.VisionEncoder`).
"""

import contextlib
import copy
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

ONNX_OPSET = 18
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}
# One protobuf file holds at most 2 GiB; bigger graphs keep their weights in one external data file beside it.
PROTOBUF_LIMIT_BYTES = 2**31 - 1
VISION_INPUT = "pixel_values"
VISION_OUTPUT = "image_embeds"


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


@contextlib.contextmanager
def patch_embedding_as_matmul(visual: nn.Module) -> Iterator[None]:
    """Within the block, `visual.patch_embed` runs as `MatMulPatchEmbed`; the original module is put back after."""
    patch_embed = visual.patch_embed
    visual.patch_embed = MatMulPatchEmbed(patch_embed)
    try:
        yield
    finally:
        visual.patch_embed = patch_embed


class FixedGridVision(nn.Module):
    """A Qwen2-VL / Qwen2.5-VL vision tower at one grid: pixel_values (num_patches, patch_dim), float32 as the
    processor returns them → image embeddings (num_patches / merge², hidden) in the tower's dtype."""

    def __init__(self, visual: nn.Module, grid_thw: list[int]):
        super().__init__()
        self.visual = visual
        self.grid_thw = grid_thw

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        grid_thw = torch.tensor([self.grid_thw], dtype=torch.int64, device=pixel_values.device)
        return self.visual(pixel_values.to(self.visual.dtype), grid_thw=grid_thw).pooler_output


def export_vision_graph(model: PreTrainedModel, path: Path, image_size: tuple[int, int], dtype: str) -> dict:
    """Exports the vision tower of a Qwen2-VL / Qwen2.5-VL based `model` for one `image_size` (H, W) image.

    The graph reads `pixel_values` (t·h·w, C·temporal·patch·patch) float32, as the Qwen processor returns them for
    one image of exactly `image_size`, and returns `image_embeds` (num_image_tokens, hidden) in `dtype`. Returns
    the manifest entry: file, external_data, inputs, outputs, image_size, image_grid_thw, num_image_tokens,
    patch_dim, hidden_size, dtype.
    """
    path = Path(path)
    visual = vision_tower(model)
    config = visual.config
    grid_thw = image_grid(config, image_size)
    num_patches = grid_thw[0] * grid_thw[1] * grid_thw[2]
    patch_dim = config.in_channels * config.temporal_patch_size * config.patch_size**2
    tower = module_in_dtype(visual, torch_dtype(dtype))
    graph = FixedGridVision(tower, grid_thw)
    example = torch.randn(num_patches, patch_dim, generator=torch.Generator().manual_seed(0))
    with patch_embedding_as_matmul(tower):
        with torch.no_grad():
            embeddings = graph(example)
        external_data = trace_to_onnx(graph, (example,), path, [VISION_INPUT], [VISION_OUTPUT])
    return {
        "file": path.name,
        "external_data": external_data,
        "inputs": [VISION_INPUT],
        "outputs": [VISION_OUTPUT],
        "image_size": [int(image_size[0]), int(image_size[1])],
        "image_grid_thw": grid_thw,
        "num_image_tokens": int(embeddings.shape[0]),
        "patch_dim": patch_dim,
        "hidden_size": int(embeddings.shape[1]),
        "dtype": dtype,
    }
