"""Probes of the single-process server, as a hostile client sends them (in the spirit of vLLM's and uvicorn's test
suites): every malformed body, out-of-range field, oversized image, stalled connection and drain answered as
documented (a 4xx with an OpenAI error object, a closed connection, or an error event), no request ended by another's
failure, and the server still answering afterwards."""

import base64
import io
import json
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import openai
import pytest
import torch
from PIL import Image
from serve_helpers import chat_body, data_url, free_port, served, tiny_parts, wait_healthy

from vlmheads.serve import GenerationEngine, TokenEvent
from vlmheads.serve.app import (
    PixelBudget,
    ServerLimits,
    ServerTimeouts,
    create_app,
    decode_image_url,
    processor_max_pixels,
    uvicorn_server,
)
from vlmheads.serve.models import EMBEDDED_MODEL_ID, load_model_folder
from vlmheads.serve.sampling import SEED_MAX

LIMITS = ServerLimits(max_image_pixels=100_000, max_request_pixels=150_000)


@pytest.fixture(scope="module")
def base_url(engine):
    with served(engine, limits=LIMITS) as url:
        yield url


def post(base_url: str, path: str = "/v1/chat/completions", **kwargs) -> httpx.Response:
    return httpx.post(f"{base_url}{path}", timeout=60, **kwargs)


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == ("invalid_request_error" if status < 500 else error["type"])
    if code is not None:
        assert error["code"] == code, error
    return error


def body_with(raw_field: str) -> bytes:
    """A chat body with one more field written as raw JSON text (what json.dumps cannot produce)."""
    return b'{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, ' + raw_field.encode() + b"}"


# ---- malformed and out-of-range bodies ----------------------------------------------------------------------------

MALFORMED_BODIES = {
    "nested 3,000 deep": (body_with('"x": ' + "[" * 3000 + "]" * 3000), "invalid_json"),
    "a 5,000-digit integer": (body_with('"seed": ' + "9" * 5000), "invalid_json"),
    "a 5,000-digit integer in an ignored field": (body_with('"user": ' + "9" * 5000), "invalid_json"),
    "a lone surrogate in model": (body_with('"model": "\\ud800"'), "invalid_json"),
    "invalid UTF-8": (body_with('"model": "') + b'\xff\xfe"}', "invalid_json"),
    "max_tokens true": (body_with('"stream": false').replace(b'"max_tokens": 2', b'"max_tokens": true'), None),
    "stream yes": (body_with('"stream": "yes"'), None),
    "temperature as a string": (body_with('"temperature": "0.5"'), None),
    "seed past uint64": (body_with(f'"seed": {SEED_MAX + 1}'), None),
    "seed as a float": (body_with('"seed": 1.0'), None),
    "temperature NaN": (body_with('"temperature": NaN'), None),
    "temperature Infinity": (body_with('"temperature": Infinity'), None),
    "temperature 1e308": (body_with('"temperature": 1e308'), None),
    "negative temperature": (body_with('"temperature": -0.5'), None),
    "top_p zero": (body_with('"top_p": 0'), None),
    "negative top_k": (body_with('"top_k": -1'), None),
    "a list body": (b"[1, 2]", None),
    "a null body": (b"null", None),
    "an empty body": (b"", "invalid_json"),
    "trailing garbage": (body_with('"n": 1') + b"}}}", "invalid_json"),
    "a message role that does not exist": (
        b'{"messages": [{"role": "wizard", "content": "Hi"}], "max_tokens": 2}',
        None,
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_BODIES))
def test_malformed_bodies_are_400s(base_url, case):
    content, code = MALFORMED_BODIES[case]
    response = post(base_url, content=content, headers={"Content-Type": "application/json"})
    error = assert_openai_error(response, 400, code or "invalid_value")
    assert "Internal" not in error["message"]


def test_strict_types_are_named(base_url):
    error = assert_openai_error(post(base_url, content=MALFORMED_BODIES["max_tokens true"][0]), 400)
    assert error["param"] == "max_tokens"
    error = assert_openai_error(post(base_url, content=MALFORMED_BODIES["stream yes"][0]), 400)
    assert error["param"] == "stream"
    error = assert_openai_error(post(base_url, content=MALFORMED_BODIES["seed past uint64"][0]), 400)
    assert error["param"] == "seed" and str(SEED_MAX) in error["message"]


@pytest.mark.parametrize("settings", [{"temperature": 1e-300}, {"temperature": 2.69e-38}, {"seed": SEED_MAX}])
def test_extreme_but_valid_sampling_settings_are_served(base_url, settings):
    """A temperature inside the range but below the sampler's floor samples at the floor; the largest seed works."""
    response = post(base_url, json=chat_body("Hi", max_tokens=4, **{"temperature": 1.0, **settings}))
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 4


def test_tiny_temperatures_do_not_end_their_batch_mates(base_url, engine):
    """Tiny-temperature requests decode in the same batches as greedy ones: every request completes."""

    def one(index: int) -> tuple[int, str]:
        settings = {"temperature": 2.69e-38, "seed": index} if index % 2 else {"temperature": 0}
        response = post(base_url, json=chat_body(f"Request {index}.", max_tokens=12, **settings))
        return response.status_code, response.json()["choices"][0]["finish_reason"]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(16)))
    assert results == [(200, "length")] * 16
    assert engine.num_active == 0


def test_the_official_client_gets_openai_errors(base_url):
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(
            model=EMBEDDED_MODEL_ID, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, seed=2**64
        )
    assert raised.value.body["param"] == "seed"
    answer = client.chat.completions.create(
        model=EMBEDDED_MODEL_ID, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, temperature=1e-300
    )
    assert answer.usage.completion_tokens == 2


# ---- /v1/trajectory: the model's own checks ------------------------------------------------------------------------


def driving_fields() -> dict:
    config = tiny_parts()[0].config
    generator = torch.Generator().manual_seed(0)
    return {
        "scene_queries": torch.randn(config.num_scene_queries, config.scene_query_dim, generator=generator).tolist(),
        "history_queries": torch.randn(
            config.num_history_queries, config.history_query_dim, generator=generator
        ).tolist(),
        "can_bus": torch.randn(config.can_bus_dim, generator=generator).tolist(),
    }


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e308"])
def test_trajectory_non_finite_values_are_400s_with_the_models_message(base_url, value):
    fields = driving_fields()
    text = json.dumps(fields)
    first = json.dumps(fields["can_bus"][0])
    content = text.replace(f'"can_bus": [{first}', f'"can_bus": [{value}', 1).encode()
    error = assert_openai_error(post(base_url, "/v1/trajectory", content=content), 400)
    assert "can_bus" in error["message"] and "NaN or inf" in error["message"]


# ---- images -------------------------------------------------------------------------------------------------------


def png_header_only(width: int, height: int) -> str:
    """A PNG data URL whose header declares `width` x `height` RGBA pixels and whose pixel data is garbage: a server
    that decodes before checking answers "unreadable image", one that checks the header "too large"."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"garbage") + chunk(b"IEND", b"")
    return f"data:image/png;base64,{base64.b64encode(png).decode()}"


def test_the_image_header_is_checked_before_decoding(base_url):
    error = assert_openai_error(
        post(base_url, json=chat_body("Hi", png_header_only(4096, 4096))), 400, "image_too_large"
    )
    assert "4096x4096" in error["message"] and "--max-image-pixels" in error["message"]
    # Within the limit, the same garbage is decoded, and found unreadable.
    assert_openai_error(post(base_url, json=chat_body("Hi", png_header_only(64, 64))), 400, "invalid_image")


def test_large_jpegs_decode_at_a_reduced_scale():
    photo = Image.effect_mandelbrot((1000, 800), (-2, -1.5, 1, 1.5), 50).convert("RGB")
    for image_format, expected in (("JPEG", (250, 200)), ("PNG", None)):
        url = data_url(photo, image_format)
        if expected is None:
            with pytest.raises(Exception, match="more than the 100000 allowed"):
                decode_image_url(url, LIMITS, "image")
        else:
            budget = PixelBudget(LIMITS)
            assert decode_image_url(url, LIMITS, "image", budget).size == expected
            assert budget.used == 250 * 200


def test_large_images_decode_near_the_processed_size():
    """An image of at least 4x the pixels the processor resizes to is decoded to a size nearer it (JPEG: a DCT
    scale, others: a whole-factor reduction right after decoding), never below it; the budget counts what was
    decoded."""
    limits = ServerLimits(max_image_pixels=4096 * 4096, processed_pixels=112 * 112)
    halves = Image.new("RGB", (1000, 800), (220, 20, 20))
    halves.paste((20, 20, 220), (500, 0, 1000, 800))
    for image, image_format, decoded in (
        (halves.convert("RGBA"), "PNG", 1000 * 800),
        (halves.convert("P"), "PNG", 1000 * 800),
        (halves, "JPEG", 250 * 200),  # 1/4 scale: the strongest of 1/2, 1/4, 1/8 that keeps 112x112
    ):
        budget = PixelBudget(limits)
        result = decode_image_url(data_url(image, image_format), limits, "image", budget)
        assert budget.used == decoded, image_format
        assert result.mode == "RGB" and 112 * 112 <= result.width * result.height < 4 * 112 * 112, result.size
        assert abs(result.width / result.height - 1000 / 800) < 0.05
        left, right = result.getpixel((2, 2)), result.getpixel((result.width - 3, 2))
        assert left[0] > 180 > left[2] and right[2] > 180 > right[0], (left, right)
    small = Image.new("RGB", (56, 56), (1, 2, 3))
    assert decode_image_url(data_url(small), limits, "image").size == (56, 56)


def test_a_requests_images_share_one_pixel_budget(base_url):
    image = Image.new("RGB", (300, 300), (200, 30, 30))  # 90,000 pixels: two exceed the request's 150,000
    body = chat_body("Two.", data_url(image))
    body["messages"][0]["content"].insert(0, {"type": "image_url", "image_url": {"url": data_url(image)}})
    error = assert_openai_error(post(base_url, json=body), 400, "image_too_large")
    assert "--max-request-pixels" in error["message"] and error["param"] == "messages.0.content.1"
    assert post(base_url, json=chat_body("One.", data_url(image), max_tokens=2)).status_code == 200


def test_the_default_image_limit_is_the_processors_max_pixels():
    _, processor = tiny_parts()
    assert processor_max_pixels(processor) == processor.image_processor.size["longest_edge"]
    limits = ServerLimits().resolved(processor)
    assert limits.max_image_pixels == processor_max_pixels(processor)
    assert limits.max_request_pixels == 2 * limits.max_image_pixels
    assert ServerLimits(max_image_pixels=7).resolved(processor).max_image_pixels == 7


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def test_six_large_rgba_requests_leave_memory_where_it_was(engine):
    """Six concurrent requests of four 4096x4096 RGBA PNGs each (a 349 KB body), under the default limits: refused on
    their headers, so memory stays within 10 % of its level before."""
    big = data_url(Image.new("RGBA", (4096, 4096), (10, 20, 30, 255)))
    body = chat_body("Four.", big)
    body["messages"][0]["content"][:0] = [{"type": "image_url", "image_url": {"url": big}}] * 3
    with served(engine) as url:
        post(url, json=chat_body("Warm up.", max_tokens=2))
        before = rss_bytes()
        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(lambda _: post(url, json=body), range(6)))
        after = rss_bytes()
        assert all(response.status_code == 400 for response in responses)
        assert responses[0].json()["error"]["code"] == "image_too_large"
        assert after <= 1.1 * before, (before, after)
        assert post(url, json=chat_body("Still there?", max_tokens=2)).status_code == 200


# ---- connections: header, body and drain deadlines ----------------------------------------------------------------


class EndlessEngine(GenerationEngine):
    """Emits a token every `interval` seconds until cancelled, then "abort"; `finite` ends a request after that many
    tokens instead."""

    model_id = EMBEDDED_MODEL_ID
    max_context = 4096

    def __init__(self, processor, interval: float = 0.02, finite: int | None = None):
        self.processor = processor
        self.interval, self.finite = interval, finite
        self.cancelled: set[str] = set()
        self.token_id = processor.tokenizer.encode("go")[0]

    def submit(self, request, on_event):
        def run() -> None:
            count = 0
            while request.request_id not in self.cancelled:
                time.sleep(self.interval)
                count += 1
                if self.finite is not None and count >= self.finite:
                    on_event(TokenEvent(request.request_id, self.token_id, finish_reason="length"))
                    return
                on_event(TokenEvent(request.request_id, self.token_id))
            on_event(TokenEvent(request.request_id, None, finish_reason="abort"))

        threading.Thread(target=run, daemon=True).start()

    def cancel(self, request_id):
        self.cancelled.add(request_id)

    def close(self, drain=True, timeout=None):
        pass


@contextmanager
def running(engine: GenerationEngine, timeouts: ServerTimeouts, limits: ServerLimits | None = None) -> Iterator:
    """The server `python -m vlmheads.serve` runs (uvicorn_server), in a thread; yields (base URL, server)."""
    port = free_port()
    server = uvicorn_server(create_app(engine, limits=limits), "127.0.0.1", port, timeouts, log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base_url)
        yield base_url, server
    finally:
        server.should_exit = True
        thread.join(30)


def closed_by_server(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        while sock.recv(4096):
            pass
        return True
    except TimeoutError:
        return False


def test_stalled_connections_are_closed():
    """A connection that sends nothing, and one that sends half a request head, are closed at the header timeout;
    a body that stops arriving is a 408 at the body timeout; the server answers afterwards."""
    timeouts = ServerTimeouts(keep_alive=1.0, header=0.5, shutdown=2.0)
    with running(EndlessEngine(tiny_parts()[1]), timeouts, ServerLimits(body_timeout=0.5)) as (base_url, _):
        port = int(base_url.rsplit(":", 1)[1])
        silent = socket.create_connection(("127.0.0.1", port))
        half = socket.create_connection(("127.0.0.1", port))
        half.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        assert closed_by_server(silent, 5) and closed_by_server(half, 5)
        assert time.monotonic() - started < 3
        slow_body = socket.create_connection(("127.0.0.1", port))
        slow_body.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        slow_body.settimeout(5)
        assert slow_body.recv(4096).startswith(b"HTTP/1.1 408")
        for sock in (silent, half, slow_body):
            sock.close()
        assert httpx.get(f"{base_url}/health").status_code == 200


def read_stream(base_url: str, started: threading.Event, body: dict) -> list[str]:
    lines = []
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=30) as response:
        for line in response.iter_lines():
            if line:
                lines.append(line)
                started.set()
    return lines


def test_the_drain_deadline_ends_open_streams_with_an_error_event():
    """On shutdown, a request that ends within the drain deadline finishes; an endless one gets an error event and
    [DONE] at the deadline, and the server stops."""
    processor = tiny_parts()[1]
    body = {**chat_body("Go on."), "stream": True}
    for engine, finishes in ((EndlessEngine(processor), False), (EndlessEngine(processor, finite=10), True)):
        started = threading.Event()
        with running(engine, ServerTimeouts(shutdown=3.0)) as (base_url, server):
            with ThreadPoolExecutor(1) as pool:
                future = pool.submit(read_stream, base_url, started, body)
                assert started.wait(10)
                stopping = time.monotonic()
                server.should_exit = True
                lines = future.result(timeout=20)
            took = time.monotonic() - stopping
        assert lines[-1] == "data: [DONE]"
        last = json.loads(lines[-2].removeprefix("data: "))
        if finishes:
            assert last["choices"][0]["finish_reason"] == "length"
        else:
            assert last["error"]["code"] == "server_shutdown" and 2.9 < took < 10


# ---- trust --------------------------------------------------------------------------------------------------------


def test_model_folders_run_their_own_code_only_when_trusted(tmp_path):
    """vlmheads' own model types load from the installed package without --trust-remote-code; a folder whose type
    only its shipped code defines is refused without it."""
    model, processor = tiny_parts()
    folder = tmp_path / "orion"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    loaded, _ = load_model_folder(str(folder))
    assert type(loaded) is type(model)
    config = json.loads((folder / "config.json").read_text())
    assert config.get("auto_map"), "the saved folder ships its code"
    config["model_type"] = "someone_elses_model"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="--trust-remote-code"):
        load_model_folder(str(folder))


def test_the_server_still_answers_after_every_probe(base_url, engine):
    for content, _ in MALFORMED_BODIES.values():
        post(base_url, content=content)
    response = post(base_url, json=chat_body("Still there?", max_tokens=3))
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 3
    assert engine.num_active == 0


def test_png_probe_body_is_as_small_as_the_issue_says():
    big = data_url(Image.new("RGBA", (4096, 4096), (10, 20, 30, 255)))
    assert len(base64.b64decode(big.split(",", 1)[1])) < 100_000
    assert Image.open(io.BytesIO(base64.b64decode(big.split(",", 1)[1]))).size == (4096, 4096)
