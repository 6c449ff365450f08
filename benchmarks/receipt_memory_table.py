"""Parameter memory of ReceiptVLClassifier on the real Llama-3.2-11B-Vision architecture, without any weights.

The model is built from the public `config.json` on the `meta` device. Each weight's bytes follow from how it is
stored: bf16 (2 bytes), LLM.int8 (1 byte + one fp32 scale per output row) or 4-bit NF4 with double quantization
(half a byte + one uint8 absmax per 64 weights + one fp32 per 256 blocks + the fixed code tables), applied to the
`nn.Linear` layers that bitsandbytes replaces under the model's default skip list (transformers' own matching).
`bench_receipt_head.py` checks these formulas against models really loaded in 8-bit and 4-bit.

Trainable parameters: the whole model for full fine-tuning; LoRA adapters on the decoder's q/v projections plus
the head (`modules_to_save`) for LoRA and QLoRA, counted by peft itself. Training memory adds, per trainable
parameter, a bf16 gradient and fp32 AdamW moments (10 bytes); activations are not counted.

    python benchmarks/receipt_memory_table.py
"""

import math
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import HfArgumentParser
from transformers.quantizers.quantizers_utils import should_convert_module

from vlmheads import ReceiptVLClassifier, ReceiptVLConfig
from vlmheads.offline import public_config

GB = 1e9
TRAINING_BYTES_PER_TRAINABLE = 2 + 8  # bf16 gradient, fp32 AdamW m and v
SEED_CLAIM_GB = 40


@dataclass
class MemoryArguments:
    repo_id: str = field(default="meta-llama/Llama-3.2-11B-Vision", metadata={"help": "A stored public config."})
    lora_r: int = field(default=8)
    pooling: str = field(default="vision")


def quantized_linears(model: nn.Module, skip_modules: list[str]) -> dict[str, nn.Linear]:
    """The `nn.Linear` layers bitsandbytes replaces, by full name, under `skip_modules`."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and should_convert_module(name, skip_modules)
    }


def quantized_weight_bytes(weight_shape: torch.Size, mode: str, double_quant: bool = True) -> int:
    """Bytes bitsandbytes keeps for one `(out, in)` Linear weight: the packed weight and its quantization state."""
    out_features, in_features = weight_shape
    count = out_features * in_features
    if mode == "8bit":
        return count + 4 * out_features  # int8 weight + fp32 scale per row (SCB)
    blocks = math.ceil(count / 64)
    packed = math.ceil(count / 2) + 16 * 4  # two 4-bit codes per byte + the 16-entry fp32 NF4 code
    if double_quant:
        return packed + blocks + 4 * math.ceil(blocks / 256) + 256 * 4 + 4  # uint8 absmax, fp32 absmax2, code, offset
    return packed + 4 * blocks  # fp32 absmax per block


def parameter_bytes(model: nn.Module, mode: str, dtype_bytes: int = 2, double_quant: bool = True) -> int:
    """Bytes of the parameters of `model` loaded in `mode` ("full", "8bit" or "4bit"), non-quantized ones taking
    `dtype_bytes` each, under the model's default quantization skip list."""
    quantized = {} if mode == "full" else quantized_linears(model, list(model.quantization_skip_modules))
    total = 0
    for name, parameter in model.named_parameters():
        module_name, _, kind = name.rpartition(".")
        if module_name in quantized and kind == "weight":
            total += quantized_weight_bytes(parameter.shape, mode, double_quant)
        else:
            total += parameter.numel() * dtype_bytes
    return total


def lora_trainable_parameters(model: nn.Module, r: int) -> int:
    """Trainable parameters of `model` under the package's LoRA recipe (decoder q/v adapters + the head)."""
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, **ReceiptVLClassifier.lora_config_kwargs()))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    peft_model.unload()
    return trainable


def memory_rows(model: nn.Module, lora_r: int) -> list[tuple[str, float, int]]:
    """(setting, parameter memory in bytes, trainable parameters) for inference and fine-tuning settings."""
    total = sum(p.numel() for p in model.parameters())
    lora = lora_trainable_parameters(model, lora_r)
    full, int8, nf4 = (parameter_bytes(model, mode) for mode in ("full", "8bit", "4bit"))
    return [
        ("inference, bf16", full, 0),
        ("inference, 8-bit (LLM.int8) decoder", int8, 0),
        ("inference, 4-bit NF4 decoder", nf4, 0),
        ("full fine-tuning, bf16", full, total),
        (f"LoRA r={lora_r}, bf16 base", full, lora),
        (f"QLoRA r={lora_r}, NF4 base", nf4, lora),
    ]


def main() -> None:
    (args,) = HfArgumentParser(MemoryArguments).parse_args_into_dataclasses()
    config = ReceiptVLConfig(**public_config(args.repo_id), pooling=args.pooling)
    with torch.device("meta"):
        model = ReceiptVLClassifier(config)
    total = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for p in model.classifier.parameters())
    quantized = quantized_linears(model, list(model.quantization_skip_modules))
    quantized_count = sum(module.weight.numel() for module in quantized.values())
    print(
        f"{args.repo_id} + ReceiptVLClassifier head: {total:,} parameters ({head:,} in the head); "
        f"{len(quantized)} decoder Linear layers with {quantized_count:,} weights are quantized, "
        f"skip list {list(model.quantization_skip_modules)}"
    )
    print(
        "| setting | parameter memory (GB) | trainable parameters | + gradients and AdamW states (GB) |\n"
        "|---|---|---|---|"
    )
    rows = memory_rows(model, args.lora_r)
    for setting, weights, trainable in rows:
        training = weights + trainable * TRAINING_BYTES_PER_TRAINABLE
        print(f"| {setting} | {weights / GB:.2f} | {trainable:,} | {training / GB:.2f} |")
    full, int8 = rows[0][1], rows[1][1]
    full_training = full + total * TRAINING_BYTES_PER_TRAINABLE
    print(
        f'Seed claim "~{SEED_CLAIM_GB} GB GPU memory minimum, requires 8-bit": the 8-bit weights take '
        f"{int8 / GB:.1f} GB, but bf16 weights ({full / GB:.1f} GB) already fit {SEED_CLAIM_GB} GB without "
        f"quantization, and full fine-tuning ({full_training / GB:.0f} GB before activations) fits in neither; "
        f"LoRA and QLoRA do. The claim does not hold."
    )


if __name__ == "__main__":
    main()
