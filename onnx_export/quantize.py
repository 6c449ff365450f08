"""INT8 dynamic quantization of the exported decoder graph, and how often it agrees with the float decoder.

`quantize_decoder` stores the weights of the decoder's MatMuls with constant weights (the projections, the MLP and
the LM head) as int8 with one scale per output channel; activations are quantized on the fly at each call
(`onnxruntime.quantization.quantize_dynamic`). Attention's activation-by-activation MatMuls stay in float. The new
graph keeps the decoder's inputs and outputs and is listed in the manifest as `decoder_int8`.
"""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import QuantType, quantize_dynamic

from .manifest import read_manifest, write_manifest
from .runtime import OnnxVLM

INT8_DECODER = "decoder_int8"
WEIGHT_TYPES = {"qint8": QuantType.QInt8, "quint8": QuantType.QUInt8}


def quantize_decoder(out_dir: Path, weight_type: str = "qint8", per_channel: bool = True) -> Path:
    """Writes `out_dir/decoder_int8.onnx`, the manifest's `decoder` graph with int8 MatMul weights, and adds it to
    the manifest as `decoder_int8`; returns its path. `weight_type`: "qint8" or "quint8"."""
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"weight_type must be one of {sorted(WEIGHT_TYPES)}, got {weight_type!r}.")
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    if "decoder" not in manifest["graphs"]:
        raise ValueError(
            f"The export in {out_dir} has no decoder graph (graphs: {sorted(manifest['graphs'])}): only "
            "Qwen2-VL / Qwen2.5-VL / Orion exports have one."
        )
    decoder = manifest["graphs"]["decoder"]
    source = out_dir / decoder["file"]
    target = out_dir / f"{INT8_DECODER}.onnx"
    external = bool(decoder.get("external_data"))
    quantize_dynamic(
        source,
        target,
        op_types_to_quantize=["MatMul"],
        per_channel=per_channel,
        weight_type=WEIGHT_TYPES[weight_type],
        use_external_data_format=external,
        extra_options={"MatMulConstBOnly": True},
    )
    graph = onnx.load(str(target), load_external_data=False)
    external_files = sorted(
        {item.value for tensor in graph.graph.initializer for item in tensor.external_data if item.key == "location"}
    )
    manifest["graphs"][INT8_DECODER] = {
        **decoder,
        "file": target.name,
        "external_data": external_files,
        "quantization": {
            "method": "onnxruntime dynamic quantization of constant-weight MatMuls",
            "weight_type": weight_type,
            "per_channel": per_channel,
            "source": decoder["file"],
        },
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
    out_dir: Path, prompts: list[dict], max_new_tokens: int = 8, providers: list[str] | None = None
) -> float:
    """Fraction of positions at which `decoder_int8` and the float `decoder` pick the same top-1 token.

    Each prompt (a dict of `OnnxVLM.prefill` inputs) is decoded greedily for `max_new_tokens` steps by the float
    decoder; the int8 decoder is fed the same tokens (teacher forcing), so every step compares both decoders'
    argmax on the same context. Positions: prompts × rows × `max_new_tokens`.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    reference = OnnxVLM(out_dir, providers)
    quantized = int8_vlm(out_dir, providers)
    agreeing = total = 0
    for prompt in prompts:
        reference_state, quantized_state = reference.prefill(**prompt), quantized.prefill(**prompt)
        for step in range(max_new_tokens):
            reference_top = reference_state.logits.argmax(axis=-1)
            agreeing += int((quantized_state.logits.argmax(axis=-1) == reference_top).sum())
            total += reference_top.size
            if step < max_new_tokens - 1:
                reference_state = reference.decode(reference_state, reference_top)
                quantized_state = quantized.decode(quantized_state, reference_top)
    return agreeing / total
