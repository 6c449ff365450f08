"""Weight quantization of the exported decoder graph, and how often it agrees with the float decoder.

`quantize_decoder(out_dir, bits=8)`: the weights of the decoder's MatMuls with constant weights (the projections,
the MLP and the LM head) as int8 with one scale per output channel; activations are quantized on the fly at each
call (`onnxruntime.quantization.quantize_dynamic`). Listed in the manifest as `decoder_int8`.

`quantize_decoder(out_dir, bits=4, block_size=32, accuracy_level=4)`: the same MatMuls become ONNX Runtime's
`MatMulNBits` (4-bit weights with one scale and zero point per `block_size` inputs, `MatMulNBitsQuantizer`), the
format the ONNX Runtime GenAI model builder writes. `algorithm`: "rtn" (round to nearest, ONNX Runtime's default
block quantizer) or "hqq" (half-quadratic quantization, ONNX Runtime's `HQQWeightOnlyQuantConfig`; needs torch at
quantization time). `accuracy_level=4` lets the CPU kernel quantize activations to int8 blockwise and run int8 dot
products. `quantize_lm_head=False` keeps the LM head in float. Listed as `decoder_int4`.

Attention's activation-by-activation MatMuls stay in float. The new graph keeps the decoder's inputs and outputs;
it is written under a temporary name and renamed, then the manifest is rewritten (`write_manifest`, also atomic).
"""

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import QuantType, quantize_dynamic

from .manifest import read_manifest, write_manifest
from .runtime import LOGITS_OUTPUT, OnnxVLM

INT8_DECODER = "decoder_int8"
INT4_DECODER = "decoder_int4"
QUANTIZED_DECODERS = {8: INT8_DECODER, 4: INT4_DECODER}
WEIGHT_TYPES = {"qint8": QuantType.QInt8, "quint8": QuantType.QUInt8}
INT4_ALGORITHMS = ("rtn", "hqq")


def lm_head_matmuls(model: onnx.ModelProto, vocab_size: int) -> list[str]:
    """Names of the LM head's MatMul: the constant-weight (hidden, `vocab_size`) MatMul the `logits` output is
    computed from (found backwards from it, so that a packed projection of the same width is never taken)."""
    shapes = {tensor.name: tuple(tensor.dims) for tensor in model.graph.initializer}
    producers = {name: node for node in model.graph.node for name in node.output}
    name = LOGITS_OUTPUT
    while name in producers:
        node = producers[name]
        if node.op_type == "MatMul" and len(shapes.get(node.input[1], ())) == 2:
            return [node.name] if shapes[node.input[1]][1] == vocab_size else []
        name = node.input[0]
    return []


def _int4_model(
    source: Path, block_size: int, accuracy_level: int, algorithm: str, exclude: list[str]
) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    if algorithm == "hqq":
        config = HQQWeightOnlyQuantConfig(block_size=block_size, bits=4)
    else:
        config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=False, accuracy_level=accuracy_level)
    quantizer = MatMulNBitsQuantizer(
        onnx.load(str(source)),
        bits=4,
        block_size=block_size,
        is_symmetric=False,
        accuracy_level=accuracy_level,
        nodes_to_exclude=exclude,
        algo_config=config,
    )
    quantizer.process()
    model = quantizer.model.model
    if algorithm == "hqq":
        # HQQ's config has no accuracy level: set it on the nodes it wrote.
        for node in model.graph.node:
            if node.op_type == "MatMulNBits":
                node.attribute.append(onnx.helper.make_attribute("accuracy_level", accuracy_level))
    return model


def quantize_decoder(
    out_dir: Path,
    weight_type: str = "qint8",
    per_channel: bool = True,
    bits: int = 8,
    block_size: int = 32,
    accuracy_level: int = 4,
    algorithm: str = "rtn",
    quantize_lm_head: bool = True,
) -> Path:
    """Writes the manifest's `decoder` graph with quantized MatMul weights beside it and adds it to the manifest
    (`decoder_int8` or `decoder_int4`, see the module docstring); returns its path.

    `bits=8`: `weight_type` ("qint8" or "quint8") and `per_channel` apply. `bits=4`: `block_size` (a power of two,
    at least 16), `accuracy_level` (0-4, ONNX Runtime's `MatMulNBits` attribute), `algorithm` ("rtn" or "hqq") and
    `quantize_lm_head` apply.
    """
    if bits not in QUANTIZED_DECODERS:
        raise ValueError(f"bits must be one of {sorted(QUANTIZED_DECODERS)}, got {bits!r}.")
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"weight_type must be one of {sorted(WEIGHT_TYPES)}, got {weight_type!r}.")
    if bits == 4:
        if algorithm not in INT4_ALGORITHMS:
            raise ValueError(f"algorithm must be one of {INT4_ALGORITHMS} for 4-bit weights, got {algorithm!r}.")
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two of at least 16, got {block_size}.")
        if accuracy_level not in range(5):
            raise ValueError(f"accuracy_level must be 0-4 (ONNX Runtime's MatMulNBits), got {accuracy_level}.")
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    if "decoder" not in manifest["graphs"]:
        raise ValueError(
            f"The export in {out_dir} has no decoder graph (graphs: {sorted(manifest['graphs'])}): only "
            "text-generating exports have one."
        )
    name = QUANTIZED_DECODERS[bits]
    decoder = manifest["graphs"]["decoder"]
    source = out_dir / decoder["file"]
    target = out_dir / f"{name}.onnx"
    scratch = out_dir / f".{name}.partial.onnx"
    external = bool(decoder.get("external_data"))
    if bits == 8:
        quantize_dynamic(
            source,
            scratch,
            op_types_to_quantize=["MatMul"],
            per_channel=per_channel,
            weight_type=WEIGHT_TYPES[weight_type],
            use_external_data_format=external,
            extra_options={"MatMulConstBOnly": True},
        )
        quantization = {
            "method": "onnxruntime dynamic quantization of constant-weight MatMuls",
            "weight_type": weight_type,
            "per_channel": per_channel,
        }
    else:
        exclude = (
            [] if quantize_lm_head else lm_head_matmuls(onnx.load(str(source)), manifest["decoder"]["vocab_size"])
        )
        model = _int4_model(source, block_size, accuracy_level, algorithm, exclude)
        onnx.save_model(
            model,
            str(scratch),
            save_as_external_data=external,
            all_tensors_to_one_file=True,
            location=f"{name}.onnx.data",
        )
        quantization = {
            "method": "onnxruntime MatMulNBits (MatMulNBitsQuantizer)",
            "bits": 4,
            "block_size": block_size,
            "accuracy_level": accuracy_level,
            "algorithm": algorithm,
            "lm_head": "int4" if quantize_lm_head else "float",
        }
    os.replace(scratch, target)
    graph = onnx.load(str(target), load_external_data=False)
    external_files = sorted(
        {item.value for tensor in graph.graph.initializer for item in tensor.external_data if item.key == "location"}
    )
    manifest["graphs"][name] = {
        **decoder,
        "file": target.name,
        "external_data": external_files,
        "quantization": {**quantization, "source": decoder["file"]},
    }
    write_manifest(out_dir, manifest)
    return target


def int8_vlm(
    out_dir: Path, providers: list[str] | None = None, session_options: ort.SessionOptions | None = None
) -> OnnxVLM:
    """An `OnnxVLM` of the export in `out_dir` that runs `decoder_int8` in place of the float decoder."""
    if INT8_DECODER not in read_manifest(out_dir)["graphs"]:
        raise ValueError(f"{out_dir} has no {INT8_DECODER} graph: run quantize_decoder({str(out_dir)!r}) first.")
    return OnnxVLM(out_dir, providers, session_options, decoder=INT8_DECODER)


def token_prompts(out_dir: Path, num_prompts: int = 4, length: int = 16, seed: int = 0) -> list[dict]:
    """A fixed set of text prompts for the export in `out_dir`: `num_prompts` dicts of `input_ids` (1, length) for
    `OnnxVLM.prefill`, random ids below the vocabulary size that are none of the manifest's special tokens."""
    manifest = read_manifest(out_dir)
    special = set()
    for token_id in manifest["token_ids"].values():
        special.update(token_id if isinstance(token_id, list) else [token_id])
    candidates = np.setdiff1d(np.arange(manifest["decoder"]["vocab_size"]), [i for i in special if i is not None])
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.choice(candidates, (1, length)).astype(np.int64)} for _ in range(num_prompts)]


def top1_agreement(
    out_dir: Path,
    prompts: list[dict],
    max_new_tokens: int = 8,
    providers: list[str] | None = None,
    decoder: str = INT8_DECODER,
    session_options: ort.SessionOptions | None = None,
) -> float:
    """Fraction of positions at which the quantized `decoder` ("decoder_int8" or "decoder_int4") and the float
    `decoder` pick the same top-1 token.

    Each prompt (a dict of `OnnxVLM.prefill` inputs) is decoded greedily for `max_new_tokens` steps by the float
    decoder; the int8 decoder is fed the same tokens (teacher forcing), so every step compares both decoders'
    argmax on the same context. Positions: prompts × rows × `max_new_tokens`. `session_options` go to both hosts.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    reference = OnnxVLM(out_dir, providers, session_options)
    quantized = OnnxVLM(out_dir, providers, session_options, decoder=decoder)
    agreeing = total = 0
    for prompt in prompts:
        reference_state = reference.prefill(**prompt, max_new_tokens=max_new_tokens)
        quantized_state = quantized.prefill(**prompt, max_new_tokens=max_new_tokens)
        for step in range(max_new_tokens):
            reference_top = reference_state.logits.argmax(axis=-1)
            agreeing += int((quantized_state.logits.argmax(axis=-1) == reference_top).sum())
            total += reference_top.size
            if step < max_new_tokens - 1:
                reference_state = reference.decode(reference_state, reference_top)
                quantized_state = quantized.decode(quantized_state, reference_top)
    return agreeing / total
