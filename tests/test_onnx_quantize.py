"""INT8 dynamic quantization of the exported decoder: the new graph, its manifest entry, and top-1 agreement."""

import shutil

import numpy as np
import onnx
import pytest
from onnx_helpers import tiny_export
from receipt_helpers import make_model, make_processor

from vlmheads.onnx_export import OnnxVLM, export_onnx
from vlmheads.onnx_export.manifest import read_manifest
from vlmheads.onnx_export.quantize import int8_vlm, quantize_decoder, token_prompts, top1_agreement

# The shared tiny export takes about 25 s on one core when no other test has built it yet.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quantized_export(tmp_path_factory):
    """A copy of the shared tiny Qwen2-VL export (the shared one stays unchanged), with its int8 decoder."""
    out_dir = tmp_path_factory.mktemp("quantized") / "export"
    shutil.copytree(tiny_export("qwen2_vl"), out_dir)
    return out_dir, quantize_decoder(out_dir)


def test_int8_decoder_graph_and_manifest_entry(quantized_export):
    out_dir, path = quantized_export
    manifest = read_manifest(out_dir)
    decoder, int8 = manifest["graphs"]["decoder"], manifest["graphs"]["decoder_int8"]
    assert int8["file"] == path.name == "decoder_int8.onnx"
    assert int8["inputs"] == decoder["inputs"] and int8["outputs"] == decoder["outputs"]
    assert int8["quantization"]["source"] == decoder["file"]
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops
    assert path.stat().st_size < 0.6 * (out_dir / decoder["file"]).stat().st_size


@pytest.mark.floors  # quantize_dynamic on the decoder: onnxruntime>=1.32
def test_int8_decoder_is_close_to_float_decoder(quantized_export):
    out_dir, _ = quantized_export
    prompt = token_prompts(out_dir, num_prompts=1)[0]
    reference = OnnxVLM(out_dir).prefill(**prompt).logits
    quantized = int8_vlm(out_dir).prefill(**prompt).logits
    difference = np.abs(quantized - reference).max()
    assert 0 < difference < 0.1 * np.abs(reference).max()
    agreement = top1_agreement(out_dir, token_prompts(out_dir, num_prompts=3, length=12), max_new_tokens=6)
    print(f"int8 vs float32 decoder top-1 agreement: {agreement:.3f}")
    assert 0.8 <= agreement <= 1.0


def test_token_prompts_avoid_special_tokens(quantized_export):
    out_dir, _ = quantized_export
    manifest = read_manifest(out_dir)
    prompts = token_prompts(out_dir, num_prompts=5, length=20, seed=3)
    ids = np.concatenate([prompt["input_ids"] for prompt in prompts])
    assert ids.shape == (5, 20)
    assert ids.max() < manifest["decoder"]["vocab_size"]
    special = [manifest["token_ids"][name] for name in ("image", "video", "vision_start")]
    assert not np.isin(ids, special).any()
    np.testing.assert_array_equal(ids, np.concatenate([p["input_ids"] for p in token_prompts(out_dir, 5, 20, 3)]))


def test_bad_requests_are_rejected(quantized_export, tmp_path):
    out_dir, _ = quantized_export
    with pytest.raises(ValueError, match="weight_type must be one of"):
        quantize_decoder(out_dir, weight_type="int4")
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        top1_agreement(out_dir, token_prompts(out_dir, 1), max_new_tokens=0)
    unquantized = tmp_path / "unquantized"
    shutil.copytree(tiny_export("qwen2_vl"), unquantized)
    with pytest.raises(ValueError, match="has no decoder_int8 graph: run quantize_decoder"):
        int8_vlm(unquantized)
    processor = make_processor()
    export_onnx(make_model(processor, pooling="vision"), processor, tmp_path / "classifier", image_size=(48, 40))
    with pytest.raises(ValueError, match="has no decoder graph"):
        quantize_decoder(tmp_path / "classifier")


@pytest.fixture(scope="module")
def int4_export(quantized_export):
    """The same copy with two 4-bit decoders: RTN with a float LM head, then HQQ over it with an int4 LM head."""
    out_dir, _ = quantized_export
    rtn = quantize_decoder(out_dir, bits=4, block_size=32, accuracy_level=4, quantize_lm_head=False)
    rtn_ops = [node.op_type for node in onnx.load(str(rtn)).graph.node]
    hqq = quantize_decoder(out_dir, bits=4, block_size=16, algorithm="hqq")
    return out_dir, rtn_ops, hqq


def test_int4_decoder_uses_matmul_nbits_and_keeps_the_lm_head_float_when_asked(int4_export):
    out_dir, rtn_ops, hqq = int4_export
    manifest = read_manifest(out_dir)
    int4 = manifest["graphs"]["decoder_int4"]
    assert int4["inputs"] == manifest["graphs"]["decoder"]["inputs"]
    assert int4["quantization"]["algorithm"] == "hqq" and int4["quantization"]["block_size"] == 16
    hqq_graph = onnx.load(str(hqq)).graph
    nbits = [node for node in hqq_graph.node if node.op_type == "MatMulNBits"]
    assert nbits and all(
        {attr.name: onnx.helper.get_attribute_value(attr) for attr in node.attribute}["accuracy_level"] == 4
        for node in nbits
    )
    # With a float LM head, exactly one constant-weight MatMul (hidden x vocab) is left in float.
    assert "MatMulNBits" in rtn_ops
    assert rtn_ops.count("MatMul") == len([op for op in hqq_graph.node if op.op_type == "MatMul"]) + 1


def test_int4_decoder_generates_close_to_the_float_decoder(int4_export):
    out_dir, _, _ = int4_export
    prompt = token_prompts(out_dir, num_prompts=1)[0]
    reference = OnnxVLM(out_dir).prefill(**prompt).logits
    quantized = OnnxVLM(out_dir, decoder="decoder_int4").prefill(**prompt).logits
    difference = np.abs(quantized - reference).max()
    assert 0 < difference < 0.2 * np.abs(reference).max()
    agreement = top1_agreement(out_dir, token_prompts(out_dir, 3, 12), max_new_tokens=6, decoder="decoder_int4")
    print(f"int4 vs float32 decoder top-1 agreement: {agreement:.3f}")
    assert 0.6 <= agreement <= 1.0


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"bits": 3}, "bits must be one of"),
        ({"bits": 4, "algorithm": "gptq"}, "algorithm must be one of"),
        ({"bits": 4, "block_size": 24}, "block_size must be a power of two"),
        ({"bits": 4, "accuracy_level": 7}, "accuracy_level must be 0-4"),
    ],
)
def test_bad_int4_settings_are_rejected(quantized_export, settings, message):
    with pytest.raises(ValueError, match=message):
        quantize_decoder(quantized_export[0], **settings)
