"""The Qwen2-VL / Qwen2.5-VL vision graph at any image size: the host's grid inputs equal transformers', parity
with PyTorch at sizes never traced (non-square, uneven windows, several images), fp16, the max_pixels limit, bad
inputs, no torch."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from orion_helpers import FAMILIES, camera_image, small_model
from transformers import Qwen2VLImageProcessor
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

from vlmheads.offline.configs import tiny_image_processor_kwargs
from vlmheads.onnx_export import export, vision
from vlmheads.onnx_export.vision import export_vision_graph
from vlmheads.onnx_export.vision_grid import vision_cu_seqlens, vision_position_ids, vision_window_index
from vlmheads.onnx_export.vision_runtime import VisionEncoder

# The graph is traced on one 112 x 112 image; the parity test runs sizes it never saw: a non-square image whose
# 3 x 6 merged tokens the 2 x 2 windows do not tile evenly, two images of different shapes in one call, and an
# image larger than the traced one.
TRACED_SIZE = (112, 112)
UNTRACED_BATCHES = {"non_square": [(84, 168)], "two_images": [(140, 56), (56, 196)], "larger": [(196, 140)]}
MAX_PIXELS = 200 * 200
PROVIDERS = ["CPUExecutionProvider"]
GRIDS = [[[1, 4, 6]], [[1, 8, 8], [1, 6, 10]], [[2, 14, 10]], [[1, 36, 22]]]


@pytest.mark.parametrize("grids", GRIDS, ids=str)
def test_host_grid_inputs_equal_transformers(grids):
    numpy_grid, torch_grid = np.array(grids), torch.tensor(grids)
    np.testing.assert_array_equal(vision_position_ids(numpy_grid, 2), get_vision_position_ids(torch_grid, 2).numpy())
    np.testing.assert_array_equal(vision_cu_seqlens(numpy_grid), get_vision_cu_seqlens(torch_grid).numpy())
    window_index, cu_window_seqlens = vision_window_index(numpy_grid, 2, 112, 14)
    expected_index, expected_windows = get_vision_window_index(torch_grid, 2, 112, 14)
    np.testing.assert_array_equal(window_index, expected_index.numpy())
    np.testing.assert_array_equal(cu_window_seqlens, expected_windows.numpy())


@pytest.fixture(scope="module")
def models():
    built = {}

    def get(name: str):
        if name not in built:
            built[name] = small_model(FAMILIES[name])
        return built[name]

    return get


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory):
    """Vision graphs exported once per (family, dtype), traced on `TRACED_SIZE`: (out_dir, manifest entry)."""
    done = {}

    def get(name: str, dtype: str = "float32") -> tuple[Path, dict]:
        key = (name, dtype)
        if key not in done:
            out_dir = tmp_path_factory.mktemp(f"vision_{name}")
            entry = export_vision_graph(models(name), out_dir / "vision.onnx", TRACED_SIZE, dtype, MAX_PIXELS)
            done[key] = out_dir, entry
        return done[key]

    return get


def image_inputs(sizes: list[tuple[int, int]], max_pixels: int = MAX_PIXELS) -> dict[str, np.ndarray]:
    """`pixel_values` and `image_grid_thw` of the Qwen processor for random photos of `sizes` (H, W)."""
    processor = Qwen2VLImageProcessor(**{**tiny_image_processor_kwargs(), "max_pixels": max_pixels})
    images = [camera_image(seed, width=width, height=height) for seed, (height, width) in enumerate(sizes)]
    return dict(processor(images=images, return_tensors="np"))


def torch_embeddings(model, inputs: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        features = model.model.get_image_features(
            pixel_values=torch.from_numpy(inputs["pixel_values"]),
            image_grid_thw=torch.from_numpy(inputs["image_grid_thw"]),
        ).pooler_output
    return torch.cat(features).numpy()


@pytest.mark.slow
@pytest.mark.parametrize("batch", sorted(UNTRACED_BATCHES))
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_vision_graph_matches_pytorch_at_untraced_sizes(models, exported, name, batch):
    model = models(name)
    out_dir, entry = exported(name)
    assert entry["layout"] == "grid" and entry["windows"] == (name == "qwen2_5_vl")
    assert entry["patch_dim"] == 3 * 2 * 14 * 14 and entry["max_pixels"] == MAX_PIXELS
    assert entry["hidden_size"] == model.config.text_config.hidden_size
    # The patch embedding is exported as a MatMul, and the model keeps its own Conv3d patch embedding.
    assert "Conv" not in {node.op_type for node in onnx.load(out_dir / entry["file"]).graph.node}
    assert not isinstance(model.model.visual.patch_embed, vision.MatMulPatchEmbed)
    assert model.model.visual.config._attn_implementation != vision.SEGMENT_ATTENTION

    inputs = image_inputs(UNTRACED_BATCHES[batch])
    assert all([height * 14, width * 14] != list(TRACED_SIZE) for _, height, width in inputs["image_grid_thw"])
    encoder = VisionEncoder(out_dir, entry, PROVIDERS)
    embeddings = encoder(inputs["pixel_values"], inputs["image_grid_thw"])
    expected = torch_embeddings(model, inputs)
    tokens = int(inputs["image_grid_thw"].prod(axis=1).sum()) // 4
    assert embeddings.shape == expected.shape == (tokens, entry["hidden_size"])
    assert embeddings.dtype == np.float32
    np.testing.assert_allclose(embeddings, expected, rtol=0, atol=1e-4)


def test_qwen2_5_vl_test_sizes_have_uneven_windows(models):
    """The tiny Qwen2.5-VL tower has window blocks and full-attention blocks, and the non-square test image holds
    windows of different sizes, so the parity test covers the window order and window segments."""
    visual = models("qwen2_5_vl").model.visual
    assert visual.fullatt_block_indexes and set(visual.fullatt_block_indexes) != set(range(len(visual.blocks)))
    grid = image_inputs(UNTRACED_BATCHES["non_square"])["image_grid_thw"]
    _, cu_window_seqlens = vision_window_index(grid, 2, visual.window_size, 14)
    assert len(set(np.diff(cu_window_seqlens).tolist())) > 1


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_float16_vision_graph(models, exported, name):
    out_dir, entry = exported(name, "float16")
    assert entry["dtype"] == "float16"
    inputs = image_inputs(UNTRACED_BATCHES["non_square"])
    embeddings = VisionEncoder(out_dir, entry, PROVIDERS)(inputs["pixel_values"], inputs["image_grid_thw"])
    expected = torch_embeddings(models(name), inputs)
    assert embeddings.dtype == np.float16
    np.testing.assert_allclose(embeddings.astype(np.float32), expected, rtol=0, atol=2e-3)


@pytest.mark.slow
def test_image_above_max_pixels_and_bad_inputs_are_rejected(exported):
    out_dir, entry = exported("qwen2_vl")
    encoder = VisionEncoder(out_dir, entry, PROVIDERS)
    large = image_inputs([(280, 252)], max_pixels=300 * 300)
    with pytest.raises(ValueError, match=r"280x252 = 70560 pixels, above max_pixels = 40000 of this export"):
        encoder(large["pixel_values"], large["image_grid_thw"])
    right = image_inputs([(112, 112)])
    with pytest.raises(ValueError, match=r"pixel_values must have shape .* = \(64, 1176\)"):
        encoder(right["pixel_values"][:-1], right["image_grid_thw"])
    with pytest.raises(ValueError, match=r"image_grid_thw must have shape \(num_images, 3\)"):
        encoder(right["pixel_values"], right["image_grid_thw"][0])
    with pytest.raises(ValueError, match=r"multiples of spatial_merge_size 2"):
        encoder(right["pixel_values"], np.array([[1, 8, 7]]))


@pytest.mark.slow
def test_no_images_give_no_embeddings(exported):
    out_dir, entry = exported("qwen2_vl")
    embeddings = VisionEncoder(out_dir, entry, PROVIDERS)(np.zeros((0, 1176)), np.zeros((0, 3), dtype=np.int64))
    assert embeddings.shape == (0, entry["hidden_size"])


def test_export_rejects_bad_settings(models, tmp_path):
    model = models("qwen2_vl")
    with pytest.raises(ValueError, match="multiples of patch_size \\* spatial_merge_size = 28"):
        export_vision_graph(model, tmp_path / "vision.onnx", (100, 112), "float32")
    with pytest.raises(ValueError, match="dtype must be one of"):
        export_vision_graph(model, tmp_path / "vision.onnx", (112, 112), "bfloat16")
    with pytest.raises(ValueError, match="exports Qwen2-VL and Qwen2.5-VL vision towers"):
        export_vision_graph(torch.nn.Linear(2, 2), tmp_path / "vision.onnx", (112, 112), "float32")


@pytest.mark.slow
def test_vision_runtime_runs_without_torch(exported, tmp_path):
    out_dir, entry = exported("qwen2_5_vl")
    inputs = image_inputs(UNTRACED_BATCHES["two_images"])
    np.savez(tmp_path / "inputs.npz", **inputs)
    script = f"""
import json, sys
sys.modules["torch"] = None
import numpy as np
from vlmheads.onnx_export.vision_runtime import VisionEncoder
inputs = np.load({str(tmp_path / "inputs.npz")!r})
entry = json.loads({json.dumps(entry)!r})
encoder = VisionEncoder({str(out_dir)!r}, entry, {PROVIDERS!r})
np.save({str(tmp_path / "out.npy")!r}, encoder(inputs["pixel_values"], inputs["image_grid_thw"]))
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    expected = VisionEncoder(out_dir, entry, PROVIDERS)(inputs["pixel_values"], inputs["image_grid_thw"])
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), expected)


@pytest.mark.slow
def test_large_graph_keeps_weights_in_external_data(models, monkeypatch, tmp_path):
    """Graphs over the external-data threshold keep their weights beside the graph; the threshold is lowered."""
    monkeypatch.setattr(export, "EXTERNAL_DATA_THRESHOLD_BYTES", 0)
    model = models("qwen2_5_vl")
    model.train()
    try:
        entry = export_vision_graph(model, tmp_path / "vision.onnx", TRACED_SIZE, "float32")
        assert all(module.training for module in model.modules()), "the export changed the model's mode"
    finally:
        model.eval()
    assert entry["external_data"] and all((tmp_path / name).is_file() for name in entry["external_data"])
    inputs = image_inputs(UNTRACED_BATCHES["non_square"])
    embeddings = VisionEncoder(tmp_path, entry, PROVIDERS)(inputs["pixel_values"], inputs["image_grid_thw"])
    np.testing.assert_allclose(embeddings, torch_embeddings(model, inputs), rtol=0, atol=1e-4)
