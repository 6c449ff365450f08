"""Aggregate decode throughput of a 2-stage pipeline: several requests in flight (micro-batches of one request,
so each stage works on a different request) against the same pipeline serving them one at a time.

A random Qwen2-VL text decoder big enough for compute to dominate communication (hidden 512, 8 layers, 1 CPU
thread per process) is saved once; `torchrun --standalone` then runs the pipeline's batch mode twice on the same
prompts, with `--max-active 1` and with `--max-active <requests>`, alternating, `rounds` times each; the best run
of each mode counts (the machine may be shared). Both modes must give the same tokens (greedy). The bound is the
number of stages (2x).

    python benchmarks/bench_pipeline.py                 # the BENCHMARKS.md configuration
    python benchmarks/bench_pipeline.py --num_stages 3 --num_requests 6
"""

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import HfArgumentParser, Qwen2VLConfig, Qwen2VLForConditionalGeneration

from vlmheads.offline.configs import tiny_qwen2_vl_kwargs


@dataclass
class BenchmarkArguments:
    hidden_size: int = field(default=512)
    num_layers: int = field(default=8)
    vocab_size: int = field(default=1024)
    num_stages: int = field(default=2)
    num_requests: int = field(default=4)
    prompt_length: int = field(default=32)
    max_new_tokens: int = field(default=64)
    threads: int = field(default=1, metadata={"help": "torch threads per process."})
    rounds: int = field(default=3, metadata={"help": "Runs of each mode, alternating; the best of each counts."})


def save_model(args: BenchmarkArguments, folder: Path) -> None:
    kwargs = tiny_qwen2_vl_kwargs(args.vocab_size, hidden_size=args.hidden_size, num_hidden_layers=args.num_layers)
    kwargs["text_config"]["num_attention_heads"] = args.hidden_size // 64
    kwargs["text_config"]["num_key_value_heads"] = args.hidden_size // 128
    kwargs["text_config"]["rope_parameters"]["mrope_section"] = [16, 8, 8]
    kwargs["text_config"]["intermediate_size"] = 4 * args.hidden_size
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(Qwen2VLConfig(**kwargs)).eval().save_pretrained(folder)


def write_prompts(args: BenchmarkArguments, folder: Path) -> Path:
    generator = torch.Generator().manual_seed(0)
    lines = []
    for index in range(args.num_requests):
        input_ids = torch.randint(10, args.vocab_size, (1, args.prompt_length), generator=generator)
        save_file(
            {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}, folder / f"p{index}.safetensors"
        )
        lines.append({"id": f"p{index}", "inputs": f"p{index}.safetensors", "max_new_tokens": args.max_new_tokens})
    path = folder / "prompts.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def run_pipeline(args: BenchmarkArguments, model: Path, prompts: Path, max_active: int) -> tuple[float, list]:
    """tokens/s of one batch run, and the tokens of every request."""
    output = prompts.parent / f"out-{max_active}.jsonl"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={args.num_stages}",
        "-m",
        "vlmheads.parallel",
        "--model",
        str(model),
        "--prompts",
        str(prompts),
        "--output",
        str(output),
        "--max-active",
        str(max_active),
        "--threads",
        str(args.threads),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"The pipeline failed:\n{result.stderr[-3000:]}")
    rate = float(re.search(r"([0-9.]+) tokens/s", result.stderr).group(1))
    tokens = [json.loads(line)["token_ids"] for line in output.read_text().splitlines()]
    return rate, tokens


def main() -> None:
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        save_model(args, folder / "model")
        prompts = write_prompts(args, folder)
        rates = {1: [], args.num_requests: []}
        tokens = {}
        for _ in range(args.rounds):
            for max_active in rates:
                rate, tokens[max_active] = run_pipeline(args, folder / "model", prompts, max_active)
                rates[max_active].append(rate)
    if tokens[1] != tokens[args.num_requests]:
        raise RuntimeError("Micro-batching changed the greedy tokens.")
    one_at_a_time, in_flight = max(rates[1]), max(rates[args.num_requests])
    print(
        f"{args.num_stages}-stage pipeline, hidden {args.hidden_size}, {args.num_layers} layers, {args.num_requests} "
        f"requests x {args.max_new_tokens} new tokens (prompt {args.prompt_length}), {args.threads} thread(s)/process"
    )
    print(f"| mode | tokens/s |\n|---|---|\n| one request at a time | {one_at_a_time:.1f} |")
    print(f"| {args.num_requests} requests in flight | {in_flight:.1f} |")
    print(f"speed-up: {in_flight / one_at_a_time:.2f}x (bound {args.num_stages}x); all runs: {rates}")


if __name__ == "__main__":
    main()
