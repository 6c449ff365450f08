import json
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard
from orion_helpers import camera_image, driving_features, driving_prompt, make_processor, real_vocab_model
from remote_code_checks import assert_flat_self_contained_code, run_without_vlmheads


def saved_model(family, folder: Path, **overrides):
    processor = make_processor(family)
    model = real_vocab_model(family, processor, **overrides)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor


def test_the_saved_folder_carries_flat_self_contained_code(family, tmp_path):
    saved_model(family, tmp_path)
    code = {"configuration_orion_qwen.py", "modeling_orion_qwen.py", "processing_orion_qwen.py", "heads.py"}
    code |= {"configuration_driving.py", "modeling_driving.py", "modeling_base.py", "constants.py", "remote_code.py"}
    code |= {"pipeline_orion_trajectory.py", "processing_driving_placeholders.py", "pipeline_inputs.py"}
    code |= {"trajectory_request.py"}
    assert_flat_self_contained_code(tmp_path, code | {"publishing.py", "image_inputs.py"})

    config = json.loads((tmp_path / "config.json").read_text())
    model_class = family.model.__name__
    assert config["auto_map"] == {
        "AutoConfig": f"configuration_orion_qwen.{family.config.__name__}",
        "AutoModel": f"modeling_orion_qwen.{model_class}",
        "AutoModelForImageTextToText": f"modeling_orion_qwen.{model_class}",
    }
    processor_config = json.loads((tmp_path / "processor_config.json").read_text())
    assert processor_config["auto_map"] == {"AutoProcessor": f"processing_orion_qwen.{family.processor.__name__}"}


@pytest.mark.slow
def test_a_fresh_interpreter_without_vlmheads_loads_the_folder_and_matches(family, tmp_path):
    model, processor = saved_model(family, tmp_path / "model", num_modes=1)
    image = camera_image(3)
    image.save(tmp_path / "camera.png")
    request = {
        "text": [driving_prompt(processor)],
        "image_paths": [str(tmp_path / "camera.png")],
        "features": driving_features(1, seed=4),
    }
    remote = run_without_vlmheads("isolated_load.py", tmp_path / "model", request, tmp_path)
    assert [name.rsplit(".", 1)[1] for name in remote["classes"]] == [
        family.config.__name__,
        family.model.__name__,
        family.processor.__name__,
    ]
    inputs = processor(text=request["text"], images=[image], **request["features"], return_tensors="pt")
    with torch.no_grad():
        local = model(**inputs)
    assert torch.equal(remote["input_ids"], inputs["input_ids"])
    torch.testing.assert_close(remote["trajectory"], local.trajectory)
    torch.testing.assert_close(remote["logits"], local.logits)


def test_push_to_hub_uploads_the_code_and_the_rendered_card(family, tmp_path, monkeypatch):
    uploads = {}

    def create_repo(self, repo_id, **kwargs):
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        uploads.update(repo_id=repo_id, files={p.name: p.read_bytes() for p in Path(folder_path).iterdir()}, **kwargs)
        return "committed"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    processor = make_processor(family)
    model = real_vocab_model(family, processor, base_model="Qwen/Qwen2-VL-7B-Instruct")

    assert model.push_to_hub("team/orion-test", tags=["bench2drive"], license="mit") == "committed"

    assert uploads["repo_id"] == "team/orion-test"
    assert {"config.json", "model.safetensors", "modeling_orion_qwen.py", "heads.py"} <= set(uploads["files"])
    card = ModelCard(uploads["files"]["README.md"].decode())
    assert card.data.library_name == "transformers"
    assert card.data.base_model == "Qwen/Qwen2-VL-7B-Instruct"
    assert card.data.pipeline_tag == "robotics"
    assert card.data.license == "mit"
    assert {"vlmheads", "orion", "bench2drive", family.name} <= set(card.data.tags)
    assert f"# {family.model.__name__}" in card.text and "(B, 4, 256)" in card.text


def test_the_card_reports_metrics_and_embeds_plots(family, tmp_path):
    model = real_vocab_model(family, make_processor(family), num_modes=6)
    metrics = {"trained": {"L2@1s": 0.5, "ADE": 0.75}, "baseline": {"L2@1s": 1.25, "ADE": 2.0}}
    path = model.write_model_card(tmp_path, metrics=metrics, images=["trajectories.png"])
    text = path.read_text()
    assert "| | L2@1s | ADE |" in text
    assert "| trained | 0.500 | 0.750 |" in text and "| baseline | 1.250 | 2.000 |" in text
    assert "![trajectories.png](trajectories.png)" in text
    assert "`command` | (B,), in [0, 6)" in text


def test_the_isolation_launcher_makes_vlmheads_unimportable(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import transformers\nimport vlmheads\n")
    launcher = Path(__file__).with_name("without_vlmheads.py")
    run = subprocess.run([sys.executable, str(launcher), str(probe)], capture_output=True, text=True)
    assert run.returncode != 0 and "No module named 'vlmheads'" in run.stderr
