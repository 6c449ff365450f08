"""vlmheads.parallel: stage plans and shards, the engine on one stage in-process, and torchrun pipelines of 2 and 3
stages (gloo on 127.0.0.1) whose greedy tokens match single-process `generate`, and that fail fast when a stage
stops answering."""

import contextlib
import json
import os
import re
import signal
import subprocess
import threading
import time

import openai
import pytest
import torch
from orion_helpers import FAMILIES
from pipeline_helpers import (
    driving_inputs,
    pipeline_model,
    read_results,
    reference_tokens,
    run_torchrun,
    torchrun_command,
    torchrun_env,
    write_prompts,
)
from safetensors.torch import load_file
from serve_helpers import camera_data_url, chat_body, free_port, served
from transformers import MllamaConfig

from vlmheads.parallel.engine import PipelineEngine
from vlmheads.parallel.stages import (
    StageModel,
    StagePlan,
    balance_layers,
    check_supported,
    load_stage_model,
    make_plan,
    prepare,
    read_plan,
)
from vlmheads.serve.engine import GenerationRequest
from vlmheads.serve.local_engine import LocalEngine

MAX_NEW_TOKENS = 8


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory, shared_processors):
    """Per backbone: a saved 3-layer model folder (with its processor), the model and the processor."""
    built = {}

    def get(backbone: str):
        if backbone not in built:
            processor = shared_processors(FAMILIES[backbone])
            model = pipeline_model(backbone, processor, num_layers=3)
            folder = tmp_path_factory.mktemp(f"pipeline-{backbone}")
            model.save_pretrained(folder)
            processor.save_pretrained(folder)
            built[backbone] = (folder, model, processor)
        return built[backbone]

    return get


# -- plans ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "last", "layers", "num_stages", "expected"),
    [
        (0, 0, [5] * 8, 2, (4, 4)),
        (20, 0, [5] * 8, 2, (2, 6)),
        (0, 20, [5] * 8, 2, (6, 2)),
        (0, 0, [5] * 9, 3, (3, 3, 3)),
        # A huge embedding still leaves every stage a layer.
        (10**6, 10**6, [5] * 3, 3, (1, 1, 1)),
    ],
)
def test_balance_layers(first, last, layers, num_stages, expected):
    assert balance_layers(first, last, layers, num_stages) == expected


def test_plan_checks_its_input(saved_models):
    _, model, _ = saved_models("qwen2_vl")
    with pytest.raises(ValueError, match="between 1 and the model's 3 decoder layers"):
        make_plan(model.config, 4)
    with pytest.raises(ValueError, match="add up to the model's 3 decoder layers"):
        make_plan(model.config, 2, [1, 1])
    with pytest.raises(ValueError, match="name 3 stages, not 2"):
        make_plan(model.config, 2, [1, 1, 1])
    assert make_plan(model.config, 2, [2, 1]).layer_ranges == ((0, 2), (2, 3))
    with pytest.raises(ValueError, match="splits the families"):
        check_supported(MllamaConfig())


def test_prepare_writes_each_stage_only_its_slice(saved_models, tmp_path):
    folder, model, _ = saved_models("qwen2_5_vl")
    plan = prepare(folder, tmp_path, num_stages=3)
    assert plan.layer_ranges == ((0, 1), (1, 2), (2, 3)) == read_plan(tmp_path).layer_ranges
    shards = [set(load_file(tmp_path / f"stage-{stage}.safetensors")) for stage in range(3)]
    everything = set(model.state_dict())
    assert set().union(*shards) == everything

    def holds(stage: int, prefix: str) -> bool:
        return any(name.startswith(prefix) for name in shards[stage])

    layers = "model.language_model.layers"
    for stage in range(3):
        assert {holds(stage, f"{layers}.{index}.") for index in range(3)} == {True, False}
        assert holds(stage, f"{layers}.{stage}.")
    assert all(holds(0, prefix) for prefix in ("model.visual.", "model.language_model.embed_tokens.", "driving_"))
    assert all(holds(2, prefix) for prefix in ("lm_head.", "model.language_model.norm.", "trajectory_decoder."))
    assert not any(holds(1, prefix) for prefix in ("model.visual.", "lm_head.", "driving_", "trajectory_"))

    middle, _ = load_stage_model(tmp_path, 1, 3)
    assert middle.model.visual is None and middle.lm_head is None
    assert list(middle.model.language_model.layers) == ["1"]
    original = model.model.language_model.layers[1].state_dict()
    for name, tensor in middle.model.language_model.layers["1"].state_dict().items():
        torch.testing.assert_close(tensor, original[name], rtol=0, atol=0)
    with pytest.raises(ValueError, match="prepared for layers"):
        load_stage_model(tmp_path, 0, 2)


# -- the engine on one stage, in this process ---------------------------------------------------------------------


class Collector:
    """Gathers a request's events; `done` is set at its last event."""

    def __init__(self, cancel_after: int | None = None, engine=None):
        self.tokens, self.finish_reason, self.error = [], None, None
        self.done = threading.Event()
        self.cancel_after, self.engine = cancel_after, engine

    def __call__(self, event) -> None:
        if event.token_id is not None:
            self.tokens.append(event.token_id)
        if self.cancel_after is not None and len(self.tokens) == self.cancel_after:
            self.engine.cancel(event.request_id)
        if event.finish_reason is not None:
            self.finish_reason, self.error = event.finish_reason, event.error
            self.done.set()


def submit(engine, request_id: str, inputs, **settings) -> Collector:
    collector = Collector()
    settings = {"max_new_tokens": MAX_NEW_TOKENS, **settings}
    engine.submit(GenerationRequest(request_id, inputs, **settings), collector)
    return collector


@pytest.fixture(scope="module")
def single_stage(saved_models):
    _, model, processor = saved_models("qwen2_vl")
    stage = StageModel(model, StagePlan(((0, 3),)), 0)
    engine = PipelineEngine(stage, processor=processor, max_active=2)
    yield engine, model, processor
    engine.close(drain=False)


def test_single_stage_matches_generate_with_requests_queued(single_stage):
    engine, model, processor = single_stage
    prompts = [driving_inputs(model, processor, index, image=index % 2 == 0) for index in range(4)]
    collectors = [submit(engine, f"r{index}", inputs) for index, inputs in enumerate(prompts)]
    for collector, inputs in zip(collectors, prompts, strict=True):
        assert collector.done.wait(60)
        assert collector.finish_reason == "length"
        assert collector.tokens == reference_tokens(model, inputs, MAX_NEW_TOKENS)
    assert collectors[0].tokens != collectors[1].tokens


def test_single_stage_stop_tokens_sampling_and_limits(single_stage):
    engine, model, processor = single_stage
    inputs = driving_inputs(model, processor, 0, image=False)
    greedy = reference_tokens(model, inputs, MAX_NEW_TOKENS)
    stopped = submit(engine, "stop", inputs, stop_token_ids=(greedy[2],))
    sampled = [submit(engine, f"s{seed}", inputs, temperature=1.0, top_p=0.9, seed=seed) for seed in (1, 1, 2)]
    too_long = submit(engine, "long", inputs, max_new_tokens=engine.max_context)
    bad_top_p = submit(engine, "top_p", inputs, temperature=1.0, top_p=0.0)
    for collector in (stopped, *sampled, too_long, bad_top_p):
        assert collector.done.wait(60)
    assert stopped.finish_reason == "stop"
    assert stopped.tokens == greedy[: greedy.index(greedy[2]) + 1]
    assert sampled[0].tokens == sampled[1].tokens != sampled[2].tokens
    assert sampled[0].tokens != greedy
    assert too_long.finish_reason == "error" and "exceeds the context" in too_long.error
    assert bad_top_p.finish_reason == "error" and "top_p" in bad_top_p.error


def test_single_stage_cancel_and_close(saved_models):
    _, model, processor = saved_models("qwen2_vl")
    engine = PipelineEngine(StageModel(model, StagePlan(((0, 3),)), 0), processor=processor, max_active=1)
    inputs = driving_inputs(model, processor, 1, image=False)
    cancelled = Collector(cancel_after=2, engine=engine)
    engine.submit(GenerationRequest("cancel", inputs, max_new_tokens=50), cancelled)
    assert cancelled.done.wait(60)
    assert cancelled.finish_reason == "abort" and len(cancelled.tokens) in (2, 3)
    running = submit(engine, "running", inputs, max_new_tokens=500)
    queued = submit(engine, "queued", inputs)
    engine.close(drain=False)
    assert running.finish_reason == "abort" and queued.finish_reason == "abort"
    late = submit(engine, "late", inputs)
    assert late.finish_reason == "error" and "closed" in late.error


def test_engine_checks_its_stage(saved_models):
    _, model, _ = saved_models("qwen2_vl")
    with pytest.raises(ValueError, match="needs a StageLink"):
        PipelineEngine(StageModel(model, StagePlan(((0, 1), (1, 3))), 0))
    with pytest.raises(ValueError, match="drives stage 0"):
        PipelineEngine(StageModel(model, StagePlan(((0, 1), (1, 3))), 1))
    with pytest.raises(ValueError, match="max_active must be >= 1"):
        PipelineEngine(StageModel(model, StagePlan(((0, 3),)), 0), max_active=0)


# -- torchrun pipelines -------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("backbone", "num_stages", "prepared"), [("qwen2_vl", 2, False), ("qwen2_5_vl", 3, True)])
def test_torchrun_pipeline_matches_generate(saved_models, tmp_path, backbone, num_stages, prepared):
    """Four greedy requests in flight at once (micro-batches of one), two with a camera image, and a sampled one."""
    folder, model, processor = saved_models(backbone)
    prompts, references = write_prompts(tmp_path / "prompts", model, processor, [True, False, True, False], 6)
    sampling = {"temperature": 0.8, "top_p": 0.9, "seed": 5, "max_new_tokens": 6}
    sampled_line = {"id": "sampled", "inputs": "prompt0.safetensors", **sampling}
    prompts.write_text(prompts.read_text() + json.dumps(sampled_line) + "\n")
    single = PipelineEngine(StageModel(model, StagePlan(((0, 3),)), 0))
    sampled = submit(single, "sampled", load_file(tmp_path / "prompts" / "prompt0.safetensors"), **sampling)
    single.close()
    if prepared:
        prepare(folder, tmp_path / "shards", num_stages)
        folder = tmp_path / "shards"
    output = tmp_path / "out.jsonl"
    result = run_torchrun(num_stages, "--model", str(folder), "--prompts", str(prompts), "--output", str(output))
    assert result.returncode == 0, result.stderr[-3000:]
    results = read_results(output)
    assert [results[f"p{index}"]["token_ids"] for index in range(4)] == references
    assert {line["finish_reason"] for line in results.values()} == {"length"}
    # Seeded sampling does not depend on how the model is split.
    assert results["sampled"]["token_ids"] == sampled.tokens != references[0]
    assert f"stage {num_stages - 1}/{num_stages}" in result.stderr


@pytest.mark.slow
def test_served_pipeline_answers_as_the_single_process_server_then_fails_fast_when_a_stage_stops(saved_models):
    """Two stages behind the HTTP server give the official client the single-process server's answers (with and
    without an image, plain and streamed); they stay up through an idle spell longer than the timeout (heartbeats),
    then stage 1 stops (SIGSTOP): stage 0 names it within the timeout and every process exits."""
    folder, model, processor = saved_models("qwen2_vl")
    questions = [("Hello", None), ("What is ahead?", camera_data_url(3))]

    def answers(base_url: str) -> list[str]:
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused")
        replies = []
        for text, image in questions:
            messages = chat_body(text, image)["messages"]
            reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
            streamed = client.chat.completions.create(
                model="tiny", messages=messages, max_tokens=6, temperature=0, stream=True
            )
            assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices) == (
                reply.choices[0].message.content
            )
            replies.append(reply.choices[0].message.content)
        return replies

    with served(LocalEngine(model, processor, model_id="tiny")) as base_url:
        expected = answers(base_url)
    timeout = 3.0
    port = free_port()
    command = torchrun_command(2, "--model", str(folder), "--layers", "2,1", "--port", str(port))
    command += ["--served-model-name", "tiny", "--timeout", str(timeout)]
    process = subprocess.Popen(command, env=torchrun_env(), stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stderr.readline, "")), daemon=True)
    reader.start()
    stopped_pid = None
    try:
        deadline = time.monotonic() + 180
        while not any("Uvicorn running" in line for line in lines):
            assert time.monotonic() < deadline and process.poll() is None, "".join(lines)[-3000:]
            time.sleep(0.1)
        assert answers(f"http://127.0.0.1:{port}") == expected
        time.sleep(1.5 * timeout)
        assert process.poll() is None, "".join(lines)[-3000:]
        # Lines of different ranks may run together on the shared stderr.
        stopped_pid = int(re.search(r"stage 1/2 \(rank 1, pid (\d+)\)", "".join(lines)).group(1))
        os.kill(stopped_pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        while not any("stopped answering" in line for line in lines):
            assert time.monotonic() - stopped_at < 4 * timeout, "".join(lines)[-3000:]
            time.sleep(0.05)
        detected_after = time.monotonic() - stopped_at
    finally:
        if stopped_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stopped_pid, signal.SIGKILL)
        if process.poll() is None and stopped_pid is None:
            process.terminate()
    assert process.wait(60) != 0
    reader.join(10)
    report = "".join(lines)
    assert "pipeline stage 0: stage 1 (rank 1) died or stopped answering" in report, report[-3000:]
    assert detected_after < 2 * timeout
