"""Access and request logs: one line per HTTP request on the `vlmheads.serve.access` logger (ACCESS_LOGGER), at INFO.

Each line carries the request id, the client's address, method, path, status, the prompt and completion tokens where
the route counts them, and the latency in milliseconds, as `key=value` pairs:

    request_id=5f0c… client=127.0.0.1:51234 method=POST path=/v1/chat/completions status=200 prompt_tokens=35
    completion_tokens=8 latency_ms=153.2

The same fields ride on the log record as `record.access` (a dict), for handlers that write JSON. A streamed response
is logged when its stream ends (its latency is the whole stream's). The request id is the client's `X-Request-Id`
header when it is sane (1-128 characters of `[A-Za-z0-9._:=+/-]`), else a fresh UUID; every response carries it back
in its own `X-Request-Id` header, logged or not. Nothing of a request's headers (API keys), body (prompts, images) or
query string is logged. `python -m vlmheads.serve --no-access-log` (alias `--disable-log-requests`) turns the lines
off.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import quote

from starlette.requests import Request

ACCESS_LOGGER = "vlmheads.serve.access"
REQUEST_ID_HEADER = "x-request-id"
#: A client's request id is kept when it matches this (no spaces, quotes or control characters to break a log line).
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:=+/-]{1,128}")
#: The longest path written to a line (a 404 probe may send kilobytes).
MAX_LOGGED_PATH = 256
#: Where the record of a request lies in its ASGI scope, for the endpoints to add their token counts.
_SCOPE_KEY = "vlmheads.access"

access_logger = logging.getLogger(ACCESS_LOGGER)


@dataclass
class AccessRecord:
    """What the line of one request says; endpoints fill in `prompt_tokens` and `completion_tokens`."""

    request_id: str
    client: str | None
    method: str
    path: str
    status: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_ms: float | None = None

    def line(self) -> str:
        return " ".join(f"{name}={'-' if value is None else value}" for name, value in asdict(self).items())


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's `X-Request-Id` when it is sane (SANE_REQUEST_ID), else a fresh UUID (32 hex digits)."""
    for name, value in headers:
        if name.lower() == REQUEST_ID_HEADER.encode():
            given = value.decode("latin-1")
            if SANE_REQUEST_ID.fullmatch(given):
                return given
            break
    return uuid.uuid4().hex


def access_record(request: Request) -> AccessRecord | None:
    """The record of `request` (None when the app runs without `AccessLogMiddleware`)."""
    return request.scope.get(_SCOPE_KEY)


def note_tokens(request: Request, prompt_tokens: int | None = None, completion_tokens: int | None = None) -> None:
    """Adds a request's token counts to its access record (the counts given; None leaves a count as it is)."""
    record = access_record(request)
    if record is None:
        return
    if prompt_tokens is not None:
        record.prompt_tokens = prompt_tokens
    if completion_tokens is not None:
        record.completion_tokens = completion_tokens


class AccessLogMiddleware:
    """ASGI middleware: gives every HTTP request an id (echoed in the response's `X-Request-Id`) and, with `log`,
    writes its access line when the response has ended (for a stream, when the stream ends). A request whose
    handler raised is logged with status 500 when no response had started."""

    def __init__(self, app: Any, log: bool = True):
        self.app, self.log = app, log

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        client = scope.get("client")
        record = AccessRecord(
            request_id=request_id_from(scope.get("headers", [])),
            client=None if client is None else f"{client[0]}:{client[1]}",
            method=quote(scope["method"], safe=""),
            path=quote(scope["path"][:MAX_LOGGED_PATH], safe="/:@!$&'()*+,;=-._~"),
        )
        scope[_SCOPE_KEY] = record

        async def send_with_id(message: Any) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                headers = [*message.get("headers", []), (REQUEST_ID_HEADER.encode(), record.request_id.encode())]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except BaseException:
            if record.status is None:
                record.status = 500
            raise
        finally:
            if self.log and access_logger.isEnabledFor(logging.INFO):
                record.latency_ms = round((time.perf_counter() - start) * 1000, 1)
                access_logger.info(record.line(), extra={"access": asdict(record)})
