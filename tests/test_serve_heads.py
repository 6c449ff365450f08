"""Every head served on a non-Qwen family: a classifier (PaliGemma) on POST /classify, a trajectory head (LLaVA) on
POST /v1/trajectory, a VLA loaded from its saved folder (PaliGemma) on POST /v1/actions, and chat on a plain LLaVA
through the official `openai` client; outputs equal the model called in-process. The route follows the head the
model declares, bad input is a 400 naming the field, and a model the server cannot serve is refused at startup."""

import httpx
import openai
import pytest
import torch
from serve_helpers import data_url, served, tiny_parts
from vla_helpers import ACTION_SETTINGS, STATE, make_model, processor_of
from vlm_helpers import (
    DRIVING_SIZES,
    driving_features,
    driving_processor,
    tiny_backbone,
    tiny_image,
    tiny_processor,
    trajectory_backbone,
)

from vlmheads import VLMForImageClassification, VLMForTrajectory
from vlmheads.processing.collator_vla import VLADataCollator
from vlmheads.processing.pipeline_inputs import user_prompt
from vlmheads.registry.vlms import tiny_vlm_config
from vlmheads.serve import LocalEngine
from vlmheads.serve.heads import ServedModel, ServingError
from vlmheads.serve.models import load_model_folder

LABELS = {0: "cat", 1: "dog", 2: "car"}
API_KEY = "heads-key"


def serve_model(model, processor, model_id: str, api_key: str | None = None):
    """A LocalEngine over `model`, served on a free port; yields (base URL, model, processor)."""
    engine = LocalEngine(model.eval(), processor, model_id=model_id)
    with served(engine, api_key=api_key) as url:
        yield url, model, processor
    engine.close(drain=False)


@pytest.fixture(scope="module")
def classifier():
    model = VLMForImageClassification.from_backbone(
        tiny_backbone("paligemma"),
        pooling="multimodal",
        id2label=LABELS,
        label2id={label: index for index, label in LABELS.items()},
        classifier_hidden_dims=[32],
        classifier_dropout_rates=[0.0],
    )
    yield from serve_model(model, tiny_processor("paligemma"), "tiny-classifier")


@pytest.fixture(scope="module")
def planner():
    placeholders = driving_processor("llava")
    model = VLMForTrajectory.from_backbone(
        trajectory_backbone("llava"), **DRIVING_SIZES, **placeholders.model_config_kwargs()
    )
    yield from serve_model(model, placeholders.processor, "tiny-planner")


@pytest.fixture(scope="module")
def vla(tmp_path_factory):
    """A VLA saved as a folder and loaded the way `python -m vlmheads.serve --model DIR` loads it."""
    folder = tmp_path_factory.mktemp("vla") / "tiny-vla"
    make_model("paligemma", "regression", **ACTION_SETTINGS).save_pretrained(folder)
    processor_of("paligemma").save_pretrained(folder)
    model, processor = load_model_folder(str(folder))
    yield from serve_model(model, processor, "tiny-vla", api_key=API_KEY)


def authorized(key: str = API_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def action_body(**fields) -> dict:
    return {"model": "tiny-vla", "images": [data_url(tiny_image(3))], "instruction": "pick the cube", **fields}


# ---- /classify ----------------------------------------------------------------------------------------------------


def classified_in_process(model, processor, image, question: str) -> torch.Tensor:
    inputs = processor(images=[[image]], text=[user_prompt(processor, question, 1)], return_tensors="pt")
    inputs.pop("labels", None)
    with torch.no_grad():
        return model(**inputs).logits[0].softmax(-1)


def test_classify_serves_a_paligemma_classifier(classifier):
    url, model, processor = classifier
    images = [tiny_image(1), tiny_image(2)]
    response = httpx.post(f"{url}/classify", json={"model": "tiny-classifier", "input": [data_url(i) for i in images]})
    assert response.status_code == 200, response.text
    for index, (entry, image) in enumerate(zip(response.json()["data"], images, strict=True)):
        expected = classified_in_process(model, processor, image, "")
        assert entry["index"] == index and entry["num_classes"] == len(LABELS)
        assert torch.allclose(torch.tensor(entry["probs"]), expected, atol=1e-5)
        assert entry["label"] == LABELS[int(expected.argmax())]


def test_classify_a_chat_turn_without_a_chat_template(classifier):
    url, model, processor = classifier
    content = [{"type": "image_url", "image_url": {"url": data_url(tiny_image(4))}}, {"type": "text", "text": "Pet?"}]
    response = httpx.post(f"{url}/classify", json={"messages": [{"role": "user", "content": content}]})
    assert response.status_code == 200, response.text
    expected = classified_in_process(model, processor, tiny_image(4), "Pet?")
    assert torch.allclose(torch.tensor(response.json()["data"][0]["probs"]), expected, atol=1e-5)
    two_turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}]
    refused = httpx.post(f"{url}/classify", json={"messages": two_turns})
    assert refused.status_code == 400 and "no chat template" in refused.json()["error"]["message"]


def test_a_classifier_answers_no_other_route(classifier):
    url, _, _ = classifier
    for route in ("/v1/trajectory", "/v1/actions"):
        response = httpx.post(f"{url}{route}", json={})
        assert response.status_code == 404, route
        error = response.json()["error"]
        assert error["code"] == "unsupported_endpoint" and "answers POST /classify" in error["message"]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="generates no text"):
        client.chat.completions.create(model="tiny-classifier", messages=[{"role": "user", "content": "Hi"}])


def test_a_head_route_without_the_processor_is_unavailable(classifier):
    _, model, _ = classifier
    engine = LocalEngine(model, None, model_id="no-processor")
    with served(engine) as url:
        response = httpx.post(f"{url}/classify", json={"input": data_url(tiny_image(1))})
    engine.close(drain=False)
    assert response.status_code == 503 and response.json()["error"]["code"] == "processor_missing"


# ---- /v1/trajectory -----------------------------------------------------------------------------------------------


def test_trajectory_serves_a_llava_trajectory_head(planner):
    url, model, processor = planner
    features = driving_features(0)
    body = {name: value.tolist() for name, value in features.items()}
    response = httpx.post(f"{url}/v1/trajectory", json={**body, "image": data_url(tiny_image(5)), "prompt": "Left."})
    assert response.status_code == 200, response.text
    placeholders = driving_processor("llava")
    tokens = placeholders.tokens
    text = f"{tokens['scene']}{tokens['history']}{tokens['can_bus']}Left.{tokens['ego']}"
    inputs = placeholders(
        text=[user_prompt(processor, text, 1)],
        images=[[tiny_image(5)]],
        **{name: value.unsqueeze(0) for name, value in features.items()},
    )
    with torch.no_grad():
        expected = model(**inputs).trajectory[0]
    result = response.json()
    assert torch.allclose(torch.tensor(result["waypoints"]), expected, atol=1e-5)
    assert result["modes"] is None and result["usage"]["prompt_tokens"] == inputs["input_ids"].shape[1]


def test_trajectory_requests_are_checked_like_the_pipeline(planner):
    url, _, _ = planner
    body = {name: value.tolist() for name, value in driving_features(1).items()}
    wrong = httpx.post(f"{url}/v1/trajectory", json={**body, "history_queries": [[0.0] * 6] * 3})
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "history_queries"
    assert "must have shape (2, 6)" in wrong.json()["error"]["message"]
    command = httpx.post(f"{url}/v1/trajectory", json={**body, "command": 0})
    assert command.status_code == 400 and command.json()["error"]["param"] == "command"
    ragged = httpx.post(f"{url}/v1/trajectory", json={**body, "scene_queries": [[0.0] * 8, [0.0] * 7, [0.0] * 8]})
    assert ragged.status_code == 400 and ragged.json()["error"]["param"] == "scene_queries"


# ---- /v1/actions --------------------------------------------------------------------------------------------------


def test_actions_serve_a_paligemma_vla_folder(vla):
    url, model, processor = vla
    response = httpx.post(f"{url}/v1/actions", json=action_body(state=STATE), headers=authorized())
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["object"] == "actions" and result["id"].startswith("act-") and result["model"] == "tiny-vla"
    record = {"images": [tiny_image(3)], "instruction": "pick the cube", "state": torch.tensor(STATE).numpy()}
    inputs = VLADataCollator.for_model(processor, model.config, with_actions=False)([record])
    expected = model.predict_actions(**inputs)[0]
    actions = torch.tensor(result["actions"])
    assert actions.shape == (ACTION_SETTINGS["chunk_size"], ACTION_SETTINGS["action_dim"])
    assert torch.allclose(actions, expected, atol=1e-5)
    assert result["usage"]["prompt_tokens"] == inputs["input_ids"].shape[1]


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        ({}, "state", "reads the robot state"),
        ({"state": [0.0, 1.0]}, "state", "state must have shape (4,), got (2,)"),
        ({"state": STATE, "instruction": "  "}, "instruction", "instruction must name the task"),
        ({"state": STATE, "images": []}, "images", "at least 1 item"),
        ({"state": STATE, "images": ["data:image/png;base64,aGVsbG8="]}, "images.0", "not hold a readable image"),
        ({"state": STATE, "images": ["https://example.com/a.png"]}, "images.0", "remote image URLs are refused"),
    ],
)
def test_actions_name_the_bad_field(vla, fields, param, message):
    url, _, _ = vla
    response = httpx.post(f"{url}/v1/actions", json=action_body(**fields), headers=authorized())
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"]


def test_actions_need_the_api_key_and_the_served_model(vla):
    url, _, _ = vla
    body = action_body(state=STATE)
    assert httpx.post(f"{url}/v1/actions", json=body).status_code == 401
    assert httpx.post(f"{url}/v1/actions", json=body, headers=authorized("wrong")).status_code == 401
    other = httpx.post(f"{url}/v1/actions", json={**body, "model": "other"}, headers=authorized())
    assert other.status_code == 404 and other.json()["error"]["code"] == "model_not_found"
    classify = httpx.post(f"{url}/classify", json={"input": body["images"]}, headers=authorized())
    assert classify.status_code == 404 and "answers POST /v1/actions" in classify.json()["error"]["message"]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="VLAForActionPrediction generates no text"):
        client.chat.completions.create(model="tiny-vla", messages=[{"role": "user", "content": "Hi"}])


# ---- chat on a 1-D-position family, and models the server cannot serve --------------------------------------------


def test_chat_on_llava_through_the_openai_client():
    model, processor = tiny_parts("llava")
    engine = LocalEngine(model, processor, model_id="tiny-llava")
    content = [{"type": "image"}, {"type": "text", "text": "What is it?"}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(images=[tiny_image(6)], text=[prompt], return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    expected = processor.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    with served(engine) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        parts = [
            {"type": "image_url", "image_url": {"url": data_url(tiny_image(6))}},
            {"type": "text", "text": "What is it?"},
        ]
        answer = client.chat.completions.create(
            model="tiny-llava", messages=[{"role": "user", "content": parts}], max_tokens=6, temperature=0
        )
        assert httpx.post(f"{url}/classify", json={"input": parts[0]["image_url"]["url"]}).status_code == 404
    engine.close(drain=False)
    assert answer.choices[0].message.content == expected


def test_models_the_server_cannot_serve_are_refused_at_startup():
    with pytest.raises(ServingError, match="cannot serve `policy`.*predicts actions"):
        ServedModel.of("policy", tiny_vlm_config("pi0"), None)
    # A trajectory head next to the family's plain processor, whose tokenizer lacks the driving placeholders.
    config = VLMForTrajectory.config_class(backbone_config=tiny_vlm_config("llava"), **DRIVING_SIZES)
    with pytest.raises(ServingError, match="cannot serve `planner`.*name no placeholder token"):
        ServedModel.of("planner", config, tiny_processor("llava"))
