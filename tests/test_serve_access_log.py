"""The server's access log: one line per HTTP request on `vlmheads.serve.access`, with the request id echoed in
`X-Request-Id`, token counts where the route has them, and nothing of the key, the prompt or the images."""

import json
import logging
import threading
import time

import httpx
import pytest
from serve_helpers import camera_data_url, chat_body, served

from vlmheads.serve.__main__ import parse_args
from vlmheads.serve.access_log import ACCESS_LOGGER, MAX_LOGGED_PATH

API_KEY = "sk-access-log-secret-7c1f"
PROMPT = "Describe the zebra crossing near the bakery."


@pytest.fixture(scope="module")
def base_url(engine):
    with served(engine, api_key=API_KEY) as url:
        yield url


@pytest.fixture
def http(base_url):
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as client:
        yield client


@pytest.fixture
def access(caplog):
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    return caplog


def access_line(caplog, request_id: str, timeout: float = 10.0) -> logging.LogRecord:
    """The access record of `request_id`; the server logs it just after the response's last byte, so wait."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [r for r in caplog.records if r.name == ACCESS_LOGGER and r.access["request_id"] == request_id]
        if found:
            assert len(found) == 1, found
            return found[0]
        time.sleep(0.02)
    raise AssertionError(f"no access line for request {request_id}")


def assert_nothing_secret(record: logging.LogRecord) -> None:
    text = record.getMessage() + json.dumps(record.access)
    assert API_KEY not in text and "zebra" not in text and "base64" not in text


def test_a_json_request_is_logged_with_its_tokens(http, access):
    body = chat_body(PROMPT, camera_data_url(1), max_tokens=4, temperature=0)
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    request_id = response.headers["x-request-id"]
    assert len(request_id) == 32 and int(request_id, 16) >= 0  # generated: a UUID's hex
    record = access_line(access, request_id)
    usage = response.json()["usage"]
    fields = record.access
    assert fields["method"] == "POST" and fields["path"] == "/v1/chat/completions" and fields["status"] == 200
    assert (
        fields["prompt_tokens"] == usage["prompt_tokens"] and fields["completion_tokens"] == usage["completion_tokens"]
    )
    assert fields["latency_ms"] > 0 and fields["client"].startswith("127.0.0.1:")
    assert record.levelno == logging.INFO
    message = record.getMessage()
    assert f"request_id={request_id}" in message and "status=200" in message
    assert f"prompt_tokens={usage['prompt_tokens']}" in message and "latency_ms=" in message
    assert_nothing_secret(record)


class HeldEngine:
    """The tiny engine, except that each request's last event waits for `release`: a stream cannot end before the
    test says so."""

    def __init__(self, engine):
        self.engine = engine
        self.release = threading.Event()

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def submit(self, request, on_event):
        def held(event):
            if event.finish_reason is not None:
                self.release.wait(60)
            on_event(event)

        self.engine.submit(request, held)


def test_a_stream_is_logged_when_it_ends(engine, access):
    held = HeldEngine(engine)
    body = chat_body(PROMPT, max_tokens=6, temperature=0, stream=True, stream_options={"include_usage": True})
    with served(held) as url, httpx.Client(base_url=url, timeout=60) as http:
        request = http.build_request("POST", "/v1/chat/completions", json=body, headers={"X-Request-Id": "stream-1"})
        response = http.send(request, stream=True)
        assert response.status_code == 200 and response.headers["x-request-id"] == "stream-1"
        lines = response.iter_lines()
        assert next(lines).startswith("data: {")  # the role chunk: the stream is open
        time.sleep(0.3)
        assert not [r for r in access.records if r.name == ACCESS_LOGGER and r.access["request_id"] == "stream-1"]
        held.release.set()
        data = [line for line in lines if line.startswith("data: {")]
        response.close()
    usage = json.loads(data[-1][len("data: ") :])["usage"]
    fields = access_line(access, "stream-1").access
    assert fields["status"] == 200 and fields["path"] == "/v1/chat/completions" and fields["latency_ms"] >= 300
    assert (
        fields["prompt_tokens"] == usage["prompt_tokens"] and fields["completion_tokens"] == usage["completion_tokens"]
    )
    assert usage["completion_tokens"] == 6


def test_client_errors_are_logged_with_their_status(http, access, base_url):
    bad = http.post("/v1/chat/completions", content=b"{not json", headers={"X-Request-Id": "bad-json"})
    assert bad.status_code == 400 and bad.headers["x-request-id"] == "bad-json"
    fields = access_line(access, "bad-json").access
    assert fields["status"] == 400 and fields["prompt_tokens"] is None and fields["completion_tokens"] is None
    # The key guard answers before the app, and is logged too; the wrong key given is not.
    denied = httpx.post(
        f"{base_url}/v1/chat/completions",
        json=chat_body(PROMPT),
        headers={"Authorization": "Bearer sk-wrong-key-55", "X-Request-Id": "no-key"},
    )
    assert denied.status_code == 401 and denied.headers["x-request-id"] == "no-key"
    record = access_line(access, "no-key")
    assert record.access["status"] == 401 and "sk-wrong-key-55" not in record.getMessage()
    assert_nothing_secret(record)
    missing = http.get("/v1/nowhere", headers={"X-Request-Id": "missing"})
    assert missing.status_code == 404
    fields = access_line(access, "missing").access
    assert fields["status"] == 404 and fields["method"] == "GET" and fields["path"] == "/v1/nowhere"


def test_the_request_id_is_the_clients_when_sane(http, access):
    sane = "0b5e/trace:42=ok+1_a.b-c"
    assert http.get("/v1/models", headers={"X-Request-Id": sane}).headers["x-request-id"] == sane
    assert access_line(access, sane).access["status"] == 200
    for insane in ("two words", "a" * 129, 'quote"d', "", "\u00e9t\u00e9"):
        response = http.get("/v1/models", headers={"X-Request-Id": insane.encode("utf-8")})
        replaced = response.headers["x-request-id"]
        assert replaced != insane and len(replaced) == 32
        access_line(access, replaced)


def test_paths_are_logged_escaped_and_cut(http, access):
    response = http.get("/v1/x%0Ainjected%20line" + "y" * 1000, headers={"X-Request-Id": "long-path"})
    assert response.status_code == 404
    message = access_line(access, "long-path").getMessage()
    assert "\n" not in message and "%0Ainjected%20line" in message
    assert len(access_line(access, "long-path").access["path"]) < MAX_LOGGED_PATH + 20


def test_the_access_log_can_be_turned_off(engine, access):
    with served(engine, access_log=False) as url:
        response = httpx.get(f"{url}/v1/models", headers={"X-Request-Id": "quiet"})
        assert response.headers["x-request-id"] == "quiet"
        time.sleep(0.2)
    assert not [r for r in access.records if r.name == ACCESS_LOGGER]
    assert parse_args([]).access_log is True
    assert parse_args(["--no-access-log"]).access_log is False
    assert parse_args(["--disable-log-requests"]).access_log is False
