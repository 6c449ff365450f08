"""The decoder, embedding, driving and trajectory graphs against PyTorch, and the NumPy M-RoPE positions."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx_helpers import ORION, prompt_batch, tiny_export, tiny_model_and_processor, to_numpy
from orion_helpers import FAMILIES, small_model

from vlmheads.onnx_export import OnnxVLM, export
from vlmheads.onnx_export.mrope import rope_positions

EXPORTS = ["qwen2_vl", "qwen2_5_vl", "orion_qwen2_vl"]
DECODE_STEPS = 3


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("images", [True, False])
def test_rope_positions_match_transformers(name, images):
    model, processor = tiny_model_and_processor(name)
    questions = ["A longer question about the picture, please.", "Hi", "Two images?"]
    batch = prompt_batch(name, images=images, questions=questions)
    assert (batch["attention_mask"] == 0).any(), "the batch should be left-padded"
    positions, deltas = rope_positions(
        batch["attention_mask"].numpy(),
        batch["mm_token_type_ids"].numpy(),
        batch["image_grid_thw"].numpy() if images else None,
        model.config.vision_config.spatial_merge_size,
    )
    if images:
        expected, expected_deltas = model.model.get_rope_index(
            batch["input_ids"],
            batch["mm_token_type_ids"],
            batch["image_grid_thw"],
            attention_mask=batch["attention_mask"],
        )
    else:
        # What generate uses without images: the running count of real tokens on every row, no offset.
        text = batch["attention_mask"].cumsum(-1) - 1
        expected = text.masked_fill(batch["attention_mask"] == 0, 0).expand(3, -1, -1)
        expected_deltas = torch.zeros(len(questions), 1, dtype=torch.long)
    np.testing.assert_array_equal(positions, expected.numpy())
    np.testing.assert_array_equal(deltas, expected_deltas.numpy())


def test_rope_positions_reject_mismatched_grids():
    token_types = np.array([[0, 1, 1, 1, 1, 0]])
    with pytest.raises(ValueError, match="more images than image_grid_thw"):
        rope_positions(np.ones((1, 6)), token_types, np.zeros((0, 3)))
    with pytest.raises(ValueError, match="image tokens and image_grid_thw disagree"):
        rope_positions(np.ones((1, 6)), token_types, np.array([[1, 4, 6]]))
    with pytest.raises(ValueError, match="video tokens"):
        rope_positions(np.ones((1, 6)), token_types * 2, np.array([[1, 4, 4]]))


def _torch_steps(model, batch: dict, steps: int) -> tuple[list[torch.Tensor], list[torch.Tensor], object]:
    """PyTorch next-token logits of the prompt and of `steps` greedy cached decode steps, the tokens fed, and the
    prompt's outputs; decode positions follow generate (the prompt's last position + 1 per step)."""
    with torch.no_grad():
        outputs = model(**batch, use_cache=True)
        positions, _ = model.model.get_rope_index(
            batch["input_ids"],
            batch["mm_token_type_ids"],
            batch["image_grid_thw"],
            attention_mask=batch["attention_mask"],
        )
        logits, tokens = [outputs.logits[:, -1]], []
        cache, attention_mask, last = outputs.cache, batch["attention_mask"], positions[:, :, -1:]
        for _ in range(steps):
            tokens.append(logits[-1].argmax(-1))
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
            last = last + 1
            step = model(
                input_ids=tokens[-1][:, None],
                attention_mask=attention_mask,
                position_ids=last,
                cache=cache,
                use_cache=True,
            )
            logits.append(step.logits[:, -1])
            cache = step.cache
    return logits, tokens, outputs


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPORTS)
def test_decoder_matches_pytorch_at_prefill_and_each_decode_step(name):
    model, _ = tiny_model_and_processor(name)
    batch = prompt_batch(name)
    assert (batch["attention_mask"][:, 0] == 0).any(), "the batch should be left-padded"
    expected_logits, tokens, prompt_outputs = _torch_steps(model, batch, DECODE_STEPS)
    vlm = OnnxVLM(tiny_export(name))
    state = vlm.prefill(**to_numpy(batch))
    np.testing.assert_allclose(state.logits, expected_logits[0].numpy(), atol=1e-4, rtol=0)
    if name in ORION:
        ego = (batch["input_ids"] == model.config.ego_token_id).numpy()
        np.testing.assert_allclose(state.hidden_states[ego], prompt_outputs.ego_features.numpy(), atol=1e-4, rtol=0)
    for token, expected in zip(tokens, expected_logits[1:], strict=True):
        state = vlm.decode(state, token.numpy())
        np.testing.assert_allclose(state.logits, expected.numpy(), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_driving_and_trajectory_graphs_match_pytorch():
    model, _ = tiny_model_and_processor("orion_qwen2_vl")
    out_dir = tiny_export("orion_qwen2_vl")
    generator = torch.Generator().manual_seed(3)
    config = model.config
    scene = torch.randn(3, config.num_scene_queries, config.scene_query_dim, generator=generator)
    history = torch.randn(3, config.num_history_queries, config.history_query_dim, generator=generator)
    can_bus = torch.randn(3, config.can_bus_dim, generator=generator)
    ego = torch.randn(3, config.text_config.hidden_size, generator=generator)
    driving = ort.InferenceSession(str(out_dir / "driving.onnx"))
    trajectory = ort.InferenceSession(str(out_dir / "trajectory.onnx"))
    projected = driving.run(
        None, {"scene_queries": scene.numpy(), "history_queries": history.numpy(), "can_bus": can_bus.numpy()}
    )
    embeddings = model.driving_embeddings
    with torch.no_grad():
        expected = [
            embeddings.scene_projector(scene),
            embeddings.history_projector(history),
            embeddings.can_bus_projector(can_bus[:, None]),
        ]
        expected_modes = model.trajectory_decoder(ego)
    for got, want in zip(projected, expected, strict=True):
        np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=0)
    modes = trajectory.run(None, {"ego_features": ego.numpy()})[0]
    np.testing.assert_allclose(modes, expected_modes.numpy(), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_float16_export_runs_close_to_float32():
    out_dir = tiny_export("qwen2_vl", "float16")
    vlm = OnnxVLM(out_dir)
    assert vlm.manifest["dtype"] == "float16"
    decoder = onnx.load(str(out_dir / "decoder.onnx"), load_external_data=False)
    assert decoder.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    batch = to_numpy(prompt_batch("qwen2_vl"))
    state = vlm.prefill(**batch)
    reference = OnnxVLM(tiny_export("qwen2_vl")).prefill(**batch)
    assert state.logits.dtype == np.float32
    np.testing.assert_allclose(state.logits, reference.logits, atol=2e-2, rtol=0)


def test_large_graphs_keep_their_weights_in_external_data(tmp_path, monkeypatch):
    model, _ = tiny_model_and_processor("qwen2_vl")
    monkeypatch.setattr(export, "EXTERNAL_DATA_THRESHOLD_BYTES", 0)
    entry = export.export_embedding(model, tmp_path, orion=False)
    assert entry["external_data"] and all((tmp_path / name).is_file() for name in entry["external_data"])
    assert (tmp_path / "embedding.onnx").stat().st_size < 100_000
    input_ids = np.array([[5, 17, 151655]])
    got = ort.InferenceSession(str(tmp_path / "embedding.onnx")).run(None, {"input_ids": input_ids})[0]
    with torch.no_grad():
        expected = model.get_input_embeddings()(torch.from_numpy(input_ids))
    np.testing.assert_array_equal(got, expected.numpy())


def test_export_rejects_unknown_dtype_and_model(tmp_path):
    model, processor = tiny_model_and_processor("qwen2_vl")
    with pytest.raises(ValueError, match="dtype must be one of"):
        export.export_onnx(model, processor, tmp_path, dtype="bfloat16")
    with pytest.raises(ValueError, match="export_onnx takes a transformers PreTrainedModel .* got Linear"):
        export.export_onnx(torch.nn.Linear(2, 2), processor, tmp_path)


@pytest.mark.slow
def test_flow_planner_trajectory_graph_takes_the_noise(tmp_path):
    model = small_model(FAMILIES["qwen2_vl"], trajectory_head="flow", num_modes=3, flow_num_steps=2)
    entry = export.export_trajectory(model, tmp_path)
    assert [value["name"] for value in entry["inputs"]] == ["ego_features", "noise"]
    generator = torch.Generator().manual_seed(4)
    ego = torch.randn(3, model.config.text_config.hidden_size, generator=generator)
    noise = torch.randn(3, model.config.num_waypoints, model.config.waypoint_dim, generator=generator)
    with torch.no_grad():
        expected = model.trajectory_decoder(ego, noise)
    session = ort.InferenceSession(str(tmp_path / "trajectory.onnx"))
    modes = session.run(None, {"ego_features": ego.numpy(), "noise": noise.numpy()})[0]
    assert modes.shape == (3, 3, model.config.num_waypoints, model.config.waypoint_dim)
    np.testing.assert_allclose(modes, expected.numpy(), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_decode_writes_the_preallocated_cache_buffers_in_place():
    vlm = OnnxVLM(tiny_export("qwen2_vl"))
    batch = to_numpy(prompt_batch("qwen2_vl"))
    prompt_length = batch["input_ids"].shape[1]
    state = vlm.prefill(**batch, max_new_tokens=2)
    cache = state.cache
    assert cache.capacity == prompt_length + 2
    addresses = [buffer.data_ptr() for buffer in cache.buffers]
    state = vlm.decode(state, state.logits.argmax(-1))
    assert state.cache is cache and [buffer.data_ptr() for buffer in cache.buffers] == addresses
    # The decoder's present outputs are the bound buffers themselves, not copies.
    presents = cache.binding.get_outputs()[cache.num_host_outputs :]
    assert [present.data_ptr() for present in presents] == addresses
    keys = cache.buffers[0].numpy()
    assert np.abs(keys[:, :, prompt_length]).max() > 0 and not keys[:, :, prompt_length + 1 :].any()
    # A decode step's inputs are host arrays bound once: the embedding graph writes the decoder's inputs_embeds.
    step = cache.step
    tokens = state.logits.argmax(-1)
    state = vlm.decode(state, tokens)
    assert cache.step is step and state.attention_mask.shape == (len(tokens), prompt_length + 2)
    embedded = vlm.sessions["embedding"].run(None, {"input_ids": tokens[:, None]})[0]
    np.testing.assert_array_equal(step.inputs_embeds, embedded)
    # decode returns copies of the bound logits, which the next step overwrites.
    assert state.logits is not cache.logits and np.array_equal(state.logits, cache.logits)
    with pytest.raises(ValueError, match=rf"next_tokens must have shape \(B={len(tokens)},\)"):
        vlm.decode(state, tokens[:1])
    with pytest.raises(ValueError, match=f"cache is full: prefill reserved {prompt_length + 2} positions"):
        vlm.decode(state, state.logits.argmax(-1))
