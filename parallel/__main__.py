"""Pipeline-parallel generation with torchrun: one process per stage; rank 0 serves HTTP or runs a batch file.

    python -m vlmheads.parallel prepare --model DIR --stages 2 --out SHARDS
    torchrun --nproc-per-node 2 -m vlmheads.parallel --model SHARDS --port 8000
    torchrun --nproc-per-node 2 -m vlmheads.parallel --model DIR --prompts in.jsonl --output out.jsonl

Each line of a prompts file is a JSON object with `messages` (a chat, given to the processor's chat template;
image parts may name files: {"type": "image", "path": "cam.png"}) or `inputs` (a .safetensors file holding the
processor's outputs for one prompt), and optionally `id`, `max_new_tokens` (16), `temperature`, `top_p`, `seed`,
`stop_token_ids`. The output file holds one line per prompt: `id`, `token_ids`, `text` (with a processor),
`finish_reason` and `error`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from transformers import AutoProcessor

from ..serve.engine import GenerationRequest, TokenEvent
from .engine import PipelineEngine
from .runtime import StageFailure, StageLink, report_failure, run_worker
from .stages import StageModel, load_stage_model, prepare


def _layer_counts(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",")]
    except ValueError as error:
        raise ValueError(f"--layers takes the number of layers of each stage, e.g. 3,5; got {text!r}.") from error


def parse_prepare_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vlmheads.parallel prepare", description="Write stage shards.")
    parser.add_argument("--model", required=True, help="A saved model folder (with its processor).")
    parser.add_argument("--stages", type=int, required=True)
    parser.add_argument("--layers", default=None, help="Layers per stage, e.g. 3,5 (default: balanced by size).")
    parser.add_argument("--out", required=True, help="The folder to write the shards and plan to.")
    return parser.parse_args(argv)


def parse_run_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="torchrun ... -m vlmheads.parallel", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="A prepared folder, or a saved model folder.")
    parser.add_argument("--stages", type=int, default=None, help="Must equal the world size (default: it).")
    parser.add_argument("--layers", default=None, help="Layers per stage, e.g. 3,5 (default: balanced by size).")
    parser.add_argument("--prompts", default=None, help="A JSONL file of prompts to run instead of serving.")
    parser.add_argument("--output", default=None, help="Where the batch mode writes its JSONL results.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api-key", default=os.environ.get("VLMHEADS_API_KEY"), help="Default: $VLMHEADS_API_KEY (as the server)."
    )
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--max-active", type=int, default=16, help="Requests the pipeline holds at once.")
    parser.add_argument("--max-context", type=int, default=None, help="Longest prompt + completion, in tokens.")
    parser.add_argument("--timeout", type=float, default=120.0, help="Seconds a stage may stay silent.")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process.")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available; then NCCL).")
    args = parser.parse_args(argv)
    if (args.prompts is None) != (args.output is None):
        parser.error("--prompts and --output go together.")
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["prepare"]:
        args = parse_prepare_args(argv[1:])
        plan = prepare(args.model, args.out, args.stages, _layer_counts(args.layers))
        print(json.dumps(plan.to_dict()))
        return
    args = parse_run_args(argv)
    torch.set_num_threads(args.threads)
    try:
        run(args)
    except StageFailure as error:
        report_failure(error)
        # The process group cannot be torn down cleanly once a peer is gone.
        os._exit(1)


def run(args: argparse.Namespace) -> None:
    """Loads this rank's stage, then drives the pipeline (rank 0) or serves as a later stage."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    process_group_timeout = datetime.timedelta(seconds=max(args.timeout, 600))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=process_group_timeout)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    num_stages = args.stages or world_size
    if num_stages != world_size:
        raise ValueError(f"--stages {num_stages} needs as many processes; torchrun started {world_size}.")
    header_group = dist.new_group(backend="gloo", timeout=process_group_timeout) if device.type == "cuda" else None
    model, plan = load_stage_model(args.model, rank, num_stages, _layer_counts(args.layers))
    stage = StageModel(model.to(device), plan, rank)
    # Everything slow happens before the stages meet: from then on, a silent stage counts as failed.
    processor = _load_processor(args.model) if rank == 0 else None
    if rank == 0 and args.prompts is None and processor is None:
        raise ValueError(f"Serving needs the model's processor; {args.model} holds none.")
    layouts = [None] * world_size
    dist.all_gather_object(layouts, plan.layer_ranges, group=header_group)
    if any(layout != plan.layer_ranges for layout in layouts):
        raise ValueError(f"The stages disagree on the layers each runs: {layouts}.")
    start, end = plan.layer_ranges[rank]
    print(
        f"vlmheads.parallel: stage {rank}/{num_stages} (rank {rank}, pid {os.getpid()}) ready: "
        f"layers {start}-{end - 1}",
        file=sys.stderr,
        flush=True,
    )
    link = None
    if num_stages > 1:
        link = StageLink(
            rank, num_stages, args.timeout, device, stage.text_config.hidden_size, stage.dtype, header_group
        )
    if rank > 0:
        run_worker(stage, link)
        dist.destroy_process_group()
        return

    def on_failure(message: str) -> None:
        report_failure(StageFailure(message))
        os._exit(1)

    engine = PipelineEngine(
        stage,
        link,
        processor=processor,
        model_id=args.served_model_name or Path(args.model).resolve().name,
        max_context=args.max_context,
        max_active=args.max_active,
        on_failure=on_failure,
    )
    if args.prompts is not None:
        run_batch(engine, Path(args.prompts), Path(args.output))
    else:
        # The server needs fastapi and uvicorn (the `serve` extra); the batch mode does not.
        from ..serve.app import serve

        serve(engine, host=args.host, port=args.port, api_key=args.api_key)
    engine.close(drain=True)
    dist.destroy_process_group()


def _load_processor(model_dir: str) -> Any:
    """The processor saved with the model, or None when the folder holds none (batch mode with `inputs` files)."""
    folder = Path(model_dir)
    if not any((folder / name).is_file() for name in ("processor_config.json", "tokenizer_config.json")):
        return None
    return AutoProcessor.from_pretrained(folder, trust_remote_code=True)


def _request_inputs(line: dict[str, Any], processor: Any, base: Path) -> dict[str, Any]:
    if "inputs" in line:
        return load_file(base / line["inputs"])
    if "messages" not in line:
        raise ValueError(f"A prompt line needs 'messages' or 'inputs'; got keys {sorted(line)}.")
    if processor is None:
        raise ValueError("A prompt with 'messages' needs the model's processor, which the model folder lacks.")
    messages = json.loads(json.dumps(line["messages"]))
    for message in messages:
        for part in message.get("content", []) if isinstance(message.get("content"), list) else []:
            if part.get("type") == "image" and "path" in part:
                part["path"] = str(base / part["path"])
    return dict(
        processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
    )


def run_batch(engine: PipelineEngine, prompts: Path, output: Path) -> None:
    """Submits every prompt at once, waits for all, writes the results in the prompts' order."""
    lines = [json.loads(text) for text in prompts.read_text().splitlines() if text.strip()]
    results: dict[str, dict[str, Any]] = {}
    done = threading.Semaphore(0)

    def collect(event: TokenEvent) -> None:
        result = results[event.request_id]
        if event.token_id is not None:
            result["token_ids"].append(event.token_id)
        if event.finish_reason is not None:
            result["finish_reason"], result["error"] = event.finish_reason, event.error
            done.release()

    started = time.perf_counter()
    for index, line in enumerate(lines):
        request_id = str(line.get("id", index))
        results[request_id] = {"id": request_id, "token_ids": [], "finish_reason": None, "error": None}
        try:
            inputs = _request_inputs(line, engine.processor, prompts.parent)
        except ValueError as error:
            collect(TokenEvent(request_id, None, "error", str(error)))
            continue
        request = GenerationRequest(
            request_id=request_id,
            inputs=inputs,
            max_new_tokens=int(line.get("max_new_tokens", 16)),
            temperature=float(line.get("temperature", 0.0)),
            top_p=float(line.get("top_p", 1.0)),
            seed=line.get("seed"),
            stop_token_ids=tuple(line.get("stop_token_ids", ())),
        )
        engine.submit(request, collect)
    for _ in lines:
        done.acquire()
    seconds = time.perf_counter() - started
    tokenizer = getattr(engine.processor, "tokenizer", None)
    with output.open("w") as file:
        for result in results.values():
            if tokenizer is not None:
                result["text"] = tokenizer.decode(result["token_ids"], skip_special_tokens=True)
            file.write(json.dumps(result) + "\n")
    tokens = sum(len(result["token_ids"]) for result in results.values())
    print(
        f"vlmheads.parallel: {len(lines)} requests, {tokens} tokens in {seconds:.3f} s: "
        f"{tokens / seconds:.2f} tokens/s",
        file=sys.stderr,
        flush=True,
    )


if __name__ == "__main__":
    main()
