"""The Qwen2-VL / Qwen2.5-VL vision graph: parity with PyTorch at fixed resolutions, fp16, bad inputs, no torch."""

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
from transformers.vision_utils import get_vision_window_index

from vlmheads.offline.configs import tiny_image_processor_kwargs
from vlmheads.onnx_export import vision
from vlmheads.onnx_export.vision import export_vision_graph
from vlmheads.onnx_export.vision_runtime import VisionEncoder

# (H, W): a square image, and a 3 x 6 grid of merged tokens whose 2 x 2 windows do not tile it evenly.
IMAGE_SIZES = [(112, 112), (84, 168)]
PROVIDERS = ["CPUExecutionProvider"]


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
    """Vision graphs exported once per (family, image size, dtype): (out_dir, manifest entry)."""
    done = {}

    def get(name: str, image_size: tuple[int, int], dtype: str = "float32") -> tuple[Path, dict]:
        key = (name, image_size, dtype)
        if key not in done:
            out_dir = tmp_path_factory.mktemp(f"vision_{name}")
            entry = export_vision_graph(models(name), out_dir / "vision.onnx", image_size, dtype)
            done[key] = out_dir, entry
        return done[key]

    return get


def image_inputs(image_size: tuple[int, int], seeds: list[int]) -> dict[str, np.ndarray]:
    """`pixel_values` and `image_grid_thw` of the Qwen processor for random photos of exactly `image_size`."""
    processor = Qwen2VLImageProcessor(**{**tiny_image_processor_kwargs(), "max_pixels": 200 * 200})
    height, width = image_size
    images = [camera_image(seed, width=width, height=height) for seed in seeds]
    return dict(processor(images=images, return_tensors="np"))


def torch_embeddings(model, inputs: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        features = model.model.get_image_features(
            pixel_values=torch.from_numpy(inputs["pixel_values"]),
            image_grid_thw=torch.from_numpy(inputs["image_grid_thw"]),
        ).pooler_output
    return torch.cat(features).numpy()


@pytest.mark.parametrize("image_size", IMAGE_SIZES, ids=lambda size: f"{size[0]}x{size[1]}")
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_vision_graph_matches_pytorch(models, exported, name, image_size):
    model = models(name)
    out_dir, entry = exported(name, image_size)
    height, width = image_size
    tokens = (height // 28) * (width // 28)
    assert entry["image_size"] == [height, width]
    assert entry["image_grid_thw"] == [1, height // 14, width // 14]
    assert entry["num_image_tokens"] == tokens
    assert entry["patch_dim"] == 3 * 2 * 14 * 14
    assert entry["hidden_size"] == model.config.text_config.hidden_size
    assert (out_dir / entry["file"]).is_file() and entry["external_data"] == []
    # The patch embedding is exported as a MatMul, and the model keeps its own Conv3d patch embedding.
    assert "Conv" not in {node.op_type for node in onnx.load(out_dir / entry["file"]).graph.node}
    assert not isinstance(model.model.visual.patch_embed, vision.MatMulPatchEmbed)

    inputs = image_inputs(image_size, seeds=[1, 2])
    encoder = VisionEncoder(out_dir, entry, PROVIDERS)
    embeddings = encoder(inputs["pixel_values"], inputs["image_grid_thw"])
    expected = torch_embeddings(model, inputs)
    assert embeddings.shape == expected.shape == (2 * tokens, entry["hidden_size"])
    assert embeddings.dtype == np.float32
    np.testing.assert_allclose(embeddings, expected, rtol=0, atol=1e-4)
    # The two photos give different embeddings: the graph reads its input.
    assert np.abs(embeddings[:tokens] - embeddings[tokens:]).max() > 1e-3


def test_qwen2_5_vl_graph_runs_windowed_and_full_attention(models):
    """The tiny Qwen2.5-VL tower has window blocks and full-attention blocks, and the test grids hold several
    windows, so the parity test covers the window order and window segments."""
    visual = models("qwen2_5_vl").model.visual
    assert set(visual.fullatt_block_indexes) != set(range(len(visual.blocks)))
    assert visual.fullatt_block_indexes
    for height, width in IMAGE_SIZES:
        grid = torch.tensor([[1, height // 14, width // 14]])
        _, cu_window_seqlens = get_vision_window_index(grid, 2, visual.window_size, 14)
        assert len(cu_window_seqlens) - 1 > 1


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_float16_vision_graph(models, exported, name):
    image_size = IMAGE_SIZES[0]
    out_dir, entry = exported(name, image_size, "float16")
    assert entry["dtype"] == "float16"
    inputs = image_inputs(image_size, seeds=[3])
    embeddings = VisionEncoder(out_dir, entry, PROVIDERS)(inputs["pixel_values"], inputs["image_grid_thw"])
    expected = torch_embeddings(models(name), inputs)
    assert embeddings.dtype == np.float16
    np.testing.assert_allclose(embeddings.astype(np.float32), expected, rtol=0, atol=2e-3)


def test_image_of_another_resolution_is_rejected(exported):
    out_dir, entry = exported("qwen2_vl", IMAGE_SIZES[0])
    encoder = VisionEncoder(out_dir, entry, PROVIDERS)
    other = image_inputs((56, 56), seeds=[4])
    with pytest.raises(ValueError, match=r"exported for 112x112 images, image_grid_thw \[1, 8, 8\]"):
        encoder(other["pixel_values"], other["image_grid_thw"])
    right = image_inputs(IMAGE_SIZES[0], seeds=[4])
    with pytest.raises(ValueError, match=r"pixel_values must have shape .* = \(64, 1176\)"):
        encoder(right["pixel_values"][:-1], right["image_grid_thw"])
    with pytest.raises(ValueError, match=r"image_grid_thw must have shape \(num_images, 3\)"):
        encoder(right["pixel_values"], right["image_grid_thw"][0])


def test_no_images_give_no_embeddings(exported):
    out_dir, entry = exported("qwen2_vl", IMAGE_SIZES[0])
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


def test_vision_runtime_runs_without_torch(exported, tmp_path):
    out_dir, entry = exported("qwen2_5_vl", IMAGE_SIZES[0])
    inputs = image_inputs(IMAGE_SIZES[0], seeds=[5])
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


def test_large_graph_keeps_weights_in_one_external_file(models, monkeypatch, tmp_path):
    """Graphs over the 2 GiB protobuf limit keep their weights in `<file>.data`; the limit is lowered here."""
    monkeypatch.setattr(vision, "PROTOBUF_LIMIT_BYTES", 0)
    model = models("qwen2_5_vl")
    model.train()
    try:
        entry = export_vision_graph(model, tmp_path / "vision.onnx", IMAGE_SIZES[0], "float32")
        assert all(module.training for module in model.modules()), "the export changed the model's mode"
    finally:
        model.eval()
    assert entry["external_data"] == ["vision.onnx.data"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["vision.onnx", "vision.onnx.data"]
    inputs = image_inputs(IMAGE_SIZES[0], seeds=[6])
    embeddings = VisionEncoder(tmp_path, entry, PROVIDERS)(inputs["pixel_values"], inputs["image_grid_thw"])
    np.testing.assert_allclose(embeddings, torch_embeddings(model, inputs), rtol=0, atol=1e-4)
