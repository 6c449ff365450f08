"""`--report_to tensorboard` from both training scripts: the Trainer's logs, the comparison table and the report plot
land in `<output_dir>/runs/`, and the metrics files come from `trainer.save_metrics`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ENV = {name: value for name, value in os.environ.items() if name != "TENSORBOARD_LOGGING_DIR"} | {
    "OMP_NUM_THREADS": "1"
}


def train(script: str, output: Path, *arguments: str) -> None:
    command = [sys.executable, str(EXAMPLES / script), "--output_dir", str(output), "--report_to", "tensorboard"]
    run = subprocess.run([*command, *arguments], capture_output=True, text=True, env=ENV, cwd=output.parent)
    assert run.returncode == 0, run.stderr[-4000:]


def events(output: Path) -> EventAccumulator:
    """Every TensorBoard event the run wrote, merged."""
    folders = {path.parent for path in (output / "runs").glob("**/events.out.tfevents.*")}
    assert folders, f"no TensorBoard event files under {output / 'runs'}"
    merged = {"scalars": {}, "images": set(), "tensors": set()}
    for folder in folders:
        accumulator = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
        accumulator.Reload()
        tags = accumulator.Tags()
        merged["scalars"].update({tag: accumulator.Scalars(tag)[-1].value for tag in tags["scalars"]})
        merged["images"] |= set(tags["images"])
        merged["tensors"] |= set(tags["tensors"])  # text summaries
    return merged


@pytest.mark.slow
def test_the_receipt_script_reports_to_tensorboard(tmp_path):
    output = tmp_path / "receipts"
    train(
        "train_receipts.py",
        output,
        *("--num_synthetic", "30", "--max_steps", "2", "--logging_steps", "1", "--classifier_hidden_dims", "32"),
        *("--classifier_dropout_rates", "0.1", "--per_device_train_batch_size", "8", "--disable_tqdm", "true"),
    )
    logged = events(output)
    assert "train/loss" in logged["scalars"]
    eval_results = json.loads((output / "eval_results.json").read_text())
    accuracy = eval_results["fine-tuned"]["accuracy"]
    assert logged["scalars"]["eval/report/fine_tuned/accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert "eval/report/majority_class/macro_f1" in logged["scalars"]
    assert "report/confusion_matrix" in logged["images"] and "report/table/text_summary" in logged["tensors"]
    assert "train_loss" in json.loads((output / "train_results.json").read_text())
    assert {"train_loss", "fine-tuned"} <= set(json.loads((output / "all_results.json").read_text()))
    assert not (tmp_path / "runs").exists()  # nothing beside the output folder


@pytest.mark.slow
def test_the_orion_script_reports_to_tensorboard(tmp_path):
    output = tmp_path / "orion"
    train(
        "train_orion.py",
        output,
        *("--num_train_samples", "64", "--num_eval_samples", "16", "--num_train_epochs", "1"),
        *("--per_device_train_batch_size", "16", "--logging_steps", "1", "--disable_tqdm", "true"),
    )
    logged = events(output)
    assert "train/loss" in logged["scalars"] and "eval/untrained_ADE" in logged["scalars"]
    eval_results = json.loads((output / "eval_results.json").read_text())
    assert logged["scalars"]["eval/report/trained_model/ADE"] == pytest.approx(
        eval_results["eval_trained_ADE"], abs=1e-5
    )
    assert "eval/report/constant_velocity_can_bus/FDE" in logged["scalars"]
    assert eval_results["eval_constant_velocity_FDE"] == pytest.approx(
        logged["scalars"]["eval/report/constant_velocity_can_bus/FDE"], abs=1e-5
    )
    assert "report/training_report" in logged["images"] and "report/table/text_summary" in logged["tensors"]
    assert "train_loss" in json.loads((output / "train_results.json").read_text())
    assert not (tmp_path / "runs").exists()
