"""`python -m vlmheads.serve [--model DIR] [--lora NAME=PATH ...] [--host H] [--port P] [--api-key KEY] [...]`.

Without `--model` it serves an embedded tiny random Orion model (chat, and /v1/trajectory). The API key may also
come from the VLMHEADS_API_KEY environment variable. Each `--lora name=path` serves a peft LoRA adapter of the model
as the model `name` (`lora.py`).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import torch

from .app import API_KEY_ENV, DEFAULT_MAX_IMAGE_PIXELS, ServerLimits, ServerTimeouts, serve
from .local_engine import LocalEngine
from .lora import LORA_FLAG, parse_lora_specs
from .models import EMBEDDED_MODEL_ID, embedded_tiny_model, load_model_folder


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vlmheads.serve", description="An OpenAI-compatible HTTP server for a vlmheads model."
    )
    parser.add_argument("--model", default=None, help="A saved model folder; the embedded tiny model if unset.")
    parser.add_argument("--served-model-name", default=None, help="The name clients send (default: folder name).")
    parser.add_argument(
        LORA_FLAG,
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="A peft LoRA adapter folder of the served model, served as the model NAME (repeat for more); requests "
        "on adapters and on the base model decode together.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), help=f"Default: ${API_KEY_ENV}.")
    parser.add_argument("--max-batch-size", type=int, default=16, help="Requests decoded together.")
    parser.add_argument(
        "--prefix-cache-entries",
        type=int,
        default=8,
        help="KV caches of recent prompts kept for prompts sharing their prefix and images (0: off).",
    )
    parser.add_argument("--max-model-len", type=int, default=None, help="Longest prompt + completion, in tokens.")
    parser.add_argument("--max-images", type=int, default=ServerLimits.max_images, help="Images per request.")
    parser.add_argument("--max-body-bytes", type=int, default=ServerLimits.max_body_bytes)
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=None,
        help="Pixels of one image, checked on its header before decoding (default: the processor's max_pixels, "
        f"else {DEFAULT_MAX_IMAGE_PIXELS}); larger JPEGs decode at 1/2, 1/4 or 1/8 scale when that fits.",
    )
    parser.add_argument(
        "--max-request-pixels",
        type=int,
        default=None,
        help="Decoded pixels of all of a request's images (default: twice --max-image-pixels).",
    )
    parser.add_argument(
        "--body-timeout", type=float, default=ServerLimits.body_timeout, help="Seconds to send a request body."
    )
    parser.add_argument(
        "--timeout-keep-alive", type=float, default=ServerTimeouts.keep_alive, help="Idle seconds between requests."
    )
    parser.add_argument(
        "--header-timeout", type=float, default=ServerTimeouts.header, help="Seconds to send a whole request head."
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        default=ServerTimeouts.shutdown,
        help="Drain deadline on SIGTERM: requests still open after it end with an error event.",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="Run the code a model folder ships (needed only for model types vlmheads does not register).",
    )
    parser.add_argument(
        "--no-access-log",
        "--disable-log-requests",
        dest="access_log",
        action="store_false",
        help="Write no access line per request (logger vlmheads.serve.access, at INFO).",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's).")
    parser.add_argument("--log-level", default="info")
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
    limits = ServerLimits(
        max_body_bytes=args.max_body_bytes,
        max_images=args.max_images,
        max_image_pixels=args.max_image_pixels,
        max_request_pixels=args.max_request_pixels,
        body_timeout=args.body_timeout,
    )
    timeouts = ServerTimeouts(
        keep_alive=args.timeout_keep_alive, header=args.header_timeout, shutdown=args.shutdown_timeout
    )
    serve(
        engine,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        limits=limits,
        log_level=args.log_level,
        timeouts=timeouts,
        access_log=args.access_log,
    )


if __name__ == "__main__":
    main()
