"""A tiny served model, a uvicorn server on a free port (in a thread or a subprocess), and image data URLs, shared
by the server tests and the serving benchmark."""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import httpx
import torch
import uvicorn
from orion_helpers import camera_image
from PIL import Image

from vlmheads.registry.vlms import create_vlm, load_processor
from vlmheads.serve.app import ServerLimits, create_app
from vlmheads.serve.engine import GenerationEngine
from vlmheads.serve.local_engine import LocalEngine
from vlmheads.serve.models import EMBEDDED_MODEL_ID, embedded_tiny_model, spread_weights


def tiny_parts(kind: str = "qwen2_vl") -> tuple[torch.nn.Module, Any]:
    """A tiny model and its processor, built once per test process; tests must not change them. `kind`: an Orion
    backbone ("qwen2_vl" is the embedded model the server runs by default, "qwen2_5_vl"), or "llava" (a plain VLM
    of the registry, with 1-D positions), all with weights spread so that different prompts get different answers."""
    return _build_parts(kind)


@lru_cache(maxsize=4)
def _build_parts(kind: str) -> tuple[torch.nn.Module, Any]:
    if kind == "llava":
        return spread_weights(create_vlm("llava", tiny=True).eval()), load_processor("llava", tiny=True)
    return embedded_tiny_model(backbone=kind)


def tiny_engine(max_batch_size: int = 16, max_context: int | None = None) -> LocalEngine:
    """A LocalEngine over the shared tiny model."""
    model, processor = tiny_parts()
    return LocalEngine(
        model, processor, model_id=EMBEDDED_MODEL_ID, max_batch_size=max_batch_size, max_context=max_context
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_healthy(base_url: str, timeout: float = 60.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"The server exited with {process.returncode}: {process.stderr.read()}")
        try:
            if httpx.get(f"{base_url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{base_url} did not become healthy within {timeout} s.")


@contextmanager
def served(
    engine: GenerationEngine, api_key: str | None = None, limits: ServerLimits | None = None, **app_options: Any
) -> Iterator[str]:
    """Serves `engine` with uvicorn in a thread on a free port (`app_options`: more of `create_app`'s arguments);
    yields the base URL (no /v1)."""
    port = free_port()
    app = create_app(engine, api_key=api_key, limits=limits, **app_options)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base_url)
        yield base_url
    finally:
        server.should_exit = True
        thread.join(30)


@contextmanager
def server_process(*args: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """`python -m vlmheads.serve --port <free> *args` in a subprocess on one torch thread; yields (base URL,
    process) once healthy, and kills it on exit if it still runs."""
    port = free_port()
    command = [sys.executable, "-m", "vlmheads.serve", "--port", str(port), "--threads", "1", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base_url, process=process)
        yield base_url, process
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=30)


def data_url(image: Image.Image, image_format: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return f"data:image/{image_format.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def camera_data_url(seed: int, width: int = 56, height: int = 56) -> str:
    return data_url(camera_image(seed, width, height))


def chat_body(text: str, image_url: str | None = None, **fields: Any) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "text", "text": text}]
    if image_url is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": image_url}})
    return {"model": EMBEDDED_MODEL_ID, "messages": [{"role": "user", "content": content}], **fields}
