"""`python -m vlmheads.serve --model <saved folder>` in a subprocess: it serves the folder, and SIGTERM lets the
requests in flight finish before the process exits."""

import json
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serve_helpers import chat_body, server_process, tiny_parts

MAX_TOKENS = 150


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory):
    """A tiny Orion model saved with its code, as examples/demo_orion.py saves outputs/orion_demo."""
    folder = tmp_path_factory.mktemp("saved") / "orion_demo"
    model, processor = tiny_parts()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def stream_to_the_end(base_url: str, started: threading.Event) -> tuple[int, str | None, int | None]:
    """Streams one long answer; returns (content chunks, finish reason, completion tokens from usage)."""
    body = chat_body("Tell me everything.", max_tokens=MAX_TOKENS, stream=True, stream_options={"include_usage": True})
    body.pop("model")
    chunks, finish_reason, completion_tokens = 0, None, None
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            payload = json.loads(line.removeprefix("data: "))
            if payload["choices"]:
                chunks += 1
                finish_reason = payload["choices"][0]["finish_reason"] or finish_reason
                if chunks == 2:
                    started.set()
            elif payload.get("usage"):
                completion_tokens = payload["usage"]["completion_tokens"]
    return chunks, finish_reason, completion_tokens


@pytest.mark.slow
def test_serves_a_saved_folder_and_drains_on_sigterm(saved_folder):
    with server_process("--model", str(saved_folder), "--max-batch-size", "4", "--log-level", "warning") as (
        base_url,
        process,
    ):
        (card,) = httpx.get(f"{base_url}/v1/models").json()["data"]
        assert card["id"] == "orion_demo"
        answer = httpx.post(
            f"{base_url}/v1/chat/completions", json={**chat_body("Hi", max_tokens=3), "model": "orion_demo"}
        )
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 3

        started = [threading.Event() for _ in range(3)]
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(stream_to_the_end, base_url, event) for event in started]
            assert all(event.wait(30) for event in started)
            process.send_signal(signal.SIGTERM)
            results = [future.result(timeout=60) for future in futures]
        # uvicorn re-raises the signal once its graceful shutdown is over.
        assert process.wait(timeout=60) in (0, -signal.SIGTERM)
        assert "Traceback" not in process.stderr.read()
        for _, finish_reason, completion_tokens in results:
            assert finish_reason == "length"
            assert completion_tokens == MAX_TOKENS
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{base_url}/health", timeout=2)
