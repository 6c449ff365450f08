"""ONNX Runtime (`vlmheads.onnx_export.OnnxVLM`) vs PyTorch eager `generate` on the CPU, on one small random Qwen2-VL.

The model is built in code with random weights: text hidden 512, 8 layers, 8 attention heads (2 key/value heads,
as Qwen2-VL-2B uses grouped-query attention), vocabulary 32,000; a small vision tower (depth 4, width 256, 4 heads)
reads one 448 x 448 image = 1,024 patches = 256 image tokens. The prompt is text, the image, text.

- prefill: median time of `generate(max_new_tokens=1)` (vision tower, embedding, first decoder pass, one token);
- decode per token: (median time with N new tokens - prefill) / (N - 1), both with the KV cache;
- vision: the vision tower alone on the image.
PyTorch runs `model.generate(..., do_sample=False)`; ONNX Runtime runs `OnnxVLM.generate` on the export of the same
model (fp32), and again with the dynamically quantized int8 decoder (`vlmheads.onnx_export.quantize`), whose top-1
agreement with the fp32 decoder (teacher-forced, over a fixed prompt set) is printed too.

    python benchmarks/bench_onnx.py --threads 2
"""

import argparse
import functools
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor

from vlmheads.offline.configs import tiny_qwen2_vl_kwargs
from vlmheads.onnx_export import OnnxVLM, export_onnx
from vlmheads.onnx_export.quantize import int8_vlm, quantize_decoder, token_prompts, top1_agreement


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--vision-depth", type=int, default=4)
    parser.add_argument("--vision-width", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=448, help="side of the square image, a multiple of 28")
    parser.add_argument("--text-tokens", type=int, default=32, help="text tokens around the image")
    parser.add_argument("--new-tokens", type=int, default=32, help="N: tokens generated for the decode timing")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads and ONNX Runtime intra-op threads")
    parser.add_argument("--no-int8", action="store_true", help="skip the int8 decoder")
    parser.add_argument("--out-dir", type=Path, default=None, help="where to export (default: a temporary folder)")
    return parser.parse_args(argv)


def small_model(args: argparse.Namespace) -> Qwen2VLForConditionalGeneration:
    """The random Qwen2-VL of the benchmark; it never stops early (no end-of-sequence token)."""
    kwargs = tiny_qwen2_vl_kwargs(args.vocab_size, args.hidden_size, args.layers)
    half_head = args.hidden_size // args.heads // 2
    # Qwen2-VL's split of the rotary dimensions over (temporal, height, width): [16, 24, 24] of 64.
    spatial = 3 * half_head // 8
    kwargs["text_config"].update(
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        intermediate_size=3 * args.hidden_size,
        rope_parameters={"rope_type": "default", "mrope_section": [half_head - 2 * spatial, spatial, spatial]},
        eos_token_id=None,
    )
    kwargs["vision_config"].update(depth=args.vision_depth, embed_dim=args.vision_width, num_heads=4)
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(**kwargs)).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def prompt_inputs(model: Qwen2VLForConditionalGeneration, args: argparse.Namespace) -> dict[str, np.ndarray]:
    """Token ids `text <vision_start> <image_pad> * T <vision_end> text` and the image's pixel values, as the Qwen
    processor would return them."""
    config = model.config
    side = args.image_size
    processor = Qwen2VLImageProcessor(min_pixels=side * side, max_pixels=side * side)
    image = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    pixels = processor(images=[image], return_tensors="np")
    grid = pixels["image_grid_thw"]
    image_tokens = int(grid.prod()) // config.vision_config.spatial_merge_size**2
    text = np.random.default_rng(1).integers(10, args.vocab_size, args.text_tokens)
    half = args.text_tokens // 2
    image_ids = [config.vision_start_token_id, *[config.image_token_id] * image_tokens, config.vision_end_token_id]
    input_ids = np.concatenate([text[:half], image_ids, text[half:]])[None].astype(np.int64)
    return {
        "input_ids": input_ids,
        "attention_mask": np.ones_like(input_ids),
        "mm_token_type_ids": (input_ids == config.image_token_id).astype(np.int64),
        "pixel_values": pixels["pixel_values"],
        "image_grid_thw": grid,
    }


def interleaved_medians(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each run. After one warm-up each, the runs take turns, `repeats` rounds, so that a CPU
    shared with other work slows all of them alike."""
    times = {name: [] for name in runs}
    for run in runs.values():
        run()
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.new_tokens < 2:
        raise ValueError(f"--new-tokens must be at least 2 to time decoding, got {args.new_tokens}.")
    torch.set_num_threads(args.threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1

    model = small_model(args)
    inputs = prompt_inputs(model, args)
    torch_inputs = {name: torch.from_numpy(value) for name, value in inputs.items()}
    scratch = tempfile.TemporaryDirectory()
    out_dir = args.out_dir or Path(scratch.name)
    start = time.perf_counter()
    export_onnx(model, None, out_dir, image_size=(args.image_size, args.image_size), dtype="float32")
    export_seconds = time.perf_counter() - start
    vlm = OnnxVLM(out_dir, session_options=options)

    def torch_generate(new_tokens: int) -> torch.Tensor:
        with torch.no_grad():
            return model.generate(**torch_inputs, max_new_tokens=new_tokens, do_sample=False)

    def onnx_generate(host: OnnxVLM) -> Callable[[int], np.ndarray]:
        return lambda new_tokens: host.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)

    def torch_vision() -> object:
        with torch.no_grad():
            return model.model.get_image_features(torch_inputs["pixel_values"], torch_inputs["image_grid_thw"])

    same_tokens = np.array_equal(torch_generate(args.new_tokens).numpy(), onnx_generate(vlm)(args.new_tokens))
    engines = {"torch": torch_generate, "fp32": onnx_generate(vlm)}
    agreement = None
    if not args.no_int8:
        quantize_decoder(out_dir)
        engines["int8"] = onnx_generate(int8_vlm(out_dir, session_options=options))
        agreement = top1_agreement(out_dir, token_prompts(out_dir, num_prompts=8, length=24), max_new_tokens=16)
    runs = {
        "torch vision": torch_vision,
        "fp32 vision": lambda: vlm.vision(inputs["pixel_values"], inputs["image_grid_thw"]),
    }
    for name, generate in engines.items():
        runs[f"{name} prefill"] = functools.partial(generate, 1)
        runs[f"{name} total"] = functools.partial(generate, args.new_tokens)
    medians = interleaved_medians(runs, args.repeats)
    prefill = {name: medians[f"{name} prefill"] for name in engines}
    decode = {name: (medians[f"{name} total"] - prefill[name]) / (args.new_tokens - 1) for name in engines}
    rows = {
        "prefill (ms)": list(prefill.values()),
        "decode per token (ms)": list(decode.values()),
        "vision tower (ms)": [medians["torch vision"], medians["fp32 vision"], *([None] * (len(engines) - 2))],
    }

    text = model.config.text_config
    vision = model.config.vision_config
    print(
        f"Qwen2-VL, random weights: text hidden {text.hidden_size}, {text.num_hidden_layers} layers, "
        f"{text.num_attention_heads} heads ({text.num_key_value_heads} kv), vocab {text.vocab_size}; vision depth "
        f"{vision.depth}, width {vision.embed_dim}; one {args.image_size}x{args.image_size} image "
        f"({int(inputs['mm_token_type_ids'].sum())} image tokens), prompt {inputs['input_ids'].shape[1]} tokens, "
        f"N = {args.new_tokens} new tokens, {args.threads} thread(s), median of {args.repeats}; "
        f"torch {torch.__version__}, onnxruntime {ort.__version__}; export {export_seconds:.0f} s"
    )
    header = ["", "PyTorch eager", "ORT fp32", "speed-up"] + ([] if args.no_int8 else ["ORT int8 decoder", "speed-up"])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, (torch_seconds, *onnx_seconds) in rows.items():
        cells = [name, f"{1000 * torch_seconds:.1f}"]
        for seconds in onnx_seconds:
            cells += (
                ["same graph", ""] if seconds is None else [f"{1000 * seconds:.1f}", f"{torch_seconds / seconds:.2f}x"]
            )
        print("| " + " | ".join(cells) + " |")
    print(f"greedy tokens identical (PyTorch vs ORT fp32, {args.new_tokens} new tokens): {same_tokens}")
    if agreement is not None:
        print(f"int8 vs fp32 decoder top-1 agreement (8 prompts x 16 positions, teacher-forced): {agreement:.3f}")
    scratch.cleanup()


if __name__ == "__main__":
    main()
