"""The serving options `vlmheads serve` and `vlmheads parallel` share: what one request and one connection may take
(`ServerLimits`, `ServerTimeouts`), and the command-line flags that set them, declared once for both command lines
(`add_server_arguments`, `serve_options`); and the flags of `vlmheads serve` alone, with why the pipeline does not
take them (`SERVE_ONLY_FLAGS`).

Imports nothing of the HTTP stack (fastapi, uvicorn): the pipeline's batch mode parses these flags without the
`serve` extra installed.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from .lora import LORA_FLAG

API_KEY_ENV = "VLMHEADS_API_KEY"
MAX_BATCH_SIZE_FLAG = "--max-batch-size"
PREFIX_CACHE_FLAG = "--prefix-cache-entries"

#: The flags of `vlmheads serve` that only its single-process engine (`LocalEngine`) honours, each with why the
#: pipeline-parallel runtime (`vlmheads parallel`) does not take it; the pipeline refuses them with that reason.
SERVE_ONLY_FLAGS: dict[str, str] = {
    LORA_FLAG: "adapters are served by the single-process engine, which loads them into the whole model and decodes "
    "them in one batch through peft; each pipeline stage loads a slice of the base model, without adapters",
    MAX_BATCH_SIZE_FLAG: "the pipeline decodes no batch of requests; each request goes through the stages on its "
    "own, several in flight at once, and --max-active caps how many it holds",
    PREFIX_CACHE_FLAG: "the prefix cache keeps whole prompts' KV caches in one process; a pipeline's KV cache is "
    "split across its stages, one per request, and dropped when the request ends",
}

#: The pixel limit of an image when the processor declares no `max_pixels` of its own.
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


@dataclass(frozen=True)
class ServerLimits:
    """What one request may hold: body bytes, images per request, bytes and pixels per decoded image, and decoded
    pixels per request, and the seconds a client may take to send its body (`body_timeout`).

    `max_image_pixels` None means the processor's own `max_pixels` (Qwen-VL image processors resize every image
    to at most that many pixels), else DEFAULT_MAX_IMAGE_PIXELS; `max_request_pixels` None means twice the image
    limit. An image whose header declares more pixels is refused before its pixels are decoded, unless it is a
    JPEG that PIL can decode at 1/2, 1/4 or 1/8 scale (`Image.draft`) to within the limit.

    `processed_pixels`: the most pixels the processor resizes an image to (None: the processor's `max_pixels`, where
    it declares one). An image of at least 4 times as many is decoded straight to a size nearer it, never below it:
    JPEGs at 1/2, 1/4 or 1/8 scale (`Image.draft`), others reduced by a whole factor (`Image.reduce`) as soon as
    they are decoded, so that a request's full-size images are not all held at once.
    """

    max_body_bytes: int = 16 * 2**20
    max_images: int = 4
    max_image_bytes: int = 8 * 2**20
    max_image_pixels: int | None = None
    max_request_pixels: int | None = None
    body_timeout: float = 60.0
    processed_pixels: int | None = None

    def resolved(self, processor: Any) -> ServerLimits:
        """These limits with the defaults that depend on the served processor filled in."""
        processed_pixels = self.processed_pixels or processor_max_pixels(processor)
        image_pixels = self.max_image_pixels or processed_pixels or DEFAULT_MAX_IMAGE_PIXELS
        return replace(
            self,
            max_image_pixels=image_pixels,
            max_request_pixels=self.max_request_pixels or 2 * image_pixels,
            processed_pixels=processed_pixels,
        )


def processor_max_pixels(processor: Any) -> int | None:
    """The most pixels the processor's image processor resizes an image to, where it declares a pixel budget
    (`max_pixels` among its typed kwargs, as Qwen2-VL's family does; it keeps the value as `size["longest_edge"]`)."""
    image_processor = getattr(processor, "image_processor", None)
    declared = getattr(getattr(image_processor, "valid_kwargs", None), "__annotations__", {})
    if "max_pixels" not in declared:
        return None
    return int(image_processor.size["longest_edge"])


@dataclass(frozen=True)
class ServerTimeouts:
    """Connection time limits, in seconds: `keep_alive` (idle between requests), `header` (from connecting, or from
    the previous response, to a whole request head), `shutdown` (the drain deadline: on SIGTERM, requests still open
    after it end with an error event). The body's is `ServerLimits.body_timeout`."""

    keep_alive: float = 5.0
    header: float = 10.0
    shutdown: float = 30.0


def _number(text: str, kind: type, accepts: Callable[[float], bool], expected: str) -> Any:
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not accepts(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: a whole number above 0."""
    return _number(text, int, lambda value: value > 0, "a whole number above 0")


def non_negative_int(text: str) -> int:
    """argparse type: a whole number, 0 or above."""
    return _number(text, int, lambda value: value >= 0, "a whole number, 0 or above")


def positive_float(text: str) -> float:
    """argparse type: a finite number above 0."""
    return _number(text, float, lambda value: 0 < value < math.inf, "a finite number above 0")


def add_server_arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Adds the flags of the OpenAI-compatible HTTP server (address, API key, model name, request limits, connection
    timeouts, logging) to `parser`, as one help section. Returns the flags that only a running HTTP server honours
    (address, key, body and connection limits, access log), for a mode without one to refuse (`refuse_given`)."""
    group = parser.add_argument_group("server options", "The same for `vlmheads serve` and `vlmheads parallel`.")
    http_only: list[argparse.Action] = []

    def http(*flags: str, **settings: Any) -> None:
        http_only.append(group.add_argument(*flags, **settings))

    http(
        "--host",
        default="127.0.0.1",
        help="The address to listen on (0.0.0.0: every interface). Default: %(default)s.",
    )
    http("--port", type=int, default=8000, help="The port to listen on. Default: %(default)s.")
    http(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"Every endpoint but /health then requires `Authorization: Bearer KEY`. Default: ${API_KEY_ENV} "
        "(unset: no key).",
    )
    group.add_argument(
        "--served-model-name", default=None, help="The model name clients send. Default: the model folder's name."
    )
    group.add_argument(
        "--max-model-len",
        type=positive_int,
        default=None,
        help="Longest prompt + completion, in tokens. Default: the model's max_position_embeddings.",
    )
    http(
        "--max-body-bytes",
        type=positive_int,
        default=ServerLimits.max_body_bytes,
        help="Bytes of one request body; a larger one is a 413. Default: %(default)s.",
    )
    group.add_argument(
        "--max-images",
        type=non_negative_int,
        default=ServerLimits.max_images,
        help="Images per request (0: text only). Default: %(default)s.",
    )
    group.add_argument(
        "--max-image-bytes",
        type=positive_int,
        default=ServerLimits.max_image_bytes,
        help="Encoded bytes of one image. Default: %(default)s.",
    )
    group.add_argument(
        "--max-image-pixels",
        type=positive_int,
        default=None,
        help="Pixels of one image, checked on its header before decoding; larger JPEGs decode at 1/2, 1/4 or 1/8 "
        f"scale when that fits. Default: the processor's max_pixels, else {DEFAULT_MAX_IMAGE_PIXELS}.",
    )
    group.add_argument(
        "--max-request-pixels",
        type=positive_int,
        default=None,
        help="Decoded pixels of all of a request's images. Default: twice --max-image-pixels.",
    )
    http(
        "--body-timeout",
        type=positive_float,
        default=ServerLimits.body_timeout,
        help="Seconds a client may take to send a request body. Default: %(default)s.",
    )
    http(
        "--timeout-keep-alive",
        type=positive_float,
        default=ServerTimeouts.keep_alive,
        help="Idle seconds a connection stays open between requests. Default: %(default)s.",
    )
    http(
        "--header-timeout",
        type=positive_float,
        default=ServerTimeouts.header,
        help="Seconds a client may take to send a whole request head. Default: %(default)s.",
    )
    http(
        "--shutdown-timeout",
        type=positive_float,
        default=ServerTimeouts.shutdown,
        help="Drain deadline on SIGTERM: requests still open after it end with an error event. Default: %(default)s.",
    )
    http(
        "--no-access-log",
        "--disable-log-requests",
        dest="access_log",
        action="store_false",
        help="Write no access line per request (logger vlmheads.serve.access, at INFO).",
    )
    group.add_argument(
        "--log-level",
        type=str.lower,
        choices=LOG_LEVELS,
        default="info",
        help="Of the server's logs and uvicorn's. Default: %(default)s.",
    )
    return http_only


def add_trust_remote_code_argument(parser: argparse.ArgumentParser) -> None:
    """Adds `--trust-remote-code`, off unless given, to `parser`."""
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="Run the code a model folder ships (its config's auto_map). vlmheads' own model types load from the "
        "installed package without it.",
    )


def refuse_given(
    parser: argparse.ArgumentParser, args: argparse.Namespace, actions: list[argparse.Action], reason: str
) -> None:
    """Stops with `parser.error` naming each of `actions` that `args` sets to other than its default: flags a mode
    cannot honour are refused, never ignored. `reason` completes "... is not taken ..."."""
    given = [action.option_strings[0] for action in actions if getattr(args, action.dest) != action.default]
    if given:
        parser.error(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} not taken {reason}.")


def server_limits(args: argparse.Namespace) -> ServerLimits:
    """The request limits that `add_server_arguments`'s flags set."""
    return ServerLimits(
        max_body_bytes=args.max_body_bytes,
        max_images=args.max_images,
        max_image_bytes=args.max_image_bytes,
        max_image_pixels=args.max_image_pixels,
        max_request_pixels=args.max_request_pixels,
        body_timeout=args.body_timeout,
    )


def serve_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of `app.serve` (all but the engine) that `add_server_arguments`'s flags set."""
    return {
        "host": args.host,
        "port": args.port,
        "api_key": args.api_key,
        "limits": server_limits(args),
        "timeouts": ServerTimeouts(
            keep_alive=args.timeout_keep_alive, header=args.header_timeout, shutdown=args.shutdown_timeout
        ),
        "log_level": args.log_level,
        "access_log": args.access_log,
    }
