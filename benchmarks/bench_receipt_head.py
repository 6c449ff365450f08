"""Cost of the receipt classification head on Mllama, and memory of quantized loading.

1. Latency: ReceiptVLClassifier with `pooling="vision"` and `pooling="multimodal"` against the bare
   `MllamaForConditionalGeneration` forward, all three on the same inputs (tiled images + a prompt) and the same
   backbone weights, alternating every repeat in one process. Also counts the text decoder's calls under
   `pooling="vision"` (a forward hook): it must be 0.
2. Memory: the classifier (`pooling="multimodal"`, so that the decoder runs) saved with random weights, then loaded
   in full precision, with an 8-bit decoder and with a 4-bit NF4 decoder (the model's default skip list): measured
   parameter bytes next to the formulas of `receipt_memory_table.py`, and images/s of each. On CUDA also the peak
   GPU memory of a forward and of one QLoRA training step (NF4 base, LoRA on the decoder, head trained, AdamW).

    python benchmarks/bench_receipt_head.py                          # the BENCHMARKS.md configuration (CPU)
    python benchmarks/bench_receipt_head.py --device cuda --dtype bfloat16 --real_size   # Llama-3.2-11B-Vision
"""

import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import bitsandbytes as bnb
import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from receipt_memory_table import parameter_bytes
from transformers import BitsAndBytesConfig, HfArgumentParser, MllamaConfig, MllamaForConditionalGeneration

from vlmheads import ReceiptVLClassifier, ReceiptVLConfig
from vlmheads.offline import public_config


@dataclass
class BenchmarkArguments:
    hidden_size: int = field(default=512)
    num_layers: int = field(default=8, metadata={"help": "Decoder layers; the last one cross-attends."})
    vision_hidden_size: int = field(default=128)
    vision_layers: int = field(default=4)
    image_size: int = field(default=56, metadata={"help": "Tile size in pixels (patch 14)."})
    vocab_size: int = field(default=16000)
    real_size: bool = field(default=False, metadata={"help": "The Llama-3.2-11B-Vision architecture instead."})
    batch_size: int = field(default=4)
    num_tiles: int = field(default=4)
    prompt_length: int = field(default=32)
    repeats: int = field(default=20)
    warmup: int = field(default=2)
    memory_repeats: int = field(default=3, metadata={"help": "Timed forwards per quantization mode."})
    skip_memory: bool = field(default=False)
    device: str = field(default="cpu")
    dtype: str = field(default="float32")
    seed: int = field(default=0)


def backbone_kwargs(args: BenchmarkArguments) -> dict:
    if args.real_size:
        return public_config("meta-llama/Llama-3.2-11B-Vision")
    heads = max(1, args.hidden_size // 64)
    return {
        "text_config": {
            "vocab_size": args.vocab_size,
            "hidden_size": args.hidden_size,
            "intermediate_size": 4 * args.hidden_size,
            "num_hidden_layers": args.num_layers,
            "num_attention_heads": heads,
            "num_key_value_heads": max(1, heads // 4),
            "cross_attention_layers": [args.num_layers - 1],
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 2,
        },
        "vision_config": {
            "image_size": args.image_size,
            "patch_size": 14,
            "hidden_size": args.vision_hidden_size,
            "intermediate_size": 4 * args.vision_hidden_size,
            "num_hidden_layers": args.vision_layers,
            "num_global_layers": 2,
            "attention_heads": max(1, args.vision_hidden_size // 64),
            "intermediate_layers_indices": [0, args.vision_layers - 1],
            "vision_output_dim": 3 * args.vision_hidden_size,
        },
        "image_token_index": args.vocab_size,
    }


def build_inputs(args: BenchmarkArguments, config: MllamaConfig) -> dict[str, torch.Tensor]:
    """`batch_size` one-image samples of `num_tiles` tiles and a prompt `<|image|> text…`."""
    generator = torch.Generator().manual_seed(args.seed)
    size = config.vision_config.image_size
    batch, tiles = args.batch_size, args.num_tiles
    input_ids = torch.randint(10, config.text_config.vocab_size, (batch, args.prompt_length), generator=generator)
    input_ids[:, 0] = config.image_token_index
    aspect_ratio_id = config.vision_config.supported_aspect_ratios.index([1, tiles]) + 1
    inputs = {
        "pixel_values": torch.randn(batch, 1, tiles, 3, size, size, generator=generator),
        "aspect_ratio_ids": torch.full((batch, 1), aspect_ratio_id),
        "aspect_ratio_mask": torch.ones(batch, 1, tiles, dtype=torch.long),
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "cross_attention_mask": torch.ones(batch, args.prompt_length, 1, tiles, dtype=torch.long),
    }
    dtype = getattr(torch, args.dtype)
    return {
        name: value.to(args.device, dtype if value.is_floating_point() else value.dtype)
        for name, value in inputs.items()
    }


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(run: Callable[[], object], device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - start


def latency(args: BenchmarkArguments) -> None:
    config = ReceiptVLConfig(**backbone_kwargs(args))
    torch.manual_seed(args.seed)
    # One set of weights serves all three runs, so that the real-size model fits one GPU once.
    model = ReceiptVLClassifier._from_config(config, dtype=getattr(torch, args.dtype)).to(args.device).eval()
    inputs = build_inputs(args, config)
    image_only = {name: inputs[name] for name in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}

    def classify(pooling: str, model_inputs: dict) -> Callable[[], object]:
        def run():
            model.config.pooling = pooling
            return model(**model_inputs)

        return run

    runs = {
        # The parent class's forward on the same module: exactly what the bare Mllama model computes.
        "MllamaForConditionalGeneration (bare)": lambda: MllamaForConditionalGeneration.forward(
            model, **inputs, use_cache=False
        ),
        'ReceiptVLClassifier pooling="vision"': classify("vision", image_only),
        'ReceiptVLClassifier pooling="multimodal"': classify("multimodal", inputs),
    }
    decoder_calls = {name: 0 for name in runs}
    current = []

    def count_decoder_call(*_):
        decoder_calls[current[-1]] += 1

    hook = model.model.language_model.register_forward_hook(count_decoder_call)
    times = {name: [] for name in runs}
    with torch.inference_mode():
        for _ in range(args.warmup):
            for name, run in runs.items():
                current.append(name)
                run()
        for repeat in range(args.repeats):
            order = list(runs.items())
            for name, run in order if repeat % 2 == 0 else order[::-1]:
                current.append(name)
                times[name].append(timed(run, args.device))
    hook.remove()

    tokens = args.num_tiles * ((config.vision_config.image_size // 14) ** 2 + 1)
    print(
        f"Latency: {'Llama-3.2-11B-Vision' if args.real_size else 'small Mllama'} (text hidden "
        f"{config.text_config.hidden_size}, {config.text_config.num_hidden_layers} layers, vision hidden "
        f"{config.vision_config.hidden_size}), batch {args.batch_size}, {args.num_tiles} tiles of "
        f"{config.vision_config.image_size} px ({tokens} vision tokens per image), prompt {args.prompt_length} "
        f"tokens, {args.device} {args.dtype}, median of {args.repeats} alternating repeats"
    )
    print("| model | forward ms (median) | forward ms (min) | images/s |\n|---|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {1000 * median:.2f} | {1000 * min(values):.2f} | {args.batch_size / median:.1f} |")
    bare_median = statistics.median(times["MllamaForConditionalGeneration (bare)"])
    for pooling in ("vision", "multimodal"):
        ratio = statistics.median(times[f'ReceiptVLClassifier pooling="{pooling}"']) / bare_median
        print(f"time ratio ({pooling} pooling / bare Mllama, medians): {ratio:.3f}")
    calls = ", ".join(f"{name}: {count}" for name, count in decoder_calls.items())
    print(f"text decoder calls in {args.warmup + args.repeats} forwards each: {calls}")


def measured_parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters as stored, with the quantization state bitsandbytes keeps beside them."""
    total = 0
    for parameter in model.parameters():
        total += parameter.numel() * parameter.element_size()
        if isinstance(parameter, bnb.nn.Int8Params) and parameter.SCB is not None:
            total += parameter.SCB.numel() * parameter.SCB.element_size()
        state = getattr(parameter, "quant_state", None)
        if state is not None:
            tensors = [state.absmax, state.code, state.offset]
            if state.nested:
                tensors += [state.state2.absmax, state.state2.code]
            total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
    return total


def qlora_step(model: torch.nn.Module, inputs: dict) -> None:
    """One training step of the QLoRA recipe: adapters on the decoder, the head trained, AdamW."""
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, **ReceiptVLClassifier.lora_config_kwargs()))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    labels = torch.zeros(inputs["pixel_values"].shape[0], dtype=torch.long, device=inputs["pixel_values"].device)
    model(**inputs, labels=labels).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def memory(args: BenchmarkArguments) -> None:
    # Multimodal pooling runs the (quantized) decoder, and gives the QLoRA adapters a gradient.
    config = ReceiptVLConfig(**backbone_kwargs(args), pooling="multimodal")
    dtype = getattr(torch, args.dtype)
    with torch.device("meta"):
        meta_model = ReceiptVLClassifier(config)
    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    modes = {
        "full": None,
        "8bit": BitsAndBytesConfig(load_in_8bit=True),
        "4bit": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        ),
    }
    cuda = args.device.startswith("cuda")
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(args.seed)
        ReceiptVLClassifier._from_config(config, dtype=dtype).save_pretrained(folder)
        print(
            f"\nMemory: {config.pooling} pooling, weights loaded from a saved random checkpoint, {args.device} "
            f"{args.dtype}; estimate = receipt_memory_table.py formulas on the meta-device model"
        )
        print(
            "| loading | parameter memory MB (measured) | estimate MB | images/s | peak GPU MB (load + forward) |"
            "\n|---|---|---|---|---|"
        )
        for mode, quantization in modes.items():
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            model = load(folder, quantization, dtype, args.device)
            # Measured before any forward: on the CPU, bitsandbytes repacks 4-bit weights at the first eval forward.
            measured = measured_parameter_bytes(model)
            estimate = parameter_bytes(meta_model, mode, dtype_bytes)
            inputs = build_inputs(args, config)
            with torch.inference_mode():
                forward = partial(model, **inputs)
                forward()
                seconds = statistics.median(timed(forward, args.device) for _ in range(args.memory_repeats))
            peak = f"{torch.cuda.max_memory_allocated() / 1e6:.0f}" if cuda else "n/a (CPU)"
            label = {"full": f"full precision ({args.dtype})", "8bit": "8-bit decoder", "4bit": "4-bit NF4 decoder"}
            print(
                f"| {label[mode]} | {measured / 1e6:.3f} | {estimate / 1e6:.3f} | "
                f"{args.batch_size / seconds:.1f} | {peak} |"
            )
            del model, forward
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        # A fresh 4-bit model: the CPU-repacked weights of an eval forward have no backward in bitsandbytes 0.50.
        qlora_step(load(folder, modes["4bit"], dtype, args.device), build_inputs(args, config))
        qlora_peak = f"{torch.cuda.max_memory_allocated() / 1e6:.0f} MB" if cuda else "n/a on the CPU"
        print(f"one QLoRA training step (batch {args.batch_size}), peak GPU memory: {qlora_peak}")


def load(folder: str, quantization: BitsAndBytesConfig | None, dtype: torch.dtype, device: str) -> ReceiptVLClassifier:
    return ReceiptVLClassifier.from_pretrained(
        folder, quantization_config=quantization, dtype=dtype, device_map=device
    ).eval()


def main() -> None:
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses()
    latency(args)
    if not args.skip_memory:
        memory(args)


if __name__ == "__main__":
    main()
