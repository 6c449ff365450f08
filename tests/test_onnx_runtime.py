"""`OnnxVLM`: generation and waypoints against PyTorch, sampling and stop tokens, bad inputs, and a run where torch
and transformers cannot be imported."""

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx_helpers import prompt_batch, tiny_export, tiny_model_and_processor, to_numpy
from receipt_helpers import make_model, make_processor, photo

from vlmheads.onnx_export import FORMAT_VERSION, OnnxVLM, export_onnx

NEW_TOKENS = 32


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl", "orion_qwen2_vl"])
def test_greedy_generation_matches_model_generate(name):
    model, _ = tiny_model_and_processor(name)
    batch = prompt_batch(name)
    with torch.no_grad():
        expected = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
    tokens = OnnxVLM(tiny_export(name)).generate(**to_numpy(batch), max_new_tokens=NEW_TOKENS)
    assert tokens.shape == (2, batch["input_ids"].shape[1] + NEW_TOKENS)
    np.testing.assert_array_equal(tokens, expected.numpy())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2_5_vl", "orion_qwen2_vl"])
def test_text_only_generation_matches_model_generate(name):
    model, _ = tiny_model_and_processor(name)
    batch = prompt_batch(name, images=False)
    assert "image_grid_thw" not in batch
    with torch.no_grad():
        expected = model.generate(**batch, max_new_tokens=8, do_sample=False)
    np.testing.assert_array_equal(
        OnnxVLM(tiny_export(name)).generate(**to_numpy(batch), max_new_tokens=8), expected.numpy()
    )


@pytest.mark.slow
def test_orion_waypoints_match_pytorch():
    model, _ = tiny_model_and_processor("orion_qwen2_vl")
    batch = prompt_batch("orion_qwen2_vl")
    with torch.no_grad():
        expected = model(**batch).trajectory
    waypoints = OnnxVLM(tiny_export("orion_qwen2_vl")).trajectory(**to_numpy(batch))
    assert waypoints.shape == (2, 6, 2) and waypoints.dtype == np.float32
    np.testing.assert_allclose(waypoints, expected.numpy(), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_stop_tokens_pad_finished_rows_and_end_generation():
    vlm = OnnxVLM(tiny_export("qwen2_vl"))
    batch = to_numpy(prompt_batch("qwen2_vl"))
    prompt_length = batch["input_ids"].shape[1]
    greedy = vlm.generate(**batch, max_new_tokens=6)
    stop = int(greedy[0, prompt_length + 1])
    stopped = vlm.generate(**batch, max_new_tokens=6, eos_token_id=[stop], pad_token_id=7)
    first_stop = [
        int(np.flatnonzero(row[prompt_length:] == stop)[0]) if stop in row[prompt_length:] else None for row in greedy
    ]
    for row, index in zip(stopped, first_stop, strict=True):
        new = row[prompt_length:]
        if index is None:
            assert stop not in new
        else:
            assert new[index] == stop and (new[index + 1 :] == 7).all()
    # Generation ends once every row has stopped: at most until the later first stop.
    if all(index is not None for index in first_stop):
        assert stopped.shape[1] == prompt_length + max(first_stop) + 1


@pytest.mark.slow
def test_sampling_is_seeded_and_top_k_1_is_greedy():
    vlm = OnnxVLM(tiny_export("qwen2_vl"))
    batch = to_numpy(prompt_batch("qwen2_vl"))
    settings = {"max_new_tokens": 5, "do_sample": True, "temperature": 1.5, "top_p": 0.9}
    first = vlm.generate(**batch, **settings, seed=1)
    np.testing.assert_array_equal(first, vlm.generate(**batch, **settings, seed=1))
    assert not np.array_equal(first, vlm.generate(**batch, **settings, top_k=None, seed=2))
    np.testing.assert_array_equal(
        vlm.generate(**batch, max_new_tokens=5, do_sample=True, top_k=1, seed=3),
        vlm.generate(**batch, max_new_tokens=5),
    )


NO_TORCH_SCRIPT = """
import sys

# As on a host where neither is installed: `import torch` fails and importlib finds no spec for either.
sys.modules["torch"] = None
sys.modules["transformers"] = None
import numpy as np
from vlmheads.onnx_export import OnnxVLM

inputs = dict(np.load(sys.argv[2]))
vlm = OnnxVLM(sys.argv[1])
results = {"tokens": vlm.generate(**inputs, max_new_tokens=8), "trajectory": vlm.trajectory(**inputs)}
blocked = ("torch", "transformers")
loaded = [name for name, module in sys.modules.items() if module is not None and name.split(".")[0] in blocked]
assert not loaded, loaded
np.savez(sys.argv[3], **results)
"""


@pytest.mark.slow
def test_runs_where_torch_cannot_be_imported(tmp_path):
    model, _ = tiny_model_and_processor("orion_qwen2_vl")
    batch = prompt_batch("orion_qwen2_vl")
    np.savez(tmp_path / "inputs.npz", **to_numpy(batch))
    out_dir = tiny_export("orion_qwen2_vl")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-c", NO_TORCH_SCRIPT, str(out_dir), str(tmp_path / "inputs.npz"), str(tmp_path / "out.npz")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = np.load(tmp_path / "out.npz")
    with torch.no_grad():
        expected_tokens = model.generate(**batch, max_new_tokens=8, do_sample=False)
        expected_trajectory = model(**batch).trajectory
    np.testing.assert_array_equal(results["tokens"], expected_tokens.numpy())
    np.testing.assert_allclose(results["trajectory"], expected_trajectory.numpy(), atol=1e-4, rtol=0)


def _copy_export(source, target, manifest_changes=None, leave_out=()):
    """Links the graph files of `source` into `target` (except `leave_out`), with an edited manifest."""
    target.mkdir()
    for path in source.iterdir():
        if path.name not in leave_out and path.name != "manifest.json":
            (target / path.name).symlink_to(path)
    manifest = json.loads((source / "manifest.json").read_text())
    for section, values in (manifest_changes or {}).items():
        if isinstance(values, dict):
            manifest[section].update(values)
        else:
            manifest[section] = values
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


@pytest.mark.slow
def test_bad_exports_and_inputs_are_clear_errors(tmp_path):
    out_dir = tiny_export("orion_qwen2_vl")
    batch = to_numpy(prompt_batch("orion_qwen2_vl"))
    vlm = OnnxVLM(out_dir)

    with pytest.raises(FileNotFoundError, match="No manifest.json"):
        OnnxVLM(tmp_path)
    with pytest.raises(ValueError, match=f"format_version 0.*reads format_version {FORMAT_VERSION}"):
        OnnxVLM(_copy_export(out_dir, tmp_path / "old", {"format_version": 0}))
    with pytest.raises(FileNotFoundError, match="decoder graph .*decoder.onnx.* is missing"):
        OnnxVLM(_copy_export(out_dir, tmp_path / "partial", leave_out={"decoder.onnx"}))
    short = OnnxVLM(_copy_export(out_dir, tmp_path / "short", {"decoder": {"max_sequence_length": 40}}))
    with pytest.raises(ValueError, match="need .* positions; the export takes at most 40"):
        short.generate(**batch, max_new_tokens=40)

    model, _ = tiny_model_and_processor("orion_qwen2_vl")
    image_inputs = {name: batch.pop(name) for name in ("pixel_values",)}
    with torch.no_grad():
        image_embeds = torch.cat(
            model.model.get_image_features(
                torch.from_numpy(image_inputs["pixel_values"]), torch.from_numpy(batch["image_grid_thw"])
            ).pooler_output
        ).numpy()
    with pytest.raises(ValueError, match="hold 8 image tokens .* but there are 4 image embeddings"):
        vlm.generate(**batch, image_embeds=image_embeds[:4], max_new_tokens=2)
    np.testing.assert_array_equal(
        vlm.generate(**batch, image_embeds=image_embeds, max_new_tokens=3),
        vlm.generate(**batch, **image_inputs, max_new_tokens=3),
    )
    with pytest.raises(ValueError, match="scene placeholder tokens .* scene_queries is None"):
        vlm.trajectory(**{**batch, "scene_queries": None}, image_embeds=image_embeds)
    with pytest.raises(ValueError, match="history_queries has 2 rows per sample but input_ids hold"):
        vlm.trajectory(**{**batch, "history_queries": batch["history_queries"][:, :2]}, image_embeds=image_embeds)
    with pytest.raises(ValueError, match="can_bus must have shape"):
        vlm.trajectory(**{**batch, "can_bus": batch["can_bus"][:, :5]}, image_embeds=image_embeds)
    with pytest.raises(ValueError, match="command selects a trajectory mode"):
        vlm.trajectory(**batch, image_embeds=image_embeds, command=np.zeros(2))
    with pytest.raises(ValueError, match="Images need mm_token_type_ids"):
        vlm.generate(**{**batch, "mm_token_type_ids": None}, image_embeds=image_embeds)
    with pytest.raises(ValueError, match="classify needs an export of kind classifier"):
        vlm.classify(**batch)
    with pytest.raises(ValueError, match=r"Execution providers \['NoSuchExecutionProvider'\] are not available"):
        OnnxVLM(out_dir, providers=["NoSuchExecutionProvider"])
    plain = OnnxVLM(tiny_export("qwen2_vl"))
    with pytest.raises(ValueError, match="trajectory needs an export of kind orion"):
        plain.trajectory(**to_numpy(prompt_batch("qwen2_vl")))


def test_receipt_classifier_exports_and_classifies_through_the_same_entry_points(tmp_path):
    processor = make_processor()
    model = make_model(processor)
    export_onnx(model, processor, tmp_path, image_size=(48, 40))
    inputs = processor(images=[[photo(1)], [photo(2, width=30, height=90)]], return_tensors="pt")
    with torch.no_grad():
        expected = model(**{name: inputs[name] for name in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")})
    vlm = OnnxVLM(tmp_path)
    assert vlm.kind == "classifier" and (tmp_path / "processor").is_dir()
    logits = vlm.classify(**to_numpy(dict(inputs)))
    np.testing.assert_allclose(logits, expected.logits.numpy(), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="generate needs an export of kind vlm or orion"):
        vlm.generate(np.zeros((1, 3), dtype=np.int64))


@pytest.mark.slow
def test_export_script_writes_graphs_processor_and_sample_inputs(tmp_path):
    script = Path(__file__).resolve().parents[1] / "examples" / "export_onnx.py"
    command = [
        sys.executable,
        str(script),
        "--tiny",
        "receipt",
        "--out_dir",
        str(tmp_path),
        "--image_size",
        "48",
        "40",
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Sample class logits (ONNX Runtime)" in run.stdout
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["kind"] == "classifier" and manifest["format_version"] == FORMAT_VERSION
    assert (tmp_path / "processor").is_dir()
    assert OnnxVLM(tmp_path).classify(**np.load(tmp_path / "sample_inputs.npz")).shape == (1, 3)
    example = runpy.run_path(str(script))
    with pytest.raises(ValueError, match="Give exactly one of --model and --tiny"):
        example["load"](example["ExportArguments"](out_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="--tiny must be one of"):
        example["load"](example["ExportArguments"](out_dir=str(tmp_path), tiny="llama"))
