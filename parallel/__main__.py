"""Pipeline-parallel generation with torchrun: one process per stage; rank 0 serves HTTP or runs a batch file.

    python -m vlmheads.parallel prepare --model DIR --stages 2 --out SHARDS
    torchrun --standalone --nproc-per-node 2 -m vlmheads.parallel --model SHARDS --port 8000
    torchrun --standalone --nproc-per-node 2 -m vlmheads.parallel --model DIR --prompts in.jsonl --output out.jsonl

`prepare` writes one shard per stage and `pipeline_plan.json` (layers, shard, SHA-256 of each stage), so that each
process reads only its slice; without it every process loads the whole folder and prunes it.

A prompts file holds one JSON object per line, in either of two formats:
- OpenAI's batch format: `custom_id`, `method` ("POST"), `url` ("/v1/chat/completions") and `body`, a chat
  completion request (`messages` with text and `image_url` data URLs, `max_tokens` or `max_completion_tokens`,
  `temperature`, `top_p`, `seed`). Its output line is OpenAI's: `id`, `custom_id`, `response` (`status_code`,
  `request_id`, `body`: a `chat.completion`) and `error`.
- vlmheads' own: `messages` (a chat, given to the processor's chat template; image parts may name files:
  {"type": "image", "path": "cam.png"}) or `inputs` (a .safetensors file holding the processor's outputs for one
  prompt), and optionally `id`, `max_new_tokens` (16), `temperature`, `top_p`, `seed`, `stop_token_ids`. Its output
  line holds `id`, `token_ids`, `text` (with a processor), `finish_reason` and `error`.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib
import json
import logging
import os
import secrets
import signal
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
from ..serve.options import (
    SERVE_ONLY_FLAGS,
    ServerLimits,
    add_server_arguments,
    add_trust_remote_code_argument,
    positive_float,
    positive_int,
    refuse_given,
    serve_options,
    server_limits,
)
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


class _ServeOnlyFlag(argparse.Action):
    """A flag of `vlmheads serve` that the pipeline does not take (`SERVE_ONLY_FLAGS`): refused as soon as it is
    read, naming it, the command it belongs to and why, rather than as one of argparse's "unrecognized arguments"."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        flag = self.option_strings[0]
        parser.error(
            f"{flag} is a flag of `vlmheads serve` (the single-process server), not of `vlmheads parallel`: "
            f"{SERVE_ONLY_FLAGS[flag]}."
        )


def parse_prepare_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vlmheads.parallel prepare", description="Write stage shards.")
    parser.add_argument("--model", required=True, help="A saved model folder (with its processor).")
    parser.add_argument("--stages", type=int, required=True, help="How many stages (one process each) to split into.")
    parser.add_argument("--layers", default=None, help="Layers per stage, e.g. 3,5 (default: balanced by size).")
    parser.add_argument("--out", required=True, help="The folder to write the shards and plan to.")
    add_trust_remote_code_argument(parser)
    return parser.parse_args(argv)


def parse_run_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="torchrun --standalone --nproc-per-node N -m vlmheads.parallel",
        # The module docstring: the commands (`prepare` first), and the prompts file formats.
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="`python -m vlmheads.parallel prepare --help`: the options of `prepare`.\n"
        f"{', '.join(SERVE_ONLY_FLAGS)}: flags of `vlmheads serve` only, refused here saying why.",
    )
    parser.add_argument("--model", required=True, help="A prepared folder, or a saved model folder.")
    parser.add_argument("--stages", type=int, default=None, help="Must equal the world size (default: it).")
    parser.add_argument("--layers", default=None, help="Layers per stage, e.g. 3,5 (default: balanced by size).")
    parser.add_argument("--prompts", default=None, help="A JSONL file of prompts to run instead of serving.")
    parser.add_argument("--output", default=None, help="Where the batch mode writes its JSONL results.")
    parser.add_argument(
        "--max-active",
        type=positive_int,
        default=16,
        help="Requests the pipeline holds at once. Default: %(default)s.",
    )
    parser.add_argument(
        "--max-context", dest="max_model_len", type=positive_int, default=None, help="An alias of --max-model-len."
    )
    parser.add_argument(
        "--timeout",
        type=positive_float,
        default=120.0,
        help="Seconds a stage may stay silent before the others stop, naming it. Default: %(default)s.",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process. Default: %(default)s.")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available; then NCCL).")
    parser.add_argument(
        "--no-verify-shards",
        dest="verify_shards",
        action="store_false",
        help="Skip checking each prepared shard's SHA-256 against pipeline_plan.json.",
    )
    add_trust_remote_code_argument(parser)
    http_only = add_server_arguments(parser)
    for flag in SERVE_ONLY_FLAGS:
        parser.add_argument(flag, nargs="?", action=_ServeOnlyFlag, dest=argparse.SUPPRESS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if (args.prompts is None) != (args.output is None):
        parser.error("--prompts and --output go together.")
    if args.prompts is not None:
        refuse_given(parser, args, http_only, "with --prompts: the batch mode runs no HTTP server")
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["prepare"]:
        args = parse_prepare_args(argv[1:])
        plan = prepare(args.model, args.out, args.stages, _layer_counts(args.layers), args.trust_remote_code)
        print(json.dumps(plan.to_dict()))
        return
    args = parse_run_args(argv)
    logging.basicConfig(level=args.log_level.upper())
    torch.set_num_threads(args.threads)
    try:
        run(args)
    except StageFailure as error:
        report_failure(error)
        # The process group cannot be torn down cleanly once a peer is gone.
        os._exit(1)


def run(args: argparse.Namespace) -> None:
    """Loads this rank's stage, then drives the pipeline (rank 0) or serves as a later stage."""
    if "RANK" not in os.environ:
        raise ValueError(
            "The pipeline runs one process per stage, started by torchrun (RANK is not set): "
            "`torchrun --standalone --nproc-per-node STAGES -m vlmheads.parallel --model DIR ...`."
        )
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
    model, plan = load_stage_model(
        args.model, rank, num_stages, _layer_counts(args.layers), args.trust_remote_code, args.verify_shards
    )
    stage = StageModel(model.to(device), plan, rank)
    # Everything slow happens before the stages meet: from then on, a silent stage counts as failed.
    processor = _load_processor(args.model, args.trust_remote_code) if rank == 0 else None
    if rank == 0 and args.prompts is None:
        # The server needs fastapi and uvicorn (the `serve` extra); the batch mode does not. Imported now: a long
        # import once the stages meet would read as a silent stage.
        importlib.import_module("..serve.app", __package__)
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
            rank,
            num_stages,
            args.timeout,
            device,
            stage.text_config.hidden_size,
            stage.dtype,
            header_group,
            stage.position_rows,
        )
    if rank > 0:
        # SIGTERM (torchrun passes it to every process) is rank 0's to handle: it drains the requests in flight,
        # then sends SHUTDOWN round the ring, on which this stage stops.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
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
        max_context=args.max_model_len,
        max_active=args.max_active,
        on_failure=on_failure,
    )
    if args.prompts is not None:
        run_batch(engine, Path(args.prompts), Path(args.output), server_limits(args))
    else:
        from ..serve.app import serve

        serve(engine, **serve_options(args))
    engine.close(drain=True)
    dist.destroy_process_group()


def _load_processor(model_dir: str, trust_remote_code: bool = False) -> Any:
    """The processor saved with the model, or None when the folder holds none (batch mode with `inputs` files)."""
    folder = Path(model_dir)
    if not any((folder / name).is_file() for name in ("processor_config.json", "tokenizer_config.json")):
        return None
    return AutoProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code)


OPENAI_BATCH_URL = "/v1/chat/completions"


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


@functools.cache
def _chat_server(engine: PipelineEngine, limits: ServerLimits) -> Any:
    """The HTTP server's request handling (the `serve` extra), which turns OpenAI chat bodies into model inputs
    within `limits` (images per request, their bytes and pixels)."""
    from ..serve.app import Server

    return Server(engine, limits.resolved(engine.processor))


class BatchLine:
    """One line of a prompts file: its request, and how its result is written (vlmheads' or OpenAI's format)."""

    def __init__(
        self,
        index: int,
        text: str,
        engine: PipelineEngine,
        base: Path,
        done: threading.Semaphore,
        limits: ServerLimits,
    ):
        self.done = done
        try:
            line = json.loads(text)
        except json.JSONDecodeError as error:
            line = {"invalid": f"line {index + 1} is not JSON ({error})"}
        self.openai = isinstance(line, dict) and "custom_id" in line
        self.request_id = str(line["custom_id"] if self.openai else index)
        if isinstance(line, dict) and not self.openai:
            self.request_id = str(line.get("id", index))
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.client_error = True
        self.prompt_tokens = 0
        self.request: GenerationRequest | None = None
        try:
            if isinstance(line, dict) and "invalid" in line:
                raise ValueError(line["invalid"])
            self.request = (
                self._openai_request(line, engine, limits) if self.openai else self._request(line, engine, base)
            )
            self.prompt_tokens = int(self.request.inputs["input_ids"].shape[1])
        except (ValueError, TypeError, KeyError) as error:
            self.finish_reason, self.error = "error", f"{type(error).__name__}: {error}"

    def _request(self, line: Any, engine: PipelineEngine, base: Path) -> GenerationRequest:
        if not isinstance(line, dict):
            raise ValueError(f"A prompt line must be a JSON object, got {type(line).__name__}.")
        return GenerationRequest(
            request_id=self.request_id,
            inputs=_request_inputs(line, engine.processor, base),
            max_new_tokens=int(line.get("max_new_tokens", 16)),
            temperature=float(line.get("temperature", 0.0)),
            top_p=float(line.get("top_p", 1.0)),
            seed=line.get("seed"),
            stop_token_ids=tuple(line.get("stop_token_ids", ())),
        )

    def _openai_request(self, line: dict[str, Any], engine: PipelineEngine, limits: ServerLimits) -> GenerationRequest:
        from ..serve.app import APIError
        from ..serve.openai_protocol import ChatCompletionRequest

        if line.get("method") != "POST" or line.get("url") != OPENAI_BATCH_URL:
            raise ValueError(
                f"OpenAI batch lines must be POST {OPENAI_BATCH_URL}; got {line.get('method')!r} {line.get('url')!r}."
            )
        body = ChatCompletionRequest.model_validate(line.get("body"))
        if body.stream or body.stop_strings:
            raise ValueError("body: stream and stop are not taken in a batch file.")
        server = _chat_server(engine, limits)
        try:
            inputs = server.chat_inputs(body)
        except APIError as error:
            raise ValueError(error.message) from error
        prompt_tokens = int(inputs["input_ids"].shape[1])
        limit = body.completion_limit or engine.max_context - prompt_tokens
        return GenerationRequest(
            request_id=self.request_id,
            inputs=inputs,
            max_new_tokens=limit,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            seed=body.seed,
            stop_token_ids=server.stop_token_ids,
        )

    def on_event(self, event: TokenEvent) -> None:
        """Records an event; releases `done` at the request's last one."""
        if event.token_id is not None:
            self.token_ids.append(event.token_id)
        if event.finish_reason is not None:
            self.finish_reason, self.error, self.client_error = event.finish_reason, event.error, event.client_error
            self.done.release()

    def result(self, tokenizer: Any, model_id: str) -> dict[str, Any]:
        text = None if tokenizer is None else tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if not self.openai:
            result = {"id": self.request_id, "token_ids": self.token_ids, "finish_reason": self.finish_reason}
            result["error"] = self.error
            if text is not None:
                result["text"] = text
            return result
        if self.finish_reason == "error":
            status = 400 if self.client_error else 500
            kind = "invalid_request_error" if self.client_error else "internal_server_error"
            body = {"error": {"message": self.error, "type": kind, "param": None, "code": None}}
        else:
            completion = len(self.token_ids)
            body = {
                "id": f"chatcmpl-{secrets.token_hex(12)}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model_id,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": self.finish_reason,
                        "logprobs": None,
                    }
                ],
                "usage": {
                    "prompt_tokens": self.prompt_tokens,
                    "completion_tokens": completion,
                    "total_tokens": self.prompt_tokens + completion,
                },
            }
        response = {"status_code": status if self.finish_reason == "error" else 200, "request_id": self.request_id}
        return {
            "id": f"batch_req_{secrets.token_hex(12)}",
            "custom_id": self.request_id,
            "response": {**response, "body": body},
            "error": None,
        }


def run_batch(engine: PipelineEngine, prompts: Path, output: Path, limits: ServerLimits) -> None:
    """Submits every prompt at once, waits for all, writes the results in the prompts' order (each line in the
    format it came in). `limits` bounds the images of OpenAI lines' data URLs, as the server's do.
    SIGTERM aborts what has not finished; the results so far are still written."""
    done = threading.Semaphore(0)
    texts = [text for text in prompts.read_text().splitlines() if text.strip()]
    lines = [BatchLine(index, text, engine, prompts.parent, done, limits) for index, text in enumerate(texts)]
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=engine.close, args=(False,)).start())
    started = time.perf_counter()
    submitted = [line for line in lines if line.request is not None]
    for line in submitted:
        engine.submit(line.request, line.on_event)
    for _ in submitted:
        done.acquire()
    seconds = time.perf_counter() - started
    tokenizer = getattr(engine.processor, "tokenizer", None)
    with output.open("w") as file:
        for line in lines:
            file.write(json.dumps(line.result(tokenizer, engine.model_id)) + "\n")
    tokens = sum(len(line.token_ids) for line in lines)
    print(
        f"vlmheads.parallel: {len(lines)} requests, {tokens} tokens in {seconds:.3f} s: "
        f"{tokens / seconds:.2f} tokens/s",
        file=sys.stderr,
        flush=True,
    )


if __name__ == "__main__":
    main()
