"""The torch-free host's twins equal the torch helpers they mirror: the NumPy sampler (`onnx_export.sampling`) and
`vlmheads.serve.sampling`, the NumPy positions (`onnx_export.mrope`) and `vlmheads.modeling.positions`."""

import numpy as np
import pytest
import torch
from onnx_helpers import prompt_batch, tiny_model_and_processor

from vlmheads.modeling.families import VLM_FAMILIES
from vlmheads.modeling.positions import prompt_positions
from vlmheads.onnx_export import sampling
from vlmheads.onnx_export.mrope import rope_positions, text_positions
from vlmheads.serve.sampling import MIN_TEMPERATURE, RequestSampler, SamplingParams

SETTINGS = [
    {"temperature": 0.7, "top_k": 0, "top_p": 1.0},
    {"temperature": 1.3, "top_k": 5, "top_p": 1.0},
    {"temperature": 1.0, "top_k": 0, "top_p": 0.8},
    {"temperature": 0.5, "top_k": 20, "top_p": 0.9},
    {"temperature": 1e-30, "top_k": 0, "top_p": 1.0},
]


def test_temperature_floor_is_the_servers():
    assert sampling.MIN_TEMPERATURE == MIN_TEMPERATURE


@pytest.mark.parametrize("settings", SETTINGS, ids=str)
def test_numpy_warpers_equal_the_torch_sampler(settings):
    logits = np.random.default_rng(0).standard_normal((3, 97)).astype(np.float32) * 4
    expected = np.concatenate(
        [RequestSampler(SamplingParams(**settings, seed=0)).warp(torch.from_numpy(row)).numpy() for row in logits]
    )
    warped = sampling.warp(logits, settings["temperature"], settings["top_k"], settings["top_p"])
    np.testing.assert_array_equal(np.isinf(warped), np.isinf(expected))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(warped[finite], expected[finite], rtol=1e-6, atol=1e-6)


def test_sampling_is_seeded_and_rejects_logits_it_cannot_sample():
    logits = np.random.default_rng(1).standard_normal((4, 50)).astype(np.float32)
    first = sampling.sample(logits, np.random.default_rng(7), 1.0, 10, 0.9)
    np.testing.assert_array_equal(first, sampling.sample(logits, np.random.default_rng(7), 1.0, 10, 0.9))
    np.testing.assert_array_equal(sampling.sample(logits, np.random.default_rng(2), 1.0, 1), logits.argmax(-1))
    bad = logits.copy()
    bad[2, 3] = np.nan
    with pytest.raises(sampling.SamplingError, match="row 2: the model's logits hold NaN or inf"):
        sampling.sample(bad, np.random.default_rng(0), 1.0)


@pytest.mark.parametrize("images", [True, False])
def test_numpy_mrope_positions_equal_the_torch_helper(images):
    model, _ = tiny_model_and_processor("qwen2_vl")
    batch = prompt_batch("qwen2_vl", images=images, questions=["A longer question about the picture?", "Hi"])
    assert (batch["attention_mask"] == 0).any(), "the batch should be left-padded"
    expected, expected_offsets = prompt_positions(model, VLM_FAMILIES["qwen2-vl"], batch)
    positions, offsets = rope_positions(
        batch["attention_mask"].numpy(),
        batch["mm_token_type_ids"].numpy() if images else None,
        batch["image_grid_thw"].numpy() if images else None,
        model.config.vision_config.spatial_merge_size,
    )
    np.testing.assert_array_equal(positions, expected.numpy())
    np.testing.assert_array_equal(offsets, expected_offsets.numpy())


def test_numpy_1d_positions_equal_the_torch_helper():
    model, _ = tiny_model_and_processor("smolvlm")
    batch = prompt_batch("smolvlm", images=False, questions=["A longer question, please.", "Hi"])
    assert (batch["attention_mask"] == 0).any(), "the batch should be left-padded"
    expected, _ = prompt_positions(model, VLM_FAMILIES["smolvlm"], batch)
    np.testing.assert_array_equal(text_positions(batch["attention_mask"].numpy()), expected.numpy())
