"""Pipelines of the heads on any family, from saved folders: `image-classification` for `VLMForImageClassification`
(transformers' own pipeline for pooling="vision", the folder's subclass for "multimodal"), `trajectory-prediction`
for `VLMForTrajectory` (the Orion pipeline) and `action-prediction` for `VLAForActionPrediction`; also in an
interpreter without vlmheads, and bad input."""

import json

import numpy as np
import pytest
import torch
from remote_code_checks import run_without_vlmheads
from transformers import ImageClassificationPipeline, pipeline
from vla_helpers import ACTION_SETTINGS, STATE, make_model, processor_of
from vlm_helpers import (
    DRIVING_SIZES,
    driving_features,
    driving_processor,
    family_batch,
    tiny_backbone,
    tiny_image,
    tiny_processor,
    trajectory_backbone,
)

from vlmheads import ActionPredictionPipeline, OrionTrajectoryPipeline, VLMForImageClassification, VLMForTrajectory
from vlmheads.processing.collator_vla import VLADataCollator
from vlmheads.processing.pipeline_inputs import user_prompt

# Representative families: a CLIP-style projector (LLaVA), M-RoPE with image grids (Qwen2-VL), image tiles (SmolVLM).
FAMILIES = ("llava", "qwen2-vl", "smolvlm")
LABELS = {0: "cat", 1: "dog", 2: "car"}


def build(kind: str, name: str):
    """The model of `kind` on the family's tiny backbone, and the processor its folder holds."""
    if kind in ("vision", "multimodal"):
        model = VLMForImageClassification.from_backbone(
            tiny_backbone(name),
            pooling=kind,
            id2label=LABELS,
            label2id={label: index for index, label in LABELS.items()},
            classifier_hidden_dims=[32],
            classifier_dropout_rates=[0.0],
        )
        return model.eval(), tiny_processor(name)
    if kind == "trajectory":
        placeholders = driving_processor(name)
        model = VLMForTrajectory.from_backbone(
            trajectory_backbone(name), **DRIVING_SIZES, **placeholders.model_config_kwargs()
        )
        return model.eval(), placeholders.processor
    return make_model(name, "regression" if kind == "action" else "flow", **ACTION_SETTINGS).eval(), processor_of(name)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """`get(kind, name)` → (folder, model, processor), saved once; tests must not change them."""
    built = {}

    def get(kind: str, name: str):
        if (kind, name) not in built:
            model, processor = build(kind, name)
            folder = tmp_path_factory.mktemp(f"{kind}-{name}")
            model.save_pretrained(folder)
            processor.save_pretrained(folder)
            built[kind, name] = (folder, model, processor)
        return built[kind, name]

    return get


def scores_of(logits: torch.Tensor) -> dict[str, float]:
    return {LABELS[index]: value for index, value in enumerate(logits.softmax(-1)[0].tolist())}


def planned_by_model(model, name: str, image, instruction: str, features: dict) -> np.ndarray:
    placeholders = driving_processor(name)
    tokens = placeholders.tokens
    text = f"{tokens['scene']}{tokens['history']}{tokens['can_bus']}{instruction}{tokens['ego']}"
    prompt = user_prompt(placeholders.processor, text, num_images=int(image is not None))
    batched = {key: value.unsqueeze(0) for key, value in features.items()}
    inputs = placeholders(text=[prompt], images=None if image is None else [[image]], **batched)
    inputs.pop("labels", None)
    with torch.no_grad():
        return model(**inputs).trajectory[0].numpy()


# image-classification


@pytest.mark.parametrize("name", FAMILIES)
def test_a_vision_classifier_serves_transformers_own_image_classification_pipeline(name, saved):
    folder, model, _ = saved("vision", name)
    assert "custom_pipelines" not in json.loads((folder / "config.json").read_text())
    classifier = pipeline("image-classification", model=str(folder), trust_remote_code=True)
    assert type(classifier) is ImageClassificationPipeline

    out = classifier(tiny_image(0))

    with torch.no_grad():
        expected = scores_of(model(**family_batch(name, ["What is it?"], seeds=[0])).logits)
    assert [entry["label"] for entry in out] == sorted(expected, key=expected.get, reverse=True)
    for entry in out:
        assert entry["score"] == pytest.approx(expected[entry["label"]], abs=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_a_multimodal_classifier_pipeline_puts_the_image_into_the_prompt(name, saved):
    folder, model, _ = saved("multimodal", name)
    config = json.loads((folder / "config.json").read_text())
    assert config["custom_pipelines"]["image-classification"]["impl"] == (
        "pipeline_vlm_classification.VLMImageClassificationPipeline"
    )
    classifier = pipeline("image-classification", model=str(folder), trust_remote_code=True)
    assert type(classifier).__module__.startswith("transformers_modules.")

    for question in ("What is it?", ""):
        out = classifier(tiny_image(0), prompt=question) if question else classifier(tiny_image(0))
        with torch.no_grad():
            expected = scores_of(model(**family_batch(name, [question], seeds=[0])).logits)
        for entry in out:
            assert entry["score"] == pytest.approx(expected[entry["label"]], abs=1e-5), question
    asked, bare = classifier(tiny_image(0), prompt="What is it?", top_k=3), classifier(tiny_image(0), top_k=3)
    assert {e["label"]: e["score"] for e in asked} != pytest.approx({e["label"]: e["score"] for e in bare}, abs=1e-7)


def test_the_multimodal_pipeline_names_a_missing_processor_and_a_corrupt_image(saved, tmp_path):
    folder, model, _ = saved("multimodal", "llava")
    without_processor = tmp_path / "model-only"
    model.save_pretrained(without_processor)
    with pytest.raises(ValueError, match="image-classification pipeline needs the family's processor"):
        pipeline("image-classification", model=str(without_processor), trust_remote_code=True)
    classifier = pipeline("image-classification", model=str(folder), trust_remote_code=True)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    with pytest.raises(ValueError, match=r"image = '.*corrupt.png' is not a readable image file"):
        classifier(str(corrupt))
    with pytest.raises(ValueError, match="prompt must be a string, got int"):
        classifier(tiny_image(0), prompt=3)


# trajectory-prediction


@pytest.mark.parametrize("name", FAMILIES)
def test_the_trajectory_pipeline_serves_the_generic_trajectory_head(name, saved):
    folder, model, _ = saved("trajectory", name)
    config = json.loads((folder / "config.json").read_text())
    assert config["custom_pipelines"] == {
        "trajectory-prediction": {"impl": "pipeline_orion_trajectory.OrionTrajectoryPipeline", "pt": ["AutoModel"]}
    }
    planner = pipeline("trajectory-prediction", model=str(folder), trust_remote_code=True)
    features = driving_features(1)

    out = planner(tiny_image(3), prompt="Turn left.", **features)
    without_camera = planner(None, **driving_features(2))

    assert out["waypoints"].shape == (DRIVING_SIZES["num_waypoints"], 2)
    expected = planned_by_model(model, name, tiny_image(3), "Turn left.", features)
    np.testing.assert_allclose(out["waypoints"], expected, rtol=1e-5, atol=1e-6)
    expected = planned_by_model(model, name, None, "Plan a safe trajectory for the ego car.", driving_features(2))
    np.testing.assert_allclose(without_camera["waypoints"], expected, rtol=1e-5, atol=1e-6)


def test_with_vlmheads_installed_the_pipelines_serve_models_in_memory(saved):
    _, model, processor = saved("trajectory", "llava")
    planner = pipeline("trajectory-prediction", model=model, processor=processor)
    assert isinstance(planner, OrionTrajectoryPipeline)
    expected = planned_by_model(model, "llava", None, "Plan a safe trajectory for the ego car.", driving_features(5))
    np.testing.assert_allclose(planner(None, **driving_features(5))["waypoints"], expected, rtol=1e-5, atol=1e-6)
    _, model, processor = saved("action", "llava")
    policy = pipeline("action-prediction", model=model, processor=processor)
    assert isinstance(policy, ActionPredictionPipeline)
    assert policy(tiny_image(1), instruction="push the cube", state=STATE)["actions"].shape == (2, 3)


def test_a_plain_question_to_the_trajectory_head_gives_no_trajectory():
    placeholders = driving_processor("llava")
    model = build("trajectory", "llava")[0]
    prompt = user_prompt(placeholders.processor, "<scene><history><can_bus>What is ahead?", num_images=1)
    features = {key: value.unsqueeze(0) for key, value in driving_features(0).items()}
    inputs = placeholders(text=[prompt], images=[[tiny_image(0)]], **features)
    with torch.no_grad():
        output = model(**inputs)
    assert output.trajectory is None and output.ego_features is None
    with pytest.raises(ValueError, match="ego_waypoints were given but input_ids hold no <ego_wp>"):
        model(**inputs, ego_waypoints=torch.zeros(1, DRIVING_SIZES["num_waypoints"], 2))
    with pytest.raises(ValueError, match="Prompt 0 holds 2 <ego_wp> tokens; a prompt holds at most one"):
        placeholders(text=[prompt + "<ego_wp><ego_wp>"], images=[[tiny_image(0)]], **features)


def test_the_trajectory_pipeline_names_missing_inputs_and_a_corrupt_image(saved, tmp_path):
    folder, model, _ = saved("trajectory", "llava")
    planner = pipeline("trajectory-prediction", model=str(folder), trust_remote_code=True)
    features = driving_features(0)
    with pytest.raises(ValueError, match=r"missing: history_queries \(2, 6\), can_bus \(5,\)"):
        planner(tiny_image(0), scene_queries=features["scene_queries"])
    corrupt = tmp_path / "truncated.png"
    tiny_image(0).save(corrupt)
    corrupt.write_bytes(corrupt.read_bytes()[:60])
    with pytest.raises(ValueError, match=r"images\[0\]\[0\] = '.*truncated.png' is not a readable image file"):
        planner(str(corrupt), **features)
    # A folder whose processor lacks the placeholder tokens (the family's plain processor was saved).
    plain = tmp_path / "plain-processor"
    model.save_pretrained(plain)
    tiny_processor("llava").save_pretrained(plain)
    with pytest.raises(ValueError, match=r"\['scene_token_id', .*'ego_token_id'\] name no placeholder token"):
        pipeline("trajectory-prediction", model=str(plain), trust_remote_code=True)


# action-prediction


@pytest.mark.parametrize(
    ("kind", "name"),
    [("action", "smolvlm"), ("action", "llava"), pytest.param("flow-action", "qwen2-vl", marks=pytest.mark.slow)],
)
def test_the_action_pipeline_returns_the_unnormalised_chunk_of_the_model(kind, name, saved):
    folder, model, processor = saved(kind, name)
    assert json.loads((folder / "config.json").read_text())["custom_pipelines"] == {
        "action-prediction": {"impl": "pipeline_vla_actions.ActionPredictionPipeline", "pt": ["AutoModel"]}
    }
    policy = pipeline("action-prediction", model=str(folder), trust_remote_code=True)
    assert type(policy).__module__.startswith("transformers_modules.")

    torch.manual_seed(4)
    out = policy(tiny_image(5), instruction="pick the red cube", state=STATE)

    assert out["actions"].shape == (2, 3) and out["actions"].dtype == np.float32
    record = {"images": [tiny_image(5)], "instruction": "pick the red cube", "state": STATE}
    batch = VLADataCollator.for_model(processor, model.config, with_actions=False)([record])
    torch.manual_seed(4)
    expected = model.predict_actions(**batch)[0].numpy()
    np.testing.assert_allclose(out["actions"], expected, rtol=1e-5, atol=1e-5)


def test_the_action_pipeline_names_missing_and_bad_inputs(saved, tmp_path):
    folder, _, _ = saved("action", "smolvlm")
    policy = pipeline("action-prediction", model=str(folder), trust_remote_code=True)
    image = tiny_image(0)
    with pytest.raises(ValueError, match=r'needs instruction="\.\.\."'):
        policy(image, state=STATE)
    with pytest.raises(ValueError, match=r"reads the robot state: pass state=\.\.\. of shape \(4,\)"):
        policy(image, instruction="pick the red cube")
    with pytest.raises(ValueError, match=r"state must have shape \(4,\), got \(3,\)"):
        policy(image, instruction="pick the red cube", state=STATE[:3])
    with pytest.raises(ValueError, match="state contains NaN"):
        policy(image, instruction="pick the red cube", state=[float("nan")] * 4)
    with pytest.raises(ValueError, match="needs images"):
        policy(None, instruction="pick the red cube", state=STATE)
    with pytest.raises(ValueError, match=r"Unknown arguments \['speed'\]"):
        policy(image, instruction="pick the red cube", state=STATE, speed=2)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(ValueError, match=r"images\[0\] = '.*corrupt.jpg' is not a readable image file"):
        policy(str(corrupt), instruction="pick the red cube", state=STATE)


# Without vlmheads


@pytest.mark.slow
def test_every_head_pipeline_runs_from_its_folder_in_an_interpreter_without_vlmheads(saved, tmp_path):
    image_path = tmp_path / "camera.png"
    tiny_image(7).save(image_path)
    cases = [
        ("image-classification", ("vision", "qwen2-vl"), {}),
        ("image-classification", ("multimodal", "smolvlm"), {"prompt": "What is it?"}),
        ("trajectory-prediction", ("trajectory", "qwen2-vl"), {"prompt": "Stop.", **driving_features(3)}),
        ("action-prediction", ("action", "llava"), {"instruction": "pick the red cube", "state": STATE}),
    ]
    request = {
        "image_path": str(image_path),
        "calls": [
            {"task": task, "folder": str(saved(*key)[0]), "kwargs": kwargs, "seed": 0} for task, key, kwargs in cases
        ],
    }

    remote = run_without_vlmheads("isolated_pipelines_heads.py", tmp_path, request, tmp_path)

    assert [name.rsplit(".", 1)[1] for name in remote["classes"]] == [
        "VLMForImageClassification",
        "VLMForImageClassification",
        "VLMForTrajectory",
        "VLAForActionPrediction",
    ]
    assert remote["pipelines"][0] == "transformers.pipelines.image_classification.ImageClassificationPipeline"
    assert [name.split(".")[0] for name in remote["pipelines"][1:]] == ["transformers_modules"] * 3
    assert [name.rsplit(".", 1)[1] for name in remote["pipelines"][1:]] == [
        "VLMImageClassificationPipeline",
        "OrionTrajectoryPipeline",
        "ActionPredictionPipeline",
    ]
    for (task, key, kwargs), result in zip(cases, remote["results"], strict=True):
        local = pipeline(task, model=str(saved(*key)[0]), trust_remote_code=True)
        torch.manual_seed(0)
        expected = local(str(image_path), **kwargs)
        if task == "image-classification":
            assert [entry["label"] for entry in result] == [entry["label"] for entry in expected]
            np.testing.assert_allclose([e["score"] for e in result], [e["score"] for e in expected], atol=1e-6)
        else:
            output = "waypoints" if task == "trajectory-prediction" else "actions"
            np.testing.assert_allclose(result[output].numpy(), expected[output], rtol=1e-5, atol=1e-6)
