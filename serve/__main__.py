"""`python -m vlmheads.serve [--model DIR] [--lora NAME=PATH ...] [--host H] [--port P] [--api-key KEY] [...]`.

Without `--model` it serves an embedded tiny random Orion model (chat, and /v1/trajectory). The API key may also
come from the VLMHEADS_API_KEY environment variable. Each `--lora name=path` serves a peft LoRA adapter of the model
as the model `name` (`lora.py`).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from .app import serve
from .local_engine import LocalEngine
from .lora import LORA_FLAG, parse_lora_specs
from .models import EMBEDDED_MODEL_ID, embedded_tiny_model, load_model_folder
from .options import (
    MAX_BATCH_SIZE_FLAG,
    PREFIX_CACHE_FLAG,
    add_server_arguments,
    add_trust_remote_code_argument,
    serve_options,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vlmheads.serve", description="An OpenAI-compatible HTTP server for a vlmheads model."
    )
    parser.add_argument("--model", default=None, help="A saved model folder; the embedded tiny model if unset.")
    parser.add_argument(
        LORA_FLAG,
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="A peft LoRA adapter folder of the served model, served as the model NAME (repeat for more); requests "
        "on adapters and on the base model decode together.",
    )
    parser.add_argument(
        MAX_BATCH_SIZE_FLAG, type=int, default=16, help="Requests decoded together. Default: %(default)s."
    )
    parser.add_argument(
        PREFIX_CACHE_FLAG,
        type=int,
        default=8,
        help="KV caches of recent prompts kept for prompts sharing their prefix and images (0: off). Default: "
        "%(default)s.",
    )
    add_trust_remote_code_argument(parser)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's).")
    add_server_arguments(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper())
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    default_id = EMBEDDED_MODEL_ID if args.model is None else Path(args.model).resolve().name
    model_id = args.served_model_name or default_id
    try:
        # The adapters' folders are checked before the model loads, then loaded into it.
        lora = parse_lora_specs(args.lora, model_id)
        if args.model is None:
            model, processor = embedded_tiny_model()
        else:
            model, processor = load_model_folder(args.model, trust_remote_code=args.trust_remote_code)
        engine = LocalEngine(
            model,
            processor,
            model_id=model_id,
            max_batch_size=args.max_batch_size,
            max_context=args.max_model_len,
            prefix_cache_entries=args.prefix_cache_entries,
            lora=lora,
        )
    except ValueError as error:
        if not str(error).startswith(LORA_FLAG):
            raise
        parser.error(str(error))
    serve(engine, **serve_options(args))


if __name__ == "__main__":
    main()
