import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow
@pytest.mark.parametrize(("family", "action_head"), [("smolvlm", "flow"), ("paligemma", "tokens")])
def test_train_vla_trains_any_family_with_any_head_and_reloads_the_saved_model(family, action_head, tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "train_vla.py"),
            "--family",
            family,
            "--action_head",
            action_head,
            "--chunk_size",
            "2",
            "--num_train_samples",
            "32",
            "--num_eval_samples",
            "8",
            "--max_steps",
            "3",
            "--per_device_train_batch_size",
            "4",
            "--output_dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"{family} x {action_head}: held-out errors (predict_actions)" in run.stdout
    for row in ("mean-action baseline", "trained model", "image blanked", "instruction swapped"):
        assert f"| {row} | " in run.stdout
    assert "reloaded with AutoModel: same actions" in run.stdout
    metrics = json.loads((tmp_path / "eval_results.json").read_text())
    assert {"eval_action_l1", "trained_model_action_l1", "mean_action_baseline_action_l1"} <= set(metrics)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["action_head"] == action_head and config["chunk_size"] == 2
    assert (tmp_path / "modeling_vla.py").exists() and (tmp_path / "README.md").exists()
    # Progress bars are on: the Trainer's tqdm bar reached the last step.
    assert "3/3" in run.stderr


def test_train_vla_rejects_an_unknown_family():
    run = subprocess.run(
        [sys.executable, str(EXAMPLES / "train_vla.py"), "--family", "llava-17"], capture_output=True, text=True
    )
    assert run.returncode != 0 and "Unknown VLM 'llava-17'; known names:" in run.stderr


@pytest.mark.slow
def test_train_vla_trains_the_tiny_pi0_and_reloads_it_with_its_statistics(tmp_path):
    run = subprocess.run(
        [sys.executable, str(EXAMPLES / "train_vla.py"), "--family", "pi0", "--with_state", "true"]
        + ["--chunk_size", "2", "--flow_num_steps", "2", "--num_train_samples", "16", "--num_eval_samples", "4"]
        + ["--max_steps", "3", "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "pi0: held-out errors (sample_actions)" in run.stdout
    for row in ("mean-action baseline", "trained model", "image blanked", "instruction swapped"):
        assert f"| {row} | " in run.stdout
    assert "reloaded with create_vlm: same actions" in run.stdout
    assert "trained_model_action_l1" in json.loads((tmp_path / "eval_results.json").read_text())
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "pi0" and config["chunk_size"] == 2 and config["num_inference_steps"] == 2
    processor = json.loads((tmp_path / "processor_config.json").read_text())
    assert processor["chunk_size"] == 2 and len(processor["state_mean"]) == 2 and len(processor["actions_std"]) == 2
    assert "3/3" in run.stderr


def test_pi0_needs_a_state_in_the_training_data():
    from vlmheads.data.manipulation import synthetic_manipulation_dataset
    from vlmheads.examples.train_vla import ModelArguments, build_model

    stateless = synthetic_manipulation_dataset(4, chunk_size=4, image_size=16)
    with pytest.raises(ValueError, match="pi0 reads the robot state, and the training data has none"):
        build_model(ModelArguments(family="pi0", chunk_size=4), stateless, seed=0)
