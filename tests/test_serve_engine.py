"""LocalEngine: continuous batching that answers like `model.generate`, cancellation, draining, sampling."""

import threading
import time

import pytest
import torch
from serve_helpers import camera_image, tiny_parts
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from vlmheads.serve import GenerationRequest, LocalEngine, TokenEvent
from vlmheads.serve.sampling import (
    MIN_TEMPERATURE,
    SEED_MAX,
    SEED_MIN,
    RequestSampler,
    SamplingError,
    SamplingParams,
    sample_rows_isolated,
)


class Collector:
    """Gathers the events of several requests; `wait()` returns once every request has ended."""

    def __init__(self, count: int):
        self.tokens: dict[str, list[int]] = {}
        self.finish: dict[str, tuple[str, str | None]] = {}
        self.count = count
        self.done = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, event: TokenEvent) -> None:
        with self.lock:
            if event.token_id is not None:
                self.tokens.setdefault(event.request_id, []).append(event.token_id)
            if event.finish_reason is not None:
                self.finish[event.request_id] = (event.finish_reason, event.error)
                if len(self.finish) == self.count:
                    self.done.set()

    def wait(self, timeout: float = 60.0) -> None:
        assert self.done.wait(timeout), f"only {len(self.finish)} of {self.count} requests ended"


def chat_inputs(processor, text: str, image=None) -> dict:
    content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": text}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return dict(processor(images=None if image is None else [image], text=[prompt], return_tensors="pt"))


PROMPTS = [
    ("Hi.", None, 6),
    ("Describe the road ahead of the car in a few careful words.", camera_image(1), 11),
    ("a b c d e f g h i j k l m n o p", None, 3),
    ("What is in front?", camera_image(2, width=84), 9),
    ("Stop or go?", None, 14),
]


@pytest.fixture(scope="module")
def parts():
    return tiny_parts()


def reference(model, inputs: dict, max_new_tokens: int, eos: tuple[int, ...]) -> list[int]:
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=list(eos))
    return output[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize(
    ("kind", "max_batch_size"),
    [
        ("qwen2_vl", 16),
        ("qwen2_vl", 2),
        pytest.param("qwen2_5_vl", 16, marks=pytest.mark.slow),
        pytest.param("llava", 16, marks=pytest.mark.slow),
    ],
)
def test_concurrent_greedy_answers_equal_generate(kind, max_batch_size):
    """Requests of different lengths, with and without images, arriving while others decode (and, with a batch
    of 2, waiting for a slot) answer token for token like single-request `model.generate`: with the explicit
    M-RoPE positions of Qwen2-VL / Qwen2.5-VL, and the 1-D positions of a plain VLM."""
    model, processor = tiny_parts(kind)
    engine = LocalEngine(model, processor, max_batch_size=max_batch_size)
    inputs = [chat_inputs(processor, text, image) for text, image, _ in PROMPTS]
    expected = [reference(model, x, n, engine.eos_token_ids) for x, (_, _, n) in zip(inputs, PROMPTS, strict=True)]
    assert len({tuple(tokens) for tokens in expected}) == len(PROMPTS), "the model answers every prompt alike"
    collector = Collector(len(PROMPTS))
    for index, (x, (_, _, max_new_tokens)) in enumerate(zip(inputs, PROMPTS, strict=True)):
        engine.submit(GenerationRequest(str(index), x, max_new_tokens, stop_token_ids=engine.eos_token_ids), collector)
        time.sleep(0.01 * index)
    collector.wait()
    engine.close()
    assert [collector.tokens[str(index)] for index in range(len(PROMPTS))] == expected
    assert all(reason in ("length", "stop") for reason, _ in collector.finish.values())


def test_sampling_is_reproducible_with_a_seed(parts):
    model, processor = parts
    engine = LocalEngine(model, processor)
    inputs = chat_inputs(processor, "Tell me a story.")
    collector = Collector(3)
    for request_id, seed in (("a", 7), ("b", 7), ("c", 8)):
        engine.submit(GenerationRequest(request_id, inputs, 12, temperature=1.5, top_p=0.9, seed=seed), collector)
    collector.wait()
    engine.close()
    assert collector.tokens["a"] == collector.tokens["b"]
    assert collector.tokens["a"] != collector.tokens["c"]


def test_cancel_frees_the_slot(parts):
    model, processor = parts
    engine = LocalEngine(model, processor, max_batch_size=1)
    collector = Collector(2)
    inputs = chat_inputs(processor, "Go on and on.")
    engine.submit(GenerationRequest("long", inputs, 3000), collector)
    engine.submit(GenerationRequest("next", inputs, 2), collector)
    while not collector.tokens.get("long"):
        time.sleep(0.01)
    engine.cancel("long")
    collector.wait()
    engine.close()
    assert collector.finish["long"][0] == "abort"
    assert len(collector.tokens["long"]) < 3000
    assert collector.finish["next"][0] == "length" and len(collector.tokens["next"]) == 2
    assert engine.num_active == 0


def test_close_drains_requests_in_flight(parts):
    model, processor = parts
    engine = LocalEngine(model, processor, max_batch_size=2)
    collector = Collector(3)
    inputs = chat_inputs(processor, "Keep going.")
    for index in range(3):
        engine.submit(GenerationRequest(str(index), inputs, 20), collector)
    engine.close(drain=True, timeout=60)
    assert collector.done.is_set()
    assert {reason for reason, _ in collector.finish.values()} == {"length"}
    assert all(len(tokens) == 20 for tokens in collector.tokens.values())
    with pytest.raises(RuntimeError, match="shutting down"):
        engine.submit(GenerationRequest("late", inputs, 2), collector)


def test_close_without_drain_aborts(parts):
    model, processor = parts
    engine = LocalEngine(model, processor)
    collector = Collector(1)
    engine.submit(GenerationRequest("0", chat_inputs(processor, "Never ending."), 3000), collector)
    engine.close(drain=False, timeout=60)
    assert collector.finish["0"][0] == "abort"


def test_a_failing_request_ends_with_an_error_and_the_engine_keeps_serving(parts):
    model, processor = parts
    engine = LocalEngine(model, processor)
    collector = Collector(2)
    bad = chat_inputs(processor, "Broken.")
    bad["input_ids"] = bad["input_ids"][0]
    engine.submit(GenerationRequest("bad", bad, 4), collector)
    engine.submit(GenerationRequest("good", chat_inputs(processor, "Fine."), 4), collector)
    collector.wait()
    engine.close()
    assert collector.finish["bad"][0] == "error" and "input_ids" in collector.finish["bad"][1]
    assert collector.finish["good"][0] == "length"


def test_bad_arguments_are_refused(parts):
    model, processor = parts
    with pytest.raises(ValueError, match="max_batch_size"):
        LocalEngine(model, processor, max_batch_size=0)
    engine = LocalEngine(model, processor)
    inputs = chat_inputs(processor, "Hi.")
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.submit(GenerationRequest("zero", inputs, 0), lambda event: None)
    engine.submit(GenerationRequest("same", inputs, 2), lambda event: None)
    with pytest.raises(ValueError, match="already in use"):
        engine.submit(GenerationRequest("same", inputs, 2), lambda event: None)
    engine.close()


def test_forward_runs_the_whole_model(parts):
    model, processor = parts
    engine = LocalEngine(model, processor)
    inputs = chat_inputs(processor, "Hi.")
    with torch.no_grad():
        expected = model(**inputs).logits
    # The endpoints that call forward read no language-model logits: Orion keeps the last position's only.
    assert torch.allclose(engine.forward(inputs).logits, expected[:, -1:], atol=1e-5)
    engine.close()


def test_sampler_floors_tiny_temperatures_and_checks_its_settings():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 30
    tiny = RequestSampler(SamplingParams(temperature=2.69e-38, seed=1))
    assert tiny.params.effective_temperature == MIN_TEMPERATURE
    # Sampling at the floor stays finite: the drawn tokens are valid ids, almost always the argmax.
    drawn = [tiny.sample(row) for row in logits for _ in range(5)]
    assert all(0 <= token < 50 for token in drawn)
    argmaxes = logits.argmax(dim=-1).repeat_interleave(5).tolist()
    assert sum(token == best for token, best in zip(drawn, argmaxes, strict=True)) >= 14
    for seed in (SEED_MIN, SEED_MAX, 2**63):
        assert 0 <= RequestSampler(SamplingParams(temperature=1.0, seed=seed)).sample(logits[0]) < 50
    for settings, field in (
        ({"seed": SEED_MAX + 1}, "seed"),
        ({"seed": SEED_MIN - 1}, "seed"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -1}, "top_k"),
    ):
        with pytest.raises(ValueError, match=field):
            SamplingParams(**settings)


def test_sampler_uses_transformers_warpers_and_per_row_generators():
    """The warped logits are transformers' temperature, top-k and top-p warpers in generate's order; a seeded row
    draws the same tokens alone and beside other rows."""
    logits = torch.randn(4, 40, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=0.7, top_k=10, top_p=0.8, seed=3)
    expected = TopPLogitsWarper(0.8)(None, TopKLogitsWarper(10)(None, TemperatureLogitsWarper(0.7)(None, logits[:1])))
    assert torch.equal(RequestSampler(params).warp(logits[0]), expected)
    alone = RequestSampler(params)
    alone_tokens = [alone.sample(logits[2]) for _ in range(6)]
    batched = [RequestSampler(SamplingParams(temperature=1.0, seed=9)), RequestSampler(SamplingParams()), None, None]
    batched[2] = RequestSampler(params)
    batched[3] = RequestSampler(SamplingParams(temperature=1.3))
    batched_tokens = [sample_rows_isolated(logits, batched)[2] for _ in range(6)]
    assert batched_tokens == alone_tokens
    assert sample_rows_isolated(logits, batched)[1] == int(logits[1].argmax())


def test_a_row_that_cannot_be_sampled_fails_alone():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(2))
    logits[1, 4] = float("nan")
    samplers = [RequestSampler(SamplingParams()), RequestSampler(SamplingParams(temperature=1.0, seed=0))] * 2
    results = sample_rows_isolated(logits, samplers[:3])
    assert results[0] == int(logits[0].argmax()) and results[2] == int(logits[2].argmax())
    assert isinstance(results[1], SamplingError) and "NaN" in str(results[1])
    with pytest.raises(SamplingError):
        samplers[0].sample(torch.full((20,), float("-inf")))


def test_a_numeric_failure_in_a_decode_step_ends_that_request_alone(parts):
    """A row whose logits turn NaN in the shared decode step ends with an error event; the other requests of that
    batch finish with the tokens model.generate gives them. A tiny temperature (2.69e-38) samples on."""
    model, processor = parts
    engine = LocalEngine(model, processor)
    prompts = [chat_inputs(processor, text) for text in ("Poisoned.", "Greedy and fine.", "Tiny temperature.")]
    expected = reference(model, prompts[1], 10, engine.eos_token_ids)
    poisoned_row = {"steps": 0}

    def poison_first_row_in_decode(module, args, output):
        # Decode steps of the full batch of 3 rows: the first row (the first submitted request) turns NaN.
        if output.shape[0] == 3 and output.shape[1] == 1:
            poisoned_row["steps"] += 1
            if poisoned_row["steps"] >= 2:
                output = output.clone()
                output[0] = float("nan")
                return output
        return output

    handle = model.lm_head.register_forward_hook(poison_first_row_in_decode)
    try:
        collector = Collector(3)
        with engine._wakeup:  # the three requests join the batch together
            engine.submit(GenerationRequest("poisoned", prompts[0], 10), collector)
            engine.submit(GenerationRequest("greedy", prompts[1], 10, stop_token_ids=engine.eos_token_ids), collector)
            engine.submit(GenerationRequest("tiny", prompts[2], 10, temperature=2.69e-38, seed=5), collector)
        collector.wait()
    finally:
        handle.remove()
        engine.close()
    assert collector.finish["poisoned"][0] == "error" and "NaN" in collector.finish["poisoned"][1]
    assert len(collector.tokens.get("poisoned", [])) < 10
    assert collector.tokens["greedy"] == expected
    assert collector.finish["tiny"][0] == "length" and len(collector.tokens["tiny"]) == 10


def test_the_prefix_cache_hits_only_with_the_same_text_and_the_same_image(parts):
    """A prompt with the same text and a different image never hits; the same text and image hits, and so does a
    text prompt sharing a long prefix; every answer equals model.generate's."""
    model, processor = parts
    engine = LocalEngine(model, processor, prefix_cache_entries=4)
    text = "Describe the road ahead of the car: the lanes, the signs, the lights and every vehicle, in careful detail."
    first, other = chat_inputs(processor, text, camera_image(1)), chat_inputs(processor, text, camera_image(2))
    shared = "You are a careful driving assistant. Read the scene and answer briefly and precisely. " * 3
    question, follow_up = chat_inputs(processor, shared + "Is it safe?"), chat_inputs(processor, shared + "Turn?")

    def answer(inputs: dict) -> list[int]:
        collector = Collector(1)
        engine.submit(GenerationRequest(str(len(collector.tokens)) + str(id(inputs)), inputs, 6), collector)
        collector.wait()
        return next(iter(collector.tokens.values()))

    cache = engine.prefix_cache
    assert answer(first) == reference(model, first, 6, ())
    assert answer(other) == reference(model, other, 6, ()) and cache.hits == 0
    assert answer(first) == reference(model, first, 6, ()) and cache.hits == 1
    image_end = int((first["input_ids"][0] == processor.image_token_id).nonzero()[-1]) + 1
    assert cache.hit_tokens >= image_end
    assert answer(question) == reference(model, question, 6, ()) and cache.hits == 1
    assert answer(follow_up) == reference(model, follow_up, 6, ()) and cache.hits == 2
    engine.close()


def test_a_failing_batched_forward_pass_ends_only_the_request_at_fault(parts):
    """A decode step whose batched forward pass raises (here: a hook, when one request's next input token is in the
    batch) runs again row by row: that request ends with an error event, its batch-mates finish with the tokens they
    get alone, and the engine serves the next request."""
    model, processor = parts
    engine = LocalEngine(model, processor)
    prompts = [chat_inputs(processor, text) for text in ("Poisoned.", "Greedy and fine.", "Also fine, and longer.")]
    expected = [reference(model, inputs, 10, ()) for inputs in prompts]
    # The poisoned request's third token is fed back in its third decode step; no other request ever holds it.
    poison = expected[0][2]
    assert poison not in expected[0][:2] + expected[1] + expected[2]
    assert all(poison not in inputs["input_ids"] for inputs in prompts)
    failed_batches = []

    def fail_on_poison(module, args):
        (input_ids,) = args
        if input_ids.shape[1] == 1 and bool((input_ids == poison).any()):
            failed_batches.append(input_ids.shape[0])
            raise RuntimeError("injected fault")

    handle = model.get_input_embeddings().register_forward_pre_hook(fail_on_poison)
    try:
        collector = Collector(3)
        with engine._wakeup:  # the three requests join the batch together
            for index, inputs in enumerate(prompts):
                engine.submit(GenerationRequest(str(index), inputs, 10), collector)
        collector.wait()
        after = Collector(1)
        engine.submit(GenerationRequest("after", prompts[1], 10), after)
        after.wait()
    finally:
        handle.remove()
        engine.close()
    assert failed_batches == [3, 1], "the fault struck the batch, then the poisoned row alone"
    assert collector.finish["0"][0] == "error" and "injected fault" in collector.finish["0"][1]
    assert collector.tokens["0"] == expected[0][:3]
    assert [collector.tokens["1"], collector.tokens["2"]] == expected[1:]
    assert {collector.finish[index][0] for index in ("1", "2")} == {"length"}
    assert after.tokens["after"] == expected[1] and after.finish["after"][0] == "length"
