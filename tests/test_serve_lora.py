"""LoRA adapters chosen per request (`--lora name=path`): adapter and base-model requests decode in one batch and
answer like the in-process peft model, /v1/models lists them, and bad adapter flags stop the server at startup."""

import contextlib
import json
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from peft import get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from serve_helpers import camera_data_url, camera_image, served, tiny_parts

from vlmheads import cli
from vlmheads.serve import LocalEngine
from vlmheads.serve.__main__ import main
from vlmheads.serve.lora import BASE_ADAPTER, LoraAdapters, parse_lora_specs
from vlmheads.serve.models import EMBEDDED_MODEL_ID, embedded_tiny_model
from vlmheads.training.backbones import lora_config

ADAPTERS = ("driving-a", "driving-b")
MAX_TOKENS = 8


def fresh_base() -> torch.nn.Module:
    """A new copy of the embedded tiny model (LoRA loads into a model in place: the shared one stays clean)."""
    return embedded_tiny_model(processor=tiny_parts()[1])[0]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """The in-process peft model with two random adapters (LoRA on the language model, the driving head retrained),
    and the folder they are saved in, one subfolder per adapter."""
    base = fresh_base()
    config = lora_config(base, r=4, alpha=8, dropout=0.0)
    reference = get_peft_model(base, config, adapter_name=ADAPTERS[0])
    reference.add_adapter(ADAPTERS[1], lora_config(base, r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for index, name in enumerate(ADAPTERS):
            generator = torch.Generator().manual_seed(index)
            for parameter_name, parameter in reference.named_parameters():
                if f".{name}." in parameter_name and (
                    "lora_B" in parameter_name or "modules_to_save" in parameter_name
                ):
                    parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
    root = tmp_path_factory.mktemp("lora")
    reference.save_pretrained(root, save_embedding_layers=False)  # ("auto" asks the Hub about the base)
    return reference.eval(), root


@pytest.fixture(scope="module")
def server(adapters):
    _, root = adapters
    specs = parse_lora_specs([f"{name}={root / name}" for name in ADAPTERS], EMBEDDED_MODEL_ID)
    engine = LocalEngine(fresh_base(), tiny_parts()[1], model_id=EMBEDDED_MODEL_ID, prefix_cache_entries=4, lora=specs)
    with served(engine) as base_url:
        yield engine, base_url
    engine.close()


def chat_inputs(text: str, image=None) -> dict:
    processor = tiny_parts()[1]
    content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": text}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return dict(processor(images=None if image is None else [image], text=[prompt], return_tensors="pt"))


def reference_answer(reference, inputs: dict, adapter: str | None) -> tuple[list[int], list[float]]:
    """Greedy tokens and their log-probabilities from the peft model with `adapter` active (None: disabled)."""
    if adapter is not None:
        reference.set_adapter(adapter)
    with torch.no_grad(), reference.disable_adapter() if adapter is None else contextlib.nullcontext():
        output = reference.generate(
            **inputs, max_new_tokens=MAX_TOKENS, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    tokens = output.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    logprobs = [
        float(step[0].float().log_softmax(-1)[token]) for step, token in zip(output.logits, tokens, strict=True)
    ]
    return tokens, logprobs


def ask(base_url: str, model: str, text: str, image_url: str | None = None):
    content = ([{"type": "image_url", "image_url": {"url": image_url}}] if image_url else []) + [
        {"type": "text", "text": text}
    ]
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": content}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        logprobs=True,
    )


def test_adapter_and_base_requests_decode_in_one_batch_and_answer_like_peft(adapters, server):
    reference, _ = adapters
    engine, base_url = server
    tokenizer = tiny_parts()[1].tokenizer
    requests = [
        (ADAPTERS[0], "Describe the road ahead.", 3),
        (ADAPTERS[1], "Describe the road ahead.", None),
        (EMBEDDED_MODEL_ID, "Describe the road ahead.", None),
    ]
    expected = []
    for model, text, image_seed in requests:
        inputs = chat_inputs(text, None if image_seed is None else camera_image(image_seed))
        expected.append(reference_answer(reference, inputs, None if model == EMBEDDED_MODEL_ID else model))
    assert expected[1][0] != expected[2][0], "the adapter answers like the base model: it proves nothing"

    released = threading.Event()

    def hold_the_first_prompt(module, args):
        # The first prompt waits for the other two requests: all three then decode together.
        deadline = time.monotonic() + 20
        while not released.is_set() and engine.load().waiting < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        released.set()

    adapter_names_seen = []
    lora_layer = next(module for module in engine.model.modules() if isinstance(module, LoraLayer))
    hooks = [
        engine.model.get_input_embeddings().register_forward_pre_hook(hold_the_first_prompt),
        lora_layer.register_forward_hook(
            lambda module, args, kwargs, output: adapter_names_seen.append(tuple(kwargs.get("adapter_names") or ())),
            with_kwargs=True,
        ),
    ]
    try:
        with ThreadPoolExecutor(len(requests)) as pool:
            futures = [
                pool.submit(ask, base_url, model, text, None if seed is None else camera_data_url(seed))
                for model, text, seed in requests
            ]
            responses = [future.result() for future in futures]
    finally:
        for hook in hooks:
            hook.remove()
    assert any(set(names) == {*ADAPTERS, BASE_ADAPTER} for names in adapter_names_seen), adapter_names_seen
    for response, (model, _, _), (tokens, logprobs) in zip(responses, requests, expected, strict=True):
        assert response.model == model, "a response names the adapter it ran with, as vLLM's do"
        entries = response.choices[0].logprobs.content
        assert [entry.token for entry in entries] == [tokenizer.decode([token]) for token in tokens], model
        assert [entry.logprob for entry in entries] == pytest.approx(logprobs, abs=1e-5), model


def test_models_lists_the_adapters_and_an_unknown_model_is_a_404(adapters, server):
    _, root = adapters
    _, base_url = server
    cards = httpx.get(f"{base_url}/v1/models").json()["data"]
    assert [(card["id"], card["parent"]) for card in cards] == [
        (EMBEDDED_MODEL_ID, None),
        *((name, EMBEDDED_MODEL_ID) for name in ADAPTERS),
    ]
    assert [card["root"] for card in cards[1:]] == [str(root / name) for name in ADAPTERS]
    assert {card["head_kind"] for card in cards} == {"trajectory"}
    with pytest.raises(openai.NotFoundError, match="The model `driving-c` does not exist"):
        ask(base_url, "driving-c", "Hi.")


def test_the_prefix_cache_never_serves_one_adapters_cache_to_another(adapters, server):
    reference, _ = adapters
    engine, base_url = server
    text = "You are a careful driving assistant. Read the scene and answer briefly and precisely. " * 2
    ask(base_url, EMBEDDED_MODEL_ID, text)
    hits = engine.prefix_cache.hits
    response = ask(base_url, ADAPTERS[0], text)
    assert engine.prefix_cache.hits == hits, "the adapter's prompt reused the base model's cache"
    tokens, _ = reference_answer(reference, chat_inputs(text), ADAPTERS[0])
    assert [entry.token for entry in response.choices[0].logprobs.content] == [
        tiny_parts()[1].tokenizer.decode([token]) for token in tokens
    ]
    ask(base_url, ADAPTERS[0], text)
    assert engine.prefix_cache.hits == hits + 1


def test_a_trajectory_request_runs_its_adapters_head(adapters, server):
    reference, _ = adapters
    _, base_url = server
    processor = tiny_parts()[1]
    config = reference.config
    generator = torch.Generator().manual_seed(5)
    features = {
        "scene_queries": torch.randn(config.num_scene_queries, config.scene_query_dim, generator=generator),
        "history_queries": torch.randn(config.num_history_queries, config.history_query_dim, generator=generator),
        "can_bus": torch.randn(config.can_bus_dim, generator=generator),
    }
    body = {name: value.tolist() for name, value in features.items()} | {"prompt": "Turn left."}
    content = [{"type": "scene"}, {"type": "history"}, {"type": "can_bus"}, {"type": "text", "text": "Turn left."}]
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [*content, {"type": "ego"}]}], add_generation_prompt=True
    )
    inputs = processor(text=[prompt], **{name: value[None] for name, value in features.items()}, return_tensors="pt")
    waypoints = {}
    for model in (ADAPTERS[1], EMBEDDED_MODEL_ID):
        response = httpx.post(f"{base_url}/v1/trajectory", json=body | {"model": model})
        assert response.status_code == 200, response.text
        waypoints[model] = torch.tensor(response.json()["waypoints"])
    reference.set_adapter(ADAPTERS[1])
    with torch.no_grad():
        expected = reference(**inputs).trajectory[0]
    assert torch.allclose(waypoints[ADAPTERS[1]], expected, atol=1e-5)
    assert not torch.allclose(waypoints[EMBEDDED_MODEL_ID], expected, atol=1e-3)


def test_bad_lora_flags_are_refused_naming_the_flag(adapters, tmp_path):
    _, root = adapters
    good = root / ADAPTERS[0]
    empty = tmp_path / "empty"
    empty.mkdir()
    other_kind = tmp_path / "ia3"
    other_kind.mkdir()
    (other_kind / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    cases = [
        (["driving-a"], "expected name=path"),
        ([f"={good}"], "expected name=path"),
        ([f"a={tmp_path / 'missing'}"], "no such folder"),
        ([f"a={empty}"], "holds no adapter_config.json"),
        ([f"a={other_kind}"], "holds a IA3 adapter, not a LoRA adapter"),
        ([f"a={good}", f"a={good}"], "given to two adapters"),
        ([f"{EMBEDDED_MODEL_ID}={good}"], "taken by the base model"),
        ([f"{BASE_ADAPTER}={good}"], "taken by the base model"),
    ]
    for values, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            parse_lora_specs(values, EMBEDDED_MODEL_ID)
        assert str(error.value).startswith("--lora "), values


def test_an_adapter_of_another_model_is_refused(adapters, tmp_path):
    _, root = adapters
    other_name, other_shape = tmp_path / "other-name", tmp_path / "other-shape"
    for folder in (other_name, other_shape):
        shutil.copytree(root / ADAPTERS[0], folder)
    config_file = other_name / "adapter_config.json"
    config_file.write_text(
        json.dumps(json.loads(config_file.read_text()) | {"base_model_name_or_path": "Qwen/Qwen2-VL-7B"})
    )
    weights_file = other_shape / "adapter_model.safetensors"
    weights = load_file(weights_file)
    name = next(name for name in weights if "lora_A" in name)
    weights[name] = torch.zeros(weights[name].shape[0], weights[name].shape[1] * 2)
    save_file(weights, weights_file)
    model = fresh_base()
    with pytest.raises(ValueError, match=r"--lora a=.*trained on `Qwen/Qwen2-VL-7B`.*serves `vlmheads-tiny-orion`"):
        LoraAdapters(model, parse_lora_specs([f"a={other_name}"], EMBEDDED_MODEL_ID))
    with pytest.raises(ValueError, match=r"(?s)--lora b=.*does not fit the served model.*size mismatch"):
        LoraAdapters(model, parse_lora_specs([f"b={other_shape}"], EMBEDDED_MODEL_ID))


@pytest.mark.parametrize("command", [main, lambda argv: cli.main(["serve", *argv])])
def test_the_server_stops_at_a_bad_lora_flag_before_loading_a_model(command, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # `vlmheads serve` hands its arguments on through sys.argv
    with pytest.raises(SystemExit) as stopped:
        command(["--lora", "broken"])
    assert stopped.value.code == 2
    assert "--lora broken: expected name=path" in capsys.readouterr().err
