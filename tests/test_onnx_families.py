"""ONNX export of a family without M-RoPE (SmolVLM: 1-D positions, tiled images) and a head model on it, chosen by
the declared capabilities: greedy tokens identical to PyTorch, logits within 1e-4."""

import numpy as np
import pytest
import torch
from onnx_helpers import prompt_batch, tiny_export, tiny_model_and_processor, to_numpy
from vlm_helpers import tiny_backbone, tiny_image, tiny_processor

from vlmheads import VLMForImageClassification
from vlmheads.modeling.families import POSITIONS_1D, POSITIONS_MROPE, VLM_FAMILIES
from vlmheads.onnx_export import OnnxVLM, export_onnx
from vlmheads.onnx_export.manifest import MROPE_POSITIONS, read_manifest

NEW_TOKENS = 16
pytestmark = pytest.mark.slow


def test_manifest_positions_constant_is_the_family_tables():
    assert MROPE_POSITIONS == POSITIONS_MROPE
    assert VLM_FAMILIES["smolvlm"].positions == POSITIONS_1D and VLM_FAMILIES["smolvlm"].onnx_exportable


def test_smolvlm_greedy_tokens_and_logits_match_pytorch():
    model, _ = tiny_model_and_processor("smolvlm")
    batch = prompt_batch("smolvlm", questions=["Describe the picture in every detail.", "A cat?"])
    assert batch["pixel_values"].ndim == 5 and (batch["attention_mask"] == 0).any(), "want tiles and padding"
    out_dir = tiny_export("smolvlm")
    manifest = read_manifest(out_dir)
    assert manifest["positions"] == POSITIONS_1D and manifest["family"] == "smolvlm"
    assert next(entry for entry in manifest["graphs"]["decoder"]["inputs"] if entry["name"] == "position_ids")[
        "shape"
    ] == ["batch", "sequence"]
    with torch.no_grad():
        expected = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
        expected_logits = model(**batch).logits[:, -1].numpy()
    vlm = OnnxVLM(out_dir)
    inputs = to_numpy(batch)
    np.testing.assert_array_equal(vlm.generate(**inputs, max_new_tokens=NEW_TOKENS), expected.numpy())
    np.testing.assert_allclose(vlm.prefill(**inputs).logits, expected_logits, atol=1e-4, rtol=0)
    text_only = to_numpy(prompt_batch("smolvlm", images=False))
    with torch.no_grad():
        expected_text = model.generate(**{k: torch.from_numpy(v) for k, v in text_only.items()}, max_new_tokens=6)
    np.testing.assert_array_equal(vlm.generate(**text_only, max_new_tokens=6), expected_text.numpy())


def test_smolvlm_image_classifier_matches_pytorch(tmp_path):
    model = VLMForImageClassification.from_backbone(
        tiny_backbone("smolvlm"), num_labels=3, pooling="vision", classifier_hidden_dims=[32]
    ).eval()
    processor = tiny_processor("smolvlm")
    export_onnx(model, processor, tmp_path)
    manifest = read_manifest(tmp_path)
    assert manifest["kind"] == "classifier" and set(manifest["graphs"]) == {"vision", "classifier_head"}
    # A square and a tall image: different tile counts, so the second sample has a padding tile.
    images = [[tiny_image(1)], [tiny_image(2).resize((40, 120))]]
    inputs = dict(processor.image_processor(images=images, return_tensors="pt"))
    assert not inputs["pixel_values"][0, -1].any() or not inputs["pixel_values"][1, -1].any()
    with torch.no_grad():
        expected = model(**inputs).logits.numpy()
    logits = OnnxVLM(tmp_path).classify(**to_numpy(inputs))
    assert logits.shape == (2, 3) and np.abs(logits[0] - logits[1]).max() > 1e-4
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)


def test_families_not_marked_exportable_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"'gemma3' family, which the family table does not mark onnx_exportable"):
        export_onnx(tiny_backbone("gemma3"), tiny_processor("gemma3"), tmp_path / "gemma3")
    assert not (tmp_path / "gemma3").exists()
    multimodal = VLMForImageClassification.from_backbone(tiny_backbone("smolvlm"), num_labels=2, pooling="multimodal")
    with pytest.raises(ValueError, match='Only pooling="vision" classifiers export'):
        export_onnx(multimodal, tiny_processor("smolvlm"), tmp_path / "multimodal")
