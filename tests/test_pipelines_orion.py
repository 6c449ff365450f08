import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from orion_helpers import FAMILIES, camera_image, driving_features, driving_prompt, make_processor, real_vocab_model
from remote_code_checks import run_without_vlmheads
from transformers import AutoModel, pipeline

from vlmheads import OrionTrajectoryPipeline

# A plain question: no <ego_wp>, so the model answers in text without planning a trajectory.
QUESTION = [{"type": "text", "text": "What is in front of the ego car?"}]


@pytest.fixture(scope="module")
def saved_folders(tmp_path_factory):
    """One saved model folder per (family, num_modes), built once; tests must not change them."""
    built = {}

    def get(family, num_modes: int = 1):
        key = (family.name, num_modes)
        if key not in built:
            processor = make_processor(family)
            model = real_vocab_model(family, processor, num_modes=num_modes)
            folder = tmp_path_factory.mktemp(f"{family.name}-{num_modes}")
            model.save_pretrained(folder)
            processor.save_pretrained(folder)
            built[key] = (folder, model, processor)
        return built[key]

    return get


def planned_by_model(model, processor, image, instruction: str, features: dict, command=None) -> torch.Tensor:
    """The trajectory (T, 2) that the model itself plans for the prompt the pipeline builds."""
    content = [{"type": "image"}, {"type": "scene"}, {"type": "history"}, {"type": "can_bus"}]
    content += [{"type": "text", "text": instruction}, {"type": "ego"}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(images=[image], text=[prompt], **features, return_tensors="pt")
    if command is not None:
        inputs["command"] = torch.tensor([command])
    with torch.no_grad():
        return model(**inputs).trajectory[0]


def test_the_saved_config_names_the_pipeline_and_the_image_text_to_text_class(family, saved_folders):
    folder, _, _ = saved_folders(family)
    config = json.loads((folder / "config.json").read_text())
    model_class = f"modeling_orion_qwen.{family.model.__name__}"
    assert config["auto_map"]["AutoModel"] == config["auto_map"]["AutoModelForImageTextToText"] == model_class
    assert config["custom_pipelines"] == {
        "trajectory-prediction": {
            "impl": "pipeline_orion_trajectory.OrionTrajectoryPipeline",
            "pt": ["AutoModel", "AutoModelForImageTextToText"],
        }
    }
    assert (folder / "pipeline_orion_trajectory.py").is_file()


def test_the_trajectory_pipeline_from_the_folder_plans_like_the_model(family, saved_folders):
    folder, model, processor = saved_folders(family)
    planner = pipeline("trajectory-prediction", model=str(folder), trust_remote_code=True)
    assert type(planner).__module__.startswith("transformers_modules.")
    image, features = camera_image(1), driving_features(1, seed=2)

    # Tensors without the batch dimension, NumPy arrays and nested lists are all one sample.
    out = planner(
        image,
        scene_queries=features["scene_queries"][0],
        history_queries=features["history_queries"].numpy(),
        can_bus=features["can_bus"][0].tolist(),
        prompt="Turn left at the junction.",
    )

    assert set(out) == {"waypoints"} and out["waypoints"].shape == (6, 2)
    expected = planned_by_model(model, processor, image, "Turn left at the junction.", features)
    np.testing.assert_allclose(out["waypoints"], expected.numpy(), rtol=1e-5, atol=1e-6)


def test_the_pipeline_plans_without_a_camera_and_for_a_list_of_samples(saved_folders):
    folder, model, processor = saved_folders(FAMILIES["qwen2_vl"])
    planner = pipeline("trajectory-prediction", model=str(folder), trust_remote_code=True)
    samples = [{**driving_features(1, seed=seed)} for seed in (5, 6)]

    outs = planner(samples)

    for sample, out in zip(samples, outs, strict=True):
        prompt = driving_prompt(processor, "Plan a safe trajectory for the ego car.", image=False)
        with torch.no_grad():
            expected = model(**processor(text=[prompt], **sample, return_tensors="pt")).trajectory[0]
        np.testing.assert_allclose(out["waypoints"], expected.numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(outs[0]["waypoints"], outs[1]["waypoints"])


@pytest.mark.slow
def test_a_multi_mode_model_plans_the_commanded_mode_and_returns_every_mode(saved_folders):
    folder, model, processor = saved_folders(FAMILIES["qwen2_vl"], num_modes=6)
    planner = pipeline("trajectory-prediction", model=str(folder), trust_remote_code=True)
    image, features = camera_image(3), driving_features(1, seed=7)

    out = planner(image, command=4, prompt="Go straight.", **features)

    assert out["modes"].shape == (6, 6, 2)
    np.testing.assert_array_equal(out["waypoints"], out["modes"][4])
    expected = planned_by_model(model, processor, image, "Go straight.", features, command=4)
    np.testing.assert_allclose(out["waypoints"], expected.numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"command must be a mode index in \[0, 6\).*got None"):
        planner(image, **features)


def test_with_vlmheads_installed_the_task_is_registered_for_models_in_memory(saved_folders):
    _, model, processor = saved_folders(FAMILIES["qwen2_vl"])
    planner = pipeline("trajectory-prediction", model=model, processor=processor)
    assert isinstance(planner, OrionTrajectoryPipeline)
    features = driving_features(1, seed=12)
    out = planner(None, **features)
    prompt = driving_prompt(processor, "Plan a safe trajectory for the ego car.", image=False)
    with torch.no_grad():
        expected = model(**processor(text=[prompt], **features, return_tensors="pt")).trajectory[0]
    np.testing.assert_allclose(out["waypoints"], expected.numpy(), rtol=1e-5, atol=1e-6)


def test_a_call_without_the_driving_tensors_names_what_is_missing(saved_folders):
    folder, _, _ = saved_folders(FAMILIES["qwen2_vl"])
    planner = pipeline("trajectory-prediction", model=str(folder), trust_remote_code=True)
    features = driving_features(1)
    with pytest.raises(ValueError, match=r"missing: history_queries \(3, 256\), can_bus \(89,\)"):
        planner(camera_image(1), scene_queries=features["scene_queries"])
    with pytest.raises(ValueError, match=r"missing: scene_queries \(4, 256\)"):
        planner(camera_image(1))
    with pytest.raises(ValueError, match=r"scene_queries must have shape \(4, 256\).*got \(5, 256\)"):
        planner(camera_image(1), **{**features, "scene_queries": torch.zeros(5, 256)})
    with pytest.raises(ValueError, match="one mode; got 2"):
        planner(camera_image(1), command=2, **features)
    with pytest.raises(ValueError, match=r"Unknown arguments \['speed'\]"):
        planner(camera_image(1), speed=3.0, **features)


def test_the_image_text_to_text_pipeline_answers_with_the_folder(saved_folders):
    folder, model, processor = saved_folders(FAMILIES["qwen2_vl"])
    answerer = pipeline("image-text-to-text", model=str(folder), trust_remote_code=True)
    image = camera_image(4)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, *QUESTION]}]

    answer = answerer(text=messages, max_new_tokens=4, generate_kwargs={"do_sample": False}, return_full_text=False)

    assert isinstance(answerer.model, FAMILIES["qwen2_vl"].model)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, *QUESTION]}], add_generation_prompt=True
    )
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)[:, inputs["input_ids"].shape[1] :]
    assert answer[0]["generated_text"] == processor.batch_decode(generated, skip_special_tokens=True)[0]


@pytest.mark.parametrize(
    ("entry", "stale_value", "message"),
    [
        (("auto_map", "AutoModel"), "modeling_orion.OrionQwenForTrajectory", r"names modeling_orion.py, which"),
        (
            ("custom_pipelines", "trajectory-prediction", "impl"),
            "pipeline_orion_trajectory.OrionPlanner",
            r"pipeline_orion_trajectory.py defines no class OrionPlanner",
        ),
    ],
)
def test_a_folder_whose_code_names_do_not_match_its_files_is_refused(
    entry, stale_value, message, saved_folders, tmp_path
):
    folder, _, _ = saved_folders(FAMILIES["qwen2_vl"])
    stale = tmp_path / "stale"
    shutil.copytree(folder, stale)
    config = json.loads((stale / "config.json").read_text())
    *parents, key = entry
    target = config
    for parent in parents:
        target = target[parent]
    target[key] = stale_value
    (stale / "config.json").write_text(json.dumps(config))

    with pytest.raises(ValueError, match=rf"config.json: {entry[0]}\[.*{message}.*saved by another version"):
        pipeline("trajectory-prediction", model=str(stale), trust_remote_code=True)
    with pytest.raises(ValueError, match=message):
        AutoModel.from_pretrained(stale, trust_remote_code=True)


@pytest.mark.slow
def test_both_pipelines_run_from_the_folder_in_an_interpreter_without_vlmheads(saved_folders, tmp_path):
    folder, model, processor = saved_folders(FAMILIES["qwen2_5_vl"])
    image, features = camera_image(8), driving_features(1, seed=9)
    image.save(tmp_path / "camera.png")
    request = {
        "image_path": str(tmp_path / "camera.png"),
        "features": features,
        "instruction": "Stop at the crossing.",
        "question": QUESTION,
    }

    remote = run_without_vlmheads("isolated_pipelines_orion.py", Path(folder), request, tmp_path)

    assert [name.rsplit(".", 1)[1] for name in remote["classes"]] == [
        "OrionTrajectoryPipeline",
        "OrionQwen2_5ForTrajectory",
        "OrionQwen2_5ForTrajectory",
    ]
    expected = planned_by_model(model, processor, image, "Stop at the crossing.", features)
    torch.testing.assert_close(remote["waypoints"], expected, rtol=1e-5, atol=1e-6)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, *QUESTION]}], add_generation_prompt=True
    )
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)[:, inputs["input_ids"].shape[1] :]
    assert remote["answer"] == processor.batch_decode(generated, skip_special_tokens=True)[0]
    assert "custom_pipelines['trajectory-prediction']['impl']" in remote["stale_error"]
    assert "defines no class OrionPlanner" in remote["stale_error"]
