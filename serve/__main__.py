"""`python -m vlmheads.serve [--model DIR] [--host H] [--port P] [--api-key KEY] [--max-batch-size N]`.

Without `--model` it serves an embedded tiny random Orion model (chat, and /v1/trajectory). The API key may also
come from the VLMHEADS_API_KEY environment variable.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import torch

from .app import API_KEY_ENV, ServerLimits, serve
from .local_engine import LocalEngine
from .models import EMBEDDED_MODEL_ID, embedded_tiny_model, load_model_folder


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m vlmheads.serve", description="An OpenAI-compatible HTTP server for a vlmheads model."
    )
    parser.add_argument("--model", default=None, help="A saved model folder; the embedded tiny model if unset.")
    parser.add_argument("--served-model-name", default=None, help="The name clients send (default: folder name).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), help=f"Default: ${API_KEY_ENV}.")
    parser.add_argument("--max-batch-size", type=int, default=16, help="Requests decoded together.")
    parser.add_argument("--max-model-len", type=int, default=None, help="Longest prompt + completion, in tokens.")
    parser.add_argument("--max-images", type=int, default=ServerLimits.max_images, help="Images per request.")
    parser.add_argument("--max-body-bytes", type=int, default=ServerLimits.max_body_bytes)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's).")
    parser.add_argument("--log-level", default="info")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper())
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.model is None:
        model, processor = embedded_tiny_model()
        model_id = args.served_model_name or EMBEDDED_MODEL_ID
    else:
        model, processor = load_model_folder(args.model)
        model_id = args.served_model_name or Path(args.model).resolve().name
    engine = LocalEngine(
        model, processor, model_id=model_id, max_batch_size=args.max_batch_size, max_context=args.max_model_len
    )
    limits = ServerLimits(max_body_bytes=args.max_body_bytes, max_images=args.max_images)
    serve(engine, host=args.host, port=args.port, api_key=args.api_key, limits=limits, log_level=args.log_level)


if __name__ == "__main__":
    main()
