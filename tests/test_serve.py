"""The OpenAI-compatible server over the tiny Orion model, talked to by the official `openai` client and httpx."""

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import httpx
import openai
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, ConfigDict
from receipt_helpers import make_model as make_receipt_model
from receipt_helpers import make_processor as make_receipt_processor
from receipt_helpers import photo
from serve_helpers import (
    camera_data_url,
    camera_image,
    chat_body,
    data_url,
    served,
    tiny_parts,
)

from vlmheads.modeling.capabilities import backbone_config_of
from vlmheads.serve import GenerationEngine, GenerationRequest, LocalEngine, TokenEvent
from vlmheads.serve.__main__ import parse_args
from vlmheads.serve.app import API_KEY_ENV, ServerLimits
from vlmheads.serve.models import EMBEDDED_MODEL_ID
from vlmheads.serve.openai_protocol import MAX_CHOICES
from vlmheads.serve.prefix_cache import PrefixCache, block_keys
from vlmheads.serve.sampling import RequestSampler, SamplingParams, sample_rows
from vlmheads.serve.structured import GrammarCompiler, GrammarConstraint

LIMITS = ServerLimits(max_body_bytes=200_000, max_images=2, max_image_bytes=60_000, max_image_pixels=100_000)


@pytest.fixture(scope="module")
def base_url(engine):
    with served(engine, limits=LIMITS) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


def generate_text(prompt_text: str, image=None, max_new_tokens: int = 8) -> tuple[str, int]:
    """The greedy answer of single-request `model.generate` to one user turn, and the prompt length."""
    model, processor = tiny_parts()
    content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": prompt_text}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(images=None if image is None else [image], text=[prompt], return_tensors="pt")
    eos = model.generation_config.eos_token_id
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos)
    prompt_tokens = inputs["input_ids"].shape[1]
    return processor.decode(output[0, prompt_tokens:], skip_special_tokens=True), prompt_tokens


def test_openai_client_with_an_image(client):
    body = chat_body("What is on the road?", camera_data_url(3))
    response = client.chat.completions.create(
        model=EMBEDDED_MODEL_ID, messages=body["messages"], max_tokens=8, temperature=0
    )
    expected, prompt_tokens = generate_text("What is on the road?", camera_image(3))
    assert response.choices[0].message.content == expected
    assert response.choices[0].finish_reason == "length"
    assert response.usage.prompt_tokens == prompt_tokens
    assert response.usage.completion_tokens == 8
    assert response.usage.total_tokens == prompt_tokens + 8
    assert response.id.startswith("chatcmpl-") and response.model == EMBEDDED_MODEL_ID


def test_openai_client_streaming_with_usage(client):
    body = chat_body("Stream me an answer.", camera_data_url(4))
    chunks = list(
        client.chat.completions.create(
            model=EMBEDDED_MODEL_ID,
            messages=body["messages"],
            max_completion_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    expected, prompt_tokens = generate_text("Stream me an answer.", camera_image(4), max_new_tokens=6)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks[:-1]) == expected
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.prompt_tokens == prompt_tokens
    assert all(chunk.usage is None for chunk in chunks[:-1])


def reference_logprobs(prompt_text: str, max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """The greedy tokens of `model.generate` and the model's log-softmax at each step (steps, V)."""
    model, processor = tiny_parts()
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": prompt_text}]}], add_generation_prompt=True
    )
    inputs = processor(text=[prompt], return_tensors="pt")
    output = model.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    tokens = output.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    return tokens, torch.log_softmax(torch.cat(output.logits).float(), dim=-1)


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_are_the_models_log_softmax(client, stream):
    """logprobs / top_logprobs through the official client: each chosen token's value and the top 3 are the
    model's own log-softmax at that step, in order."""
    tokens, logprobs = reference_logprobs("Rate the road.", 5)
    answer = client.chat.completions.create(
        model=EMBEDDED_MODEL_ID,
        messages=[{"role": "user", "content": "Rate the road."}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        stream=stream,
    )
    if stream:
        entries = [
            entry
            for chunk in answer
            if chunk.choices and chunk.choices[0].logprobs
            for entry in chunk.choices[0].logprobs.content
        ]
    else:
        entries = answer.choices[0].logprobs.content
    _, processor = tiny_parts()
    assert [entry.token for entry in entries] == [processor.decode([token]) for token in tokens]
    for step, (token, entry) in enumerate(zip(tokens, entries, strict=True)):
        assert entry.logprob == pytest.approx(float(logprobs[step, token]), abs=1e-4)
        values, ids = logprobs[step].topk(3)
        assert [top.token for top in entry.top_logprobs] == [processor.decode([index]) for index in ids.tolist()]
        assert [top.logprob for top in entry.top_logprobs] == pytest.approx(values.tolist(), abs=1e-4)
        assert entry.bytes == list(entry.token.encode())
    plain = client.chat.completions.create(
        model=EMBEDDED_MODEL_ID, messages=[{"role": "user", "content": "Rate the road."}], max_tokens=2
    )
    assert plain.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        client.chat.completions.create(
            model=EMBEDDED_MODEL_ID, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, top_logprobs=2
        )


def test_n_choices_are_sampled_apart_and_reproducibly(client):
    """n choices through the official client: choice i samples with seed + i (choice 0 is the n=1 answer), plain
    and streamed alike, and usage counts every choice's tokens."""
    settings = {"model": EMBEDDED_MODEL_ID, "max_tokens": 8, "temperature": 1.3, "seed": 5}
    messages = [{"role": "user", "content": "Invent a road sign."}]
    answer = client.chat.completions.create(messages=messages, n=3, **settings)
    texts = [choice.message.content for choice in answer.choices]
    assert [choice.index for choice in answer.choices] == [0, 1, 2]
    assert len(set(texts)) == 3
    assert answer.usage.completion_tokens == 24
    assert client.chat.completions.create(messages=messages, **settings).choices[0].message.content == texts[0]
    chunks = list(client.chat.completions.create(messages=messages, n=3, stream=True, **settings))
    streamed = ["", "", ""]
    finish = [None, None, None]
    for chunk in chunks:
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
            finish[choice.index] = choice.finish_reason or finish[choice.index]
    assert streamed == texts and finish == ["length"] * 3


def scrape(base_url: str) -> dict[str, float]:
    """GET /metrics as {sample name with labels: value}."""
    response = httpx.get(f"{base_url}/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f"{key}={value}" for key, value in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def test_prometheus_metrics_count_tokens_latencies_and_load(client, base_url, engine):
    before = scrape(base_url)
    answer = client.chat.completions.create(
        model=EMBEDDED_MODEL_ID, messages=[{"role": "user", "content": "Count me."}], max_tokens=5, temperature=0
    )
    after = scrape(base_url)

    def grew(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    assert grew("vlmheads:prompt_tokens_total") == answer.usage.prompt_tokens
    assert grew("vlmheads:generation_tokens_total") == 5
    assert grew("vlmheads:time_to_first_token_seconds_count") == 1
    assert grew("vlmheads:inter_token_latency_seconds_count") == 4
    assert grew("vlmheads:e2e_request_latency_seconds_count") == 1
    assert grew("vlmheads:request_success_total{finished_reason=length}") == 1
    assert after["vlmheads:num_requests_running"] == 0 and after["vlmheads:kv_cache_tokens"] == 0
    # A request without stop tokens decodes until cancelled: the gauges see it.
    _, processor = tiny_parts()
    prompt = processor.apply_chat_template([{"role": "user", "content": "Talk."}], add_generation_prompt=True)
    decoding = threading.Event()
    inputs = dict(processor(text=[prompt], return_tensors="pt"))
    engine.submit(GenerationRequest("metrics-probe", inputs, 4000), lambda event: decoding.set())
    assert decoding.wait(30)
    during = scrape(base_url)
    engine.cancel("metrics-probe")
    assert during["vlmheads:num_requests_running"] == 1 and during["vlmheads:kv_cache_tokens"] > 0
    wait_idle(engine)


class TurnAnswer(BaseModel):
    """The structured answer asked for: its JSON schema goes out, and answers are validated against it."""

    model_config = ConfigDict(extra="forbid")

    turn: Literal["left", "right", "straight"]
    brake: bool
    lane: Literal[1, 2, 3]


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_structured_output_follows_the_schema_and_the_regex(client, temperature):
    """response_format json_schema and vLLM's guided_regex through the official client: the random tiny model's
    answers are valid JSON of the schema (validated by the pydantic model that wrote it) and full matches of the
    regex."""
    messages = [{"role": "user", "content": "Which way?"}]
    settings = {"model": EMBEDDED_MODEL_ID, "max_tokens": 60, "temperature": temperature, "seed": 3}
    json_schema = {"name": "turn", "schema": TurnAnswer.model_json_schema()}
    answer = client.chat.completions.create(
        messages=messages, response_format={"type": "json_schema", "json_schema": json_schema}, n=2, **settings
    )
    for choice in answer.choices:
        TurnAnswer.model_validate_json(choice.message.content, strict=True)
        assert choice.finish_reason == "stop"
    pattern = r"(left|right) in [1-9][0-9]? m"
    answer = client.chat.completions.create(messages=messages, extra_body={"guided_regex": pattern}, **settings)
    assert re.fullmatch(pattern, answer.choices[0].message.content)
    with pytest.raises(openai.BadRequestError, match="guided_regex"):
        client.chat.completions.create(messages=messages, extra_body={"guided_regex": "(unclosed"}, **settings)


class CountingMatcher:
    """A grammar matcher that counts its bitmask fills."""

    def __init__(self, matcher):
        self.matcher, self.fills = matcher, 0

    def __getattr__(self, name):
        return getattr(self.matcher, name)

    def fill_next_token_bitmask(self, *args):
        self.fills += 1
        return self.matcher.fill_next_token_bitmask(*args)


def test_constrained_greedy_rows_pick_the_best_token_the_grammar_allows():
    """A greedy constrained row takes the best of the model's tokens that the grammar allows, offering them one by
    one before it fills a bitmask; its token always equals the argmax of the masked logits."""
    model, processor = tiny_parts()
    tokenizer = processor.tokenizer
    vocab_size = backbone_config_of(model.config).get_text_config(decoder=True).vocab_size
    compiled = GrammarCompiler(tokenizer, vocab_size, (tokenizer.eos_token_id,)).compile("regex", "[a-z]+( [a-z]+)*")
    constraint, shadow = GrammarConstraint(compiled, vocab_size), GrammarConstraint(compiled, vocab_size)
    constraint.matcher = CountingMatcher(constraint.matcher)
    sampler = RequestSampler(SamplingParams(), constraint)
    generator = torch.Generator().manual_seed(0)
    letters = [tokenizer.convert_tokens_to_ids(word) for word in ("road", "lane", "car")]
    digits = [tokenizer.convert_tokens_to_ids(digit) for digit in "0123456789"]
    for step in range(16):
        logits = torch.randn(1, vocab_size, generator=generator)
        if step % 4 == 1:  # the model's best token is a word, which the grammar allows
            logits[0, letters[step % 3]] = 100.0
        elif step % 4 == 2:  # its 5 best tokens are digits, then comes a word
            logits[0, digits[:5]] = torch.arange(110.0, 105.0, -1.0)
            logits[0, letters[step % 3]] = 99.0
        elif step % 4 == 3:  # its 10 best tokens are digits, more than are offered: the bitmask decides
            logits[0, digits] = torch.arange(110.0, 100.0, -1.0)
        masked = logits[0].clone()
        shadow.mask(masked)
        expected = int(masked.argmax())
        assert sample_rows(logits, [sampler]) == [expected]
        shadow.accept(expected)
    # The 4 steps with 10 digits on top filled the bitmask (random logits rarely add one: 9 forbidden in a row).
    assert 4 <= constraint.matcher.fills <= 6


def test_stream_without_usage_ends_with_done(base_url):
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=chat_body("Hi", max_tokens=3, stream=True)) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]"
    payloads = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all(payload["object"] == "chat.completion.chunk" and "usage" not in payload for payload in payloads)


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_cut_the_answer(client, stream):
    full, _ = generate_text("Say something long.", max_new_tokens=12)
    stop = full[4:7]
    response = client.chat.completions.create(
        model=EMBEDDED_MODEL_ID,
        messages=chat_body("Say something long.")["messages"],
        max_tokens=12,
        temperature=0,
        stop=[stop, "never appears here"],
        stream=stream,
    )
    if stream:
        chunks = list(response)
        text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
        finish_reason = chunks[-1].choices[0].finish_reason
    else:
        text, finish_reason = response.choices[0].message.content, response.choices[0].finish_reason
    assert text == full[: full.find(stop)]
    assert finish_reason == "stop"


def test_seeded_sampling_is_reproducible(base_url):
    body = chat_body("Surprise me.", max_tokens=10, temperature=1.2, top_p=0.95, seed=11)
    first, second = (httpx.post(f"{base_url}/v1/chat/completions", json=body).json() for _ in range(2))
    assert first["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"]


def test_models_and_health(client, base_url, engine):
    (card,) = client.models.list().data
    assert card.id == EMBEDDED_MODEL_ID and card.max_model_len == engine.max_context
    assert httpx.get(f"{base_url}/health").status_code == 200


def oversized_image_url() -> str:
    return data_url(photo(0, 160, 160))


ERROR_CASES = {
    "malformed json": ({"content": b'{"messages": ['}, 400, None, "invalid_json"),
    "unknown model": ({"json": {**chat_body("Hi"), "model": "gpt-17"}}, 404, "model", "model_not_found"),
    "no messages": ({"json": {"model": EMBEDDED_MODEL_ID, "messages": []}}, 400, "messages", "invalid_value"),
    "non-image data url": (
        {"json": chat_body("Hi", "data:text/plain;base64,aGVsbG8=")},
        400,
        "messages.0.content.0",
        "invalid_image",
    ),
    "undecodable image": (
        {"json": chat_body("Hi", "data:image/png;base64,aGVsbG8=")},
        400,
        "messages.0.content.0",
        "invalid_image",
    ),
    "not base64": (
        {"json": chat_body("Hi", "data:image/png;base64,***")},
        400,
        "messages.0.content.0",
        "invalid_image",
    ),
    "oversized data url": (
        {"json": chat_body("Hi", oversized_image_url())},
        400,
        "messages.0.content.0",
        "image_too_large",
    ),
    "image with too many pixels": (
        {"json": chat_body("Hi", data_url(Image.new("RGB", (400, 400))))},
        400,
        "messages.0.content.0",
        "image_too_large",
    ),
    "unknown content part": (
        {"json": {"messages": [{"role": "user", "content": [{"type": "input_audio", "data": "x"}]}]}},
        400,
        None,
        "invalid_value",
    ),
    "remote url": (
        {"json": chat_body("Hi", "https://example.com/cat.png")},
        400,
        "messages.0.content.0",
        "remote_image_refused",
    ),
    "too many images": (
        {
            "json": {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": camera_data_url(i)}} for i in range(3)],
                    }
                ]
            }
        },
        400,
        "messages",
        "too_many_images",
    ),
    "prompt longer than the context": (
        {"json": chat_body("word " * 4200)},
        400,
        "messages",
        "context_length_exceeded",
    ),
    "completion past the context": (
        {"json": chat_body("Hi", max_tokens=4090)},
        400,
        "max_tokens",
        "context_length_exceeded",
    ),
    "max_tokens zero": ({"json": chat_body("Hi", max_tokens=0)}, 400, "max_tokens", "invalid_value"),
    "max_completion_tokens negative": (
        {"json": chat_body("Hi", max_completion_tokens=-3)},
        400,
        "max_completion_tokens",
        "invalid_value",
    ),
    "n above the limit": ({"json": chat_body("Hi", n=MAX_CHOICES + 1)}, 400, "n", "invalid_value"),
    "empty stop string": ({"json": chat_body("Hi", stop=[""])}, 400, None, "invalid_value"),
    "oversized body": ({"json": chat_body("x" * 250_000)}, 413, None, "body_too_large"),
    "oversized chunked body": ({"content": iter([b"x" * 150_000] * 2)}, 413, None, "body_too_large"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_bad_requests_get_openai_errors(base_url, case):
    request, status, param, code = ERROR_CASES[case]
    response = httpx.post(f"{base_url}/v1/chat/completions", **request, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["code"] == code
    if param is not None:
        assert error["param"] == param


def test_the_server_keeps_serving_after_bad_requests(base_url, engine):
    for request, _, _, _ in ERROR_CASES.values():
        httpx.post(f"{base_url}/v1/chat/completions", **request, timeout=30)
    response = httpx.post(f"{base_url}/v1/chat/completions", json=chat_body("Still there?", max_tokens=2))
    assert response.status_code == 200
    assert engine.num_active == 0


def test_unknown_route_and_method(base_url):
    assert httpx.get(f"{base_url}/v1/nothing").json()["error"]["type"] == "not_found_error"
    assert httpx.get(f"{base_url}/v1/chat/completions").status_code == 405


def wait_idle(engine, timeout: float = 5.0) -> float:
    start = time.monotonic()
    while engine.num_active and time.monotonic() - start < timeout:
        time.sleep(0.02)
    return time.monotonic() - start


def test_client_leaving_a_stream_frees_its_slot(base_url, engine):
    body = chat_body("Talk forever.", max_tokens=4000, stream=True)
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        assert engine.num_active == 1
    assert wait_idle(engine) < 5.0
    assert engine.num_active == 0


def test_client_leaving_a_plain_request_frees_its_slot(base_url, engine):
    body = chat_body("Talk forever.", max_tokens=4000)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=0.5)
    assert wait_idle(engine) < 5.0
    assert engine.num_active == 0


# ---- auth ---------------------------------------------------------------------------------------------------------


def test_api_key_guards_every_endpoint_but_health(engine):
    with served(engine, api_key="sekret") as url:
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/trajectory")):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
                response = httpx.request(method, f"{url}{path}", headers=headers, json=chat_body("Hi"))
                assert response.status_code == 401
                assert response.json()["error"]["type"] == "authentication_error"
        assert httpx.get(f"{url}/health").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        authorised = openai.OpenAI(base_url=f"{url}/v1", api_key="sekret", max_retries=0)
        answer = authorised.chat.completions.create(
            model=EMBEDDED_MODEL_ID, messages=chat_body("Hi")["messages"], max_tokens=2
        )
        assert answer.usage.completion_tokens == 2


def test_api_key_from_the_environment(monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert parse_args([]).api_key == "from-env"
    assert parse_args(["--api-key", "flag"]).api_key == "flag"


# ---- /v1/trajectory -----------------------------------------------------------------------------------------------


def driving_body(image: bool, scene_rows: int | None = None) -> dict:
    model, _ = tiny_parts()
    config = model.config
    generator = torch.Generator().manual_seed(5)
    body = {
        "scene_queries": torch.randn(
            scene_rows or config.num_scene_queries, config.scene_query_dim, generator=generator
        ).tolist(),
        "history_queries": torch.randn(
            config.num_history_queries, config.history_query_dim, generator=generator
        ).tolist(),
        "can_bus": torch.randn(config.can_bus_dim, generator=generator).tolist(),
        "prompt": "Turn left at the junction.",
    }
    if image:
        body["image"] = camera_data_url(6)
    return body


@pytest.mark.parametrize("image", [True, False])
def test_trajectory_returns_the_models_waypoints(base_url, image):
    body = driving_body(image)
    response = httpx.post(f"{base_url}/v1/trajectory", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    model, processor = tiny_parts()
    content = [{"type": "image"}] if image else []
    content += [
        {"type": "scene"},
        {"type": "history"},
        {"type": "can_bus"},
        {"type": "text", "text": body["prompt"]},
        {"type": "ego"},
    ]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(
        images=[[camera_image(6)]] if image else None,
        text=[prompt],
        scene_queries=torch.tensor([body["scene_queries"]]),
        history_queries=torch.tensor([body["history_queries"]]),
        can_bus=torch.tensor([body["can_bus"]]),
        return_tensors="pt",
    )
    with torch.no_grad():
        expected = model(**inputs).trajectory[0]
    waypoints = torch.tensor(result["waypoints"])
    assert waypoints.shape == (model.config.num_waypoints, model.config.waypoint_dim)
    assert torch.allclose(waypoints, expected, atol=1e-5)
    assert result["usage"]["prompt_tokens"] == inputs["input_ids"].shape[1]


def test_trajectory_refuses_wrong_shapes(base_url):
    response = httpx.post(f"{base_url}/v1/trajectory", json=driving_body(False, scene_rows=3))
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "scene_queries"
    missing = {key: value for key, value in driving_body(False).items() if key != "can_bus"}
    response = httpx.post(f"{base_url}/v1/trajectory", json=missing)
    assert response.status_code == 400 and response.json()["error"]["param"] == "can_bus"


def test_a_repeated_prompt_holds_one_prefix_cache_entry():
    """Storing a prompt again (after a hit) replaces its own entry instead of evicting another prompt's."""
    cache = PrefixCache(max_entries=2)
    layers = [(torch.zeros(1, 1, 48, 4), torch.zeros(1, 1, 48, 4))]
    prompt, other = block_keys(torch.arange(48), b"image"), block_keys(torch.arange(48) + 100, b"image")
    cache.store(other, layers)
    cache.store(prompt, layers)
    for _ in range(3):
        assert cache.longest_prefix(prompt, minimum=0, limit=47)[1] == 32
        cache.store(prompt, layers)
    assert len(cache.entries) == 2 and cache.longest_prefix(other, minimum=0, limit=47)[1] == 32
    # A longer prompt that opens with a cached one takes over all of its keys: the shorter entry goes.
    longer = block_keys(torch.arange(64), b"image")
    cache.store(longer, [(torch.zeros(1, 1, 64, 4), torch.zeros(1, 1, 64, 4))])
    assert len(cache.entries) == 2 and cache.longest_prefix(longer, minimum=0, limit=63)[1] == 48
    assert cache.longest_prefix(other, minimum=0, limit=47)[1] == 32


# ---- /classify ----------------------------------------------------------------------------------------------------


def test_a_repeated_prompt_reuses_its_cache_and_first_logits():
    """The same whole prompt (text and image) again runs no model call before its first token, and answers with the
    same tokens as model.generate; the same text with another image runs its prefill."""
    model, processor = tiny_parts()
    engine = LocalEngine(model, processor, prefix_cache_entries=4)
    text = "Describe the road ahead of the car: the lanes, the signs, the lights and every vehicle, in detail."
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}], add_generation_prompt=True
    )
    same, other = (dict(processor(images=[camera_image(seed)], text=[prompt], return_tensors="pt")) for seed in (1, 2))
    calls = []
    hook = model.register_forward_pre_hook(lambda module, args: calls.append(module))

    def first_token_calls(inputs: dict, request_id: str) -> tuple[int, list[int]]:
        """Model calls before the request's first token, and its 6 greedy tokens."""
        tokens, at_first_token, before, done = [], [], len(calls), threading.Event()

        def on_event(event: TokenEvent) -> None:
            if event.token_id is not None:
                if not tokens:
                    at_first_token.append(len(calls))
                tokens.append(event.token_id)
            if event.finish_reason is not None:
                done.set()

        engine.submit(GenerationRequest(request_id, inputs, 6), on_event)
        assert done.wait(60)
        return at_first_token[0] - before, tokens

    try:
        expected = model.generate(**same, max_new_tokens=6, do_sample=False, eos_token_id=[])[0, -6:].tolist()
        assert first_token_calls(same, "first") == (1, expected)
        assert first_token_calls(same, "repeat") == (0, expected)
        assert first_token_calls(other, "other image")[0] == 1
        assert engine.prefix_cache.repeats == 1
    finally:
        hook.remove()
        engine.close()


#: Pixel limits that the classify tests' photos (at most 48x40 + 30x90) keep within, and three 80x60 images exceed.
RECEIPT_LIMITS = ServerLimits(max_image_pixels=10_000, max_request_pixels=12_000)


@pytest.fixture(scope="module")
def receipt_server():
    processor = make_receipt_processor()
    model = make_receipt_model(processor)
    engine = LocalEngine(model, processor, model_id="tiny-receipts")
    with served(engine, limits=RECEIPT_LIMITS) as url:
        yield url, model, processor
    engine.close()


def test_classify_images(receipt_server):
    url, model, processor = receipt_server
    photos = [photo(1), photo(2, 30, 90)]
    response = httpx.post(f"{url}/classify", json={"model": "tiny-receipts", "input": [data_url(p) for p in photos]})
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["object"] == "list" and result["id"].startswith("classify-")
    prompt = [processor.classification_prompt()] if model.config.pooling == "multimodal" else None
    prompt_tokens = 0
    for index, (entry, image) in enumerate(zip(result["data"], photos, strict=True)):
        inputs = processor(images=[image], text=prompt, return_tensors="pt")
        prompt_tokens += inputs["input_ids"].shape[1] if "input_ids" in inputs else 0
        with torch.no_grad():
            expected = model(**inputs).logits[0].softmax(-1)
        assert entry["index"] == index and entry["num_classes"] == model.config.num_labels
        assert torch.allclose(torch.tensor(entry["probs"]), expected, atol=1e-5)
        assert entry["label"] == model.config.id2label[int(expected.argmax())]
    assert result["usage"]["prompt_tokens"] == prompt_tokens and result["usage"]["completion_tokens"] == 0


def test_classify_a_chat_turn(receipt_server):
    url, _, _ = receipt_server
    body = {"messages": chat_body("How many receipts?", data_url(photo(3)))["messages"]}
    result = httpx.post(f"{url}/classify", json=body).json()
    assert len(result["data"]) == 1 and abs(sum(result["data"][0]["probs"]) - 1) < 1e-5


def test_classify_counts_every_image_against_the_request_pixel_budget(receipt_server):
    url, _, _ = receipt_server
    images = [data_url(photo(seed, 80, 60)) for seed in range(3)]  # 4,800 pixels each; the request may hold 12,000
    assert httpx.post(f"{url}/classify", json={"input": images[:2]}).status_code == 200
    response = httpx.post(f"{url}/classify", json={"input": images})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "image_too_large" and error["param"] == "input.2"
    assert "14400 pixels" in error["message"] and "--max-request-pixels" in error["message"]
    turn = [{"type": "image_url", "image_url": {"url": image}} for image in images]
    turn.append({"type": "text", "text": "How many?"})
    response = httpx.post(f"{url}/classify", json={"messages": [{"role": "user", "content": turn}]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages.0.content.2"


def test_endpoints_a_model_lacks_are_refused(receipt_server, base_url):
    url, _, _ = receipt_server
    assert httpx.post(f"{url}/v1/trajectory", json=driving_body(False)).status_code == 404
    assert httpx.post(f"{base_url}/classify", json={"input": camera_data_url(0)}).status_code == 404
    chat = httpx.post(f"{url}/v1/chat/completions", json={"messages": chat_body("Hi", data_url(photo(1)))["messages"]})
    assert chat.status_code == 400 and "cross-attention" in chat.json()["error"]["message"]
    bad = httpx.post(f"{url}/classify", json={"input": "data:image/png;base64,aGVsbG8="})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "input.0"


# ---- load ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_load_many_concurrent_clients(base_url, engine):
    """16 concurrent clients send 200 requests (plain and streamed, some with images): every one is answered, no
    5xx."""

    def one(index: int) -> tuple[int, int]:
        image = camera_data_url(index % 5) if index % 4 == 0 else None
        body = chat_body(
            f"Request {index}: " + "go " * (index % 7), image, max_tokens=1 + index % 6, stream=index % 3 == 0
        )
        with httpx.Client(timeout=60) as http:
            if body["stream"]:
                with http.stream("POST", f"{base_url}/v1/chat/completions", json=body) as response:
                    lines = [line for line in response.iter_lines() if line]
                    return response.status_code, int(lines[-1] == "data: [DONE]")
            response = http.post(f"{base_url}/v1/chat/completions", json=body)
            return response.status_code, int(response.json()["usage"]["completion_tokens"] >= 1)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(200)))
    assert [status for status, _ in results] == [200] * 200
    assert all(complete for _, complete in results)
    assert engine.num_active == 0


# ---- any engine ---------------------------------------------------------------------------------------------------


class ScriptedEngine(GenerationEngine):
    """Implements only the abstract contract (as the pipeline engine does): answers every request with the token
    ids of `script`, then fails."""

    model_id = "scripted"
    max_context = 512

    def __init__(self, processor, script: str):
        self.processor = processor
        self.token_ids = processor.tokenizer.encode(script)

    def submit(self, request, on_event):
        for token_id in self.token_ids:
            on_event(TokenEvent(request.request_id, token_id))
        on_event(TokenEvent(request.request_id, None, finish_reason="error", error="rank 1 died"))

    def cancel(self, request_id):
        pass

    def close(self, drain=True, timeout=None):
        pass


def test_an_engine_failure_is_reported_as_an_error():
    _, processor = tiny_parts()
    with served(ScriptedEngine(processor, "Hello there")) as url:
        plain = httpx.post(f"{url}/v1/chat/completions", json={"messages": chat_body("Hi")["messages"]})
        assert plain.status_code == 500 and "rank 1 died" in plain.json()["error"]["message"]
        body = {"messages": chat_body("Hi")["messages"], "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            lines = [line for line in response.iter_lines() if line]
        assert "rank 1 died" in json.loads(lines[-2].removeprefix("data: "))["error"]["message"]
        assert lines[-1] == "data: [DONE]"
        text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or "" for line in lines[:-2])
        assert text == "Hello there"
        missing = httpx.post(f"{url}/v1/trajectory", json=driving_body(False))
        assert missing.status_code == 404
