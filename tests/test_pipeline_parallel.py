"""vlmheads.parallel: stage plans and shards (validated, checksummed), stages chained in-process (Qwen with M-RoPE,
LLaVA with 1-D positions, task heads on the last stage), the engine on one stage in-process, and torchrun pipelines
of 2 and 3 stages (gloo on 127.0.0.1) whose greedy tokens match single-process `generate`, that serve /v1/trajectory
as the single-process server does, end a failing request alone, drain on SIGTERM, and fail fast when a stage stops
answering."""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time

import httpx
import openai
import pytest
import torch
from orion_helpers import FAMILIES, camera_image
from pipeline_helpers import (
    driving_inputs,
    kill_torchrun,
    llava_inputs,
    pipeline_model,
    read_results,
    reference_tokens,
    run_torchrun,
    torchrun_command,
    torchrun_env,
    write_prompts,
)
from safetensors.torch import load_file, save_file
from serve_helpers import camera_data_url, chat_body, free_port, served, tiny_parts
from transformers import MllamaConfig
from vlm_helpers import (
    DRIVING_SIZES,
    driving_batch,
    driving_processor,
    family_batch,
    tiny_backbone,
    trajectory_backbone,
)

from vlmheads import VLMForImageClassification, VLMForTrajectory
from vlmheads.parallel.__main__ import main, parse_run_args
from vlmheads.parallel.engine import PipelineEngine
from vlmheads.parallel.stages import (
    PLAN_FILE,
    PlanError,
    StageModel,
    StagePlan,
    balance_layers,
    check_supported,
    head_inputs,
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


@pytest.fixture(scope="module")
def llava_folder(tmp_path_factory):
    """The tiny LLaVA (a plain VLM of the registry, 2 layers, 1-D positions) saved with its processor."""
    model, processor = tiny_parts("llava")
    folder = tmp_path_factory.mktemp("pipeline-llava")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, model, processor


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
    with pytest.raises(ValueError, match=r"splits the families \[.*'llava'.*\]; MllamaConfig is on 'mllama'"):
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
    plan_json = json.loads((tmp_path / PLAN_FILE).read_text())
    assert plan_json["version"] == 1 and all(len(entry["sha256"]) == 64 for entry in plan_json["stages"])


@pytest.fixture(scope="module")
def prepared_llava(llava_folder, tmp_path_factory):
    """The tiny LLaVA prepared for 2 stages by the command line, as the README runs it."""
    folder, _, _ = llava_folder
    out = tmp_path_factory.mktemp("prepared-llava")
    main(["prepare", "--model", str(folder), "--stages", "2", "--out", str(out)])
    return out


MISSING = object()


@pytest.mark.parametrize(
    ("stage", "key", "value", "message"),
    [
        (None, "version", 2, "version 2 is not supported"),
        (None, "version", MISSING, "version is missing"),
        (None, "num_stages", "2", "num_stages must be a int"),
        (None, "num_stages", 3, "num_stages is 3 but stages lists 2 entries"),
        (1, "layers", MISSING, r"stages\[1\]\.layers is missing"),
        (1, "layers", [0, 2], r"stages\[1\]\.layers must be \[1, end\] with end > 1, got \[0, 2\]"),
        (1, "stage", 0, r"stages\[1\]\.stage must be 1"),
        (
            0,
            "shard",
            "../stage-0.safetensors",
            r"stages\[0\]\.shard '\.\./stage-0\.safetensors' must name a file inside",
        ),
        (0, "shard", "/etc/passwd", r"stages\[0\]\.shard '/etc/passwd' must name a file inside"),
        (0, "sha256", "abc", r"stages\[0\]\.sha256 must be 64 lowercase hex digits"),
    ],
)
def test_an_edited_plan_is_refused_naming_the_file_and_key(prepared_llava, tmp_path, stage, key, value, message):
    folder = tmp_path / "edited"
    shutil.copytree(prepared_llava, folder)
    plan = json.loads((folder / PLAN_FILE).read_text())
    entry = plan if stage is None else plan["stages"][stage]
    if value is MISSING:
        del entry[key]
    else:
        entry[key] = value
    (folder / PLAN_FILE).write_text(json.dumps(plan))
    with pytest.raises(PlanError, match=f"{re.escape(str(folder.resolve() / PLAN_FILE))}: {message}"):
        read_plan(folder)
    with pytest.raises(PlanError, match=message):
        load_stage_model(folder, 0, 2)
    (folder / PLAN_FILE).write_text("[]")
    with pytest.raises(PlanError, match="must hold a JSON object, got list"):
        read_plan(folder)


def test_a_changed_shard_fails_its_checksum_unless_told_not_to_check(prepared_llava, tmp_path):
    folder = tmp_path / "flipped"
    shutil.copytree(prepared_llava, folder)
    shard = folder / "stage-1.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="stage-1.safetensors's SHA-256 differs from the one pipeline_plan.json"):
        load_stage_model(folder, 1, 2)
    load_stage_model(folder, 0, 2)
    model, _ = load_stage_model(folder, 1, 2, verify_shards=False)
    assert model.model.language_model.norm is not None


def test_remote_code_runs_only_when_trusted(tmp_path):
    """A folder whose configuration names code of its own is refused without --trust-remote-code."""
    config = {"model_type": "someone_elses_vlm", "auto_map": {"AutoConfig": "configuration_x.XConfig"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "configuration_x.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_stage_model(tmp_path, 0, 1)


def test_the_command_line_names_prepare_and_takes_the_servers_context_flag(capsys):
    with pytest.raises(SystemExit):
        parse_run_args(["--help"])
    help_text = capsys.readouterr().out
    assert "python -m vlmheads.parallel prepare" in help_text and "--max-model-len" in help_text
    for flag in ("--max-model-len", "--max-context"):
        assert parse_run_args(["--model", "m", flag, "64"]).max_model_len == 64
    args = parse_run_args(["--model", "m"])
    assert args.trust_remote_code is False and args.verify_shards is True


# -- stages chained in this process -----------------------------------------------------------------------------


def chained_stages(folder, num_stages: int) -> list[StageModel]:
    return [StageModel(*load_stage_model(folder, stage, num_stages), stage) for stage in range(num_stages)]


def chained_greedy(stages: list[StageModel], inputs: dict, max_new_tokens: int) -> list[int]:
    """Greedy tokens of stages run one after the other in this process, each over its own cache."""
    caches = [stage.new_cache() for stage in stages]
    hidden, positions, rope_delta = stages[0].embed(inputs)
    prompt_length, tokens = hidden.shape[1], []
    for step in range(max_new_tokens):
        if step:
            hidden = stages[0].token_embeddings(torch.tensor([[tokens[-1]]]), {})
            positions = stages[0].positions(prompt_length + step - 1, rope_delta)
        for stage, cache in zip(stages, caches, strict=True):
            hidden = stage.run_layers(hidden, positions, cache)
        tokens.append(int(stages[-1].next_token_logits(hidden).argmax()))
    return tokens


def chained_head(stages: list[StageModel], inputs: dict):
    hidden, positions, _ = stages[0].embed(inputs)
    for stage in stages:
        hidden = stage.run_layers(hidden, positions, stage.new_cache())
    return stages[-1].head_output(hidden, head_inputs(inputs))


def test_a_split_llava_gives_generates_tokens(prepared_llava, llava_folder):
    """LLaVA (1-D positions, projector beside the vision tower) split in 2: the vision tower and projector on stage
    0 only, the same greedy tokens as `generate` with and without an image."""
    _, model, processor = llava_folder
    stages = chained_stages(prepared_llava, 2)
    assert stages[0].model.model.multi_modal_projector is not None and stages[1].model.model.vision_tower is None
    assert stages[0].position_rows == 1
    answers = []
    for index, image in enumerate([True, False, True]):
        inputs = llava_inputs(processor, index, image)
        answers.append(chained_greedy(stages, inputs, MAX_NEW_TOKENS))
        assert answers[-1] == reference_tokens(model, inputs, MAX_NEW_TOKENS)
    assert answers[0] != answers[2]


def _heads_on_llava():
    torch.manual_seed(0)
    placeholders = driving_processor("llava").model_config_kwargs()
    trajectory = VLMForTrajectory.from_backbone(
        trajectory_backbone("llava"), num_modes=3, **DRIVING_SIZES, **placeholders
    ).eval()
    classifier = VLMForImageClassification.from_backbone(
        tiny_backbone("llava"), num_labels=3, pooling="multimodal", classifier_hidden_dims=[32]
    ).eval()
    batch = {
        name: value[:1] for name, value in driving_batch("llava", batch_size=1).items() if name != "ego_waypoints"
    }
    return [
        (trajectory, {**batch, "command": torch.tensor([2])}),
        (classifier, family_batch("llava", ["Which?"], [3])),
    ]


@pytest.mark.parametrize("head", [0, 1], ids=["trajectory", "classifier"])
def test_task_heads_run_on_the_last_stage(tmp_path, head):
    """VLMForTrajectory (3 modes, a command) and a multimodal VLMForImageClassification on LLaVA, split in 2: the
    last stage's head gives the model's own outputs."""
    model, inputs = _heads_on_llava()[head]
    model.save_pretrained(tmp_path / "model")
    prepare(tmp_path / "model", tmp_path / "shards", num_stages=2)
    stages = chained_stages(tmp_path / "shards", 2)
    assert stages[1].model.backbone.model.vision_tower is None
    output = chained_head(stages, inputs)
    with torch.no_grad():
        expected = model(**inputs)
    names = ("trajectory", "trajectory_modes") if head == 0 else ("logits",)
    for name in names:
        torch.testing.assert_close(output[name], expected[name], rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def llava_classifier(tmp_path_factory):
    """A multimodal `VLMForImageClassification` on the tiny LLaVA, saved with the family's processor."""
    classifier, _ = _heads_on_llava()[1]
    folder = tmp_path_factory.mktemp("llava-classifier")
    classifier.save_pretrained(folder)
    tiny_parts("llava")[1].save_pretrained(folder)
    return folder, classifier


def classify(base_url: str) -> list[list[float]]:
    images = [camera_data_url(seed) for seed in (1, 2)]
    response = httpx.post(f"{base_url}/classify", json={"model": "tiny", "input": images}, timeout=120)
    assert response.status_code == 200, response.text
    return [row["probs"] for row in response.json()["data"]]


def test_classify_through_the_pipeline_engine_answers_as_the_single_process_server(llava_classifier):
    """/classify served by the pipeline's engine (one stage, the head run by `head_output`) gives the single-process
    server's probabilities; the split head is checked in `test_task_heads_run_on_the_last_stage`."""
    folder, classifier = llava_classifier
    processor = tiny_parts("llava")[1]
    with served(LocalEngine(classifier, processor, model_id="tiny")) as base_url:
        expected = classify(base_url)
    engine = PipelineEngine(StageModel(classifier, StagePlan(((0, 2),)), 0), processor=processor, model_id="tiny")
    with served(engine) as base_url:
        torch.testing.assert_close(torch.tensor(classify(base_url)), torch.tensor(expected), rtol=0, atol=1e-5)
    engine.close()


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


def openai_line(custom_id: str, text: str, image_seed: int | None, max_tokens: int) -> dict:
    body = chat_body(text, None if image_seed is None else camera_data_url(image_seed), max_tokens=max_tokens)
    body["temperature"] = 0
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def openai_reference(model, processor, text: str, image_seed: int | None, max_tokens: int) -> str:
    """What the single-process model answers (greedy, stopping at its eos) to an OpenAI chat line."""
    content = ([{"type": "image"}] if image_seed is not None else []) + [{"type": "text", "text": text}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    images = None if image_seed is None else [camera_image(image_seed)]
    inputs = processor(text=[prompt], images=images, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
    return processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.slow
def test_torchrun_llava_pipeline_matches_generate_and_ends_a_failing_request_alone(llava_folder, tmp_path):
    """A 2-stage LLaVA pipeline (1-D positions): greedy tokens equal to `generate` with and without images, in
    vlmheads' batch format and in OpenAI's. Requests that cannot be computed end alone, each with its error, while
    the others go on: NaN pixels (the last stage cannot sample the logits), a seed past uint64 (refused at once),
    a malformed line; a seed >= 2**63 and a temperature of 1e-300 are served."""
    folder, model, processor = llava_folder
    prompts, references = write_prompts(
        tmp_path / "prompts",
        model,
        processor,
        [True, False, True, False],
        MAX_NEW_TOKENS,
        lambda index, image: llava_inputs(processor, index, image),
    )
    poisoned = llava_inputs(processor, 7, image=True)
    poisoned["pixel_values"] = torch.full_like(poisoned["pixel_values"], float("nan"))
    save_file(poisoned, tmp_path / "prompts" / "nan.safetensors")
    sampled = {"temperature": 0.7, "seed": 2**63 + 5, "max_new_tokens": MAX_NEW_TOKENS}
    single = PipelineEngine(StageModel(model, StagePlan(((0, 2),)), 0))
    expected_sample = submit(single, "big-seed", llava_inputs(processor, 0, image=True), **sampled)
    single.close()
    extra = [
        {"id": "nan", "inputs": "nan.safetensors", "max_new_tokens": MAX_NEW_TOKENS},
        {"id": "big-seed", "inputs": "prompt0.safetensors", **sampled},
        {"id": "huge-seed", "inputs": "prompt0.safetensors", "temperature": 0.7, "seed": 2**64},
        {"id": "tiny-temperature", "inputs": "prompt1.safetensors", "temperature": 1e-300, "seed": 3},
        openai_line("chat-image", "What is in view?", 4, 6),
        openai_line("chat-text", "Say something.", None, 6),
    ]
    lines = prompts.read_text().splitlines()
    lines[2:2] = [json.dumps(line) for line in extra] + ["{not json"]
    prompts.write_text("\n".join(lines) + "\n")
    output = tmp_path / "out.jsonl"
    result = run_torchrun(2, "--model", str(folder), "--prompts", str(prompts), "--output", str(output))
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(records) == len(lines)
    native = {record["id"]: record for record in records if "id" in record and "custom_id" not in record}
    assert [native[f"p{index}"]["token_ids"] for index in range(4)] == references
    assert native["nan"]["finish_reason"] == "error" and "pipeline stage 1" in native["nan"]["error"]
    assert "NaN" in native["nan"]["error"]
    assert native["big-seed"]["token_ids"] == expected_sample.tokens
    assert native["huge-seed"]["finish_reason"] == "error" and "seed must be" in native["huge-seed"]["error"]
    assert native["tiny-temperature"]["finish_reason"] == "length"
    malformed = native[str(2 + len(extra))]
    assert malformed["finish_reason"] == "error" and "is not JSON" in malformed["error"]
    chats = {record["custom_id"]: record for record in records if "custom_id" in record}
    for custom_id, (text, seed) in {
        "chat-image": ("What is in view?", 4),
        "chat-text": ("Say something.", None),
    }.items():
        record = chats[custom_id]
        assert record["response"]["status_code"] == 200 and record["error"] is None
        body = record["response"]["body"]
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["content"] == openai_reference(model, processor, text, seed, 6)


@contextlib.contextmanager
def pipeline_server(folder, *args: str):
    """`torchrun` serving a 2-stage pipeline of `folder` on a free port: yields (base URL, process, stderr lines so
    far) once uvicorn runs."""
    port = free_port()
    command = torchrun_command(2, "--model", str(folder), "--port", str(port), "--served-model-name", "tiny", *args)
    # A session of its own, so that no stage outlives the test.
    process = subprocess.Popen(
        command,
        env=torchrun_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 180
        while not any("Uvicorn running" in line for line in lines):
            assert time.monotonic() < deadline and process.poll() is None, "".join(lines)[-3000:]
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}", process, lines
    finally:
        kill_torchrun(process)
        process.wait(60)
        reader.join(10)


def trajectory_body(config, image: str | None) -> dict:
    generator = torch.Generator().manual_seed(11)
    body = {
        "scene_queries": torch.randn(config.num_scene_queries, config.scene_query_dim, generator=generator).tolist(),
        "history_queries": torch.randn(
            config.num_history_queries, config.history_query_dim, generator=generator
        ).tolist(),
        "can_bus": torch.randn(config.can_bus_dim, generator=generator).tolist(),
        "prompt": "Keep the lane.",
    }
    return body if image is None else {**body, "image": image}


@pytest.mark.slow
def test_served_pipeline_answers_as_the_single_process_server_then_fails_fast_when_a_stage_stops(saved_models):
    """Two stages behind the HTTP server give the official client the single-process server's answers (with and
    without an image, plain and streamed) and the same /v1/trajectory waypoints within 1e-5 (the head on the last
    stage); they stay up through an idle spell longer than the timeout (heartbeats), then stage 1 stops (SIGSTOP):
    stage 0 names it within the timeout and every process exits."""
    folder, model, processor = saved_models("qwen2_vl")
    questions = [("Hello", None), ("What is ahead?", camera_data_url(3))]
    trajectories = [trajectory_body(model.config, image) for image in (None, camera_data_url(4))]

    def answers(base_url: str) -> tuple[list[str], list]:
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
        waypoints = []
        for body in trajectories:
            response = httpx.post(f"{base_url}/v1/trajectory", json=body, timeout=60)
            assert response.status_code == 200, response.text
            waypoints.append(response.json()["waypoints"])
        return replies, waypoints

    with served(LocalEngine(model, processor, model_id="tiny")) as base_url:
        expected, expected_waypoints = answers(base_url)
    timeout = 5.0
    stopped_pid = None
    with pipeline_server(folder, "--layers", "2,1", "--timeout", str(timeout)) as (base_url, process, lines):
        try:
            replies, waypoints = answers(base_url)
            assert replies == expected
            torch.testing.assert_close(torch.tensor(waypoints), torch.tensor(expected_waypoints), rtol=0, atol=1e-5)
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
            assert process.wait(60) != 0
        finally:
            if stopped_pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(stopped_pid, signal.SIGKILL)
    report = "".join(lines)
    assert "pipeline stage 0: stage 1 (rank 1) died or stopped answering" in report, report[-3000:]
    assert detected_after < 2 * timeout


@pytest.mark.slow
def test_classify_through_a_torchrun_pipeline_answers_as_the_single_process_server(llava_classifier):
    """A 2-stage LLaVA classifier behind the HTTP server: the classifier runs on the last stage, /classify gives
    the single-process server's probabilities within 1e-5."""
    folder, classifier = llava_classifier
    with served(LocalEngine(classifier, tiny_parts("llava")[1], model_id="tiny")) as base_url:
        expected = classify(base_url)
    with pipeline_server(folder) as (base_url, _, _):
        torch.testing.assert_close(torch.tensor(classify(base_url)), torch.tensor(expected), rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["torchrun", "rank 0"])
def test_sigterm_drains_the_open_streams_then_stops_the_stages(saved_models, target):
    """SIGTERM to torchrun (which passes it to every process) or to rank 0 alone: the open streams still run to
    their end, as with the single-process server; then rank 0 stops the stages and everything exits."""
    folder, _, _ = saved_models("qwen2_vl")
    with pipeline_server(folder) as (base_url, process, lines):
        started = threading.Semaphore(0)
        endings: dict[int, tuple[str | None, int, bool]] = {}

        def stream(index: int) -> None:
            body = {**chat_body(f"Tell a long story {index}."), "model": "tiny", "max_tokens": 40, "stream": True}
            body["temperature"] = 0
            chunks, finish_reason, done = 0, None, False
            with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=120) as response:
                for line in response.iter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        choices = json.loads(line[6:])["choices"]
                        chunks += 1
                        if chunks == 1:
                            started.release()
                        if choices and choices[0]["finish_reason"]:
                            finish_reason = choices[0]["finish_reason"]
            endings[index] = (finish_reason, chunks, done)

        threads = [threading.Thread(target=stream, args=(index,)) for index in range(3)]
        for thread in threads:
            thread.start()
        for _ in threads:
            assert started.acquire(timeout=120), "".join(lines)[-3000:]
        if target == "torchrun":
            process.send_signal(signal.SIGTERM)
        else:
            os.kill(int(re.search(r"stage 0/2 \(rank 0, pid (\d+)\)", "".join(lines)).group(1)), signal.SIGTERM)
        for thread in threads:
            thread.join(120)
        process.wait(90)
    assert all(finish_reason in ("length", "stop") and done for finish_reason, _, done in endings.values()), endings
    assert len(endings) == 3
    report = "".join(lines)
    assert "died or stopped answering" not in report, report[-3000:]
