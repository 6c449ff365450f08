"""The decoder graph rewrites (`vlmheads.onnx_export.fusion`): on small hand-built graphs, the same outputs with
fewer nodes, and patterns that do not match exactly left alone; on the tiny exports, the fused layout (numerics: the
decoder parity tests)."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_helpers import tiny_export

from vlmheads.onnx_export.fusion import fuse_decoder, fuse_skip_rms_norm, pack_matmuls

HIDDEN = 8


def _model(nodes, initializers, outputs, input_shape=("batch", "sequence", HIDDEN)):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
        [numpy_helper.from_array(value, name) for name, value in initializers.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    return onnx.shape_inference.infer_shapes(model)


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})


def _op_types(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def test_projections_of_one_input_become_one_matmul_with_the_same_outputs():
    rng = np.random.default_rng(0)
    weights = {f"w{i}": rng.standard_normal((HIDDEN, width)).astype(np.float32) for i, width in enumerate((4, 6, 2))}
    biases = {f"b{i}": rng.standard_normal(width).astype(np.float32) for i, width in enumerate((4, 6, 2))}
    nodes = []
    for i in range(3):
        nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"m{i}"], name=f"mm{i}"))
        nodes.append(helper.make_node("Add", [f"m{i}", f"b{i}"], [f"y{i}"], name=f"add{i}"))
    # A MatMul on another input stays as it is.
    nodes.append(helper.make_node("Relu", ["x"], ["r"]))
    nodes.append(helper.make_node("MatMul", ["r", "w0"], ["z"], name="other"))
    model = _model(nodes, {**weights, **biases}, ["y0", "y1", "y2", "z"])
    x = rng.standard_normal((2, 3, HIDDEN)).astype(np.float32)
    expected = _run(model, x)
    assert pack_matmuls(model) == 1
    assert _op_types(model).count("MatMul") == 2 and _op_types(model).count("Split") == 1
    for got, want in zip(_run(model, x), expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_projections_without_a_bias_each_are_packed_without_one():
    rng = np.random.default_rng(1)
    weights = {f"w{i}": rng.standard_normal((HIDDEN, 3)).astype(np.float32) for i in range(2)}
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["y0"], name="mm0"),
        helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"),
        helper.make_node("Relu", ["m1"], ["y1"]),
    ]
    model = _model(nodes, weights, ["y0", "y1"])
    x = rng.standard_normal((1, 2, HIDDEN)).astype(np.float32)
    expected = _run(model, x)
    assert pack_matmuls(model) == 1
    assert "Add" not in _op_types(model)
    for got, want in zip(_run(model, x), expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_residual_add_and_rms_norm_become_skip_simplified_layer_normalization():
    rng = np.random.default_rng(2)
    scale = rng.standard_normal(HIDDEN).astype(np.float32)
    nodes = [
        helper.make_node("Relu", ["x"], ["residual"]),
        helper.make_node("Add", ["x", "residual"], ["sum"]),
        helper.make_node("RMSNormalization", ["sum", "scale"], ["normed"], axis=-1, epsilon=1e-6),
        helper.make_node("Neg", ["sum"], ["next"]),
    ]
    model = _model(nodes, {"scale": scale}, ["normed", "next"])
    x = rng.standard_normal((2, 3, HIDDEN)).astype(np.float32)
    expected = _run(model, x)
    assert fuse_skip_rms_norm(model) == 1
    assert "SkipSimplifiedLayerNormalization" in _op_types(model) and "RMSNormalization" not in _op_types(model)
    for got, want in zip(_run(model, x), expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_rms_norm_of_an_add_with_broadcasting_is_left_alone():
    scale = np.ones(HIDDEN, np.float32)
    nodes = [
        helper.make_node("Add", ["x", "row"], ["sum"]),
        helper.make_node("RMSNormalization", ["sum", "scale"], ["normed"], axis=-1),
    ]
    model = _model(nodes, {"scale": scale, "row": np.ones(HIDDEN, np.float32)}, ["normed"])
    assert fuse_skip_rms_norm(model) == 0
    assert _op_types(model) == ["Add", "RMSNormalization"]


def test_graph_without_the_decoder_inputs_gets_no_attention_rewrite():
    model = _model([helper.make_node("Relu", ["x"], ["y"])], {}, ["y"])
    counts = fuse_decoder(model, "attention_mask", "past_sequence_length", "inputs_embeds")
    assert counts == {"packed_matmuls": 0, "skip_rms_norms": 0, "rotary_embeddings": 0, "group_query_attentions": 0}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2_vl", "orion_qwen2_vl"])
def test_qwen_decoders_export_with_fused_attention_and_packed_projections(name):
    out_dir = tiny_export(name)
    manifest = json.loads((out_dir / "manifest.json").read_text())
    layers = manifest["decoder"]["num_layers"]
    decoder = onnx.load(str(out_dir / "decoder.onnx"), load_external_data=False)
    op_types = _op_types(decoder)
    assert op_types.count("GroupQueryAttention") == layers
    assert manifest["graphs"]["decoder"]["fusions"]["group_query_attentions"] == layers
    # Per layer: query, key and value in one MatMul, the output projection, gate and up in one, down; the LM head.
    assert op_types.count("MatMul") == 4 * layers + 1
    assert "Attention" not in op_types and "ScatterND" not in op_types
