"""`--report_to tensorboard` and `--report_to trackio` from both training scripts: the Trainer's logs, the comparison
table and the report plot land in `<output_dir>/runs/` or in one Trackio run, and the metrics files come from
`trainer.save_metrics`."""

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ENV = {name: value for name, value in os.environ.items() if name != "TENSORBOARD_LOGGING_DIR"} | {
    "OMP_NUM_THREADS": "1"
}
RECEIPT_ARGUMENTS = (
    *("--num_synthetic", "30", "--max_steps", "2", "--logging_steps", "1", "--classifier_hidden_dims", "32"),
    *("--classifier_dropout_rates", "0.1", "--per_device_train_batch_size", "8", "--disable_tqdm", "true"),
)
ORION_ARGUMENTS = (
    *("--num_train_samples", "64", "--num_eval_samples", "16", "--num_train_epochs", "1"),
    *("--per_device_train_batch_size", "16", "--logging_steps", "1", "--disable_tqdm", "true"),
)


def train(script: str, output: Path, tracker: str, *arguments: str) -> None:
    """Runs `script` reporting to `tracker`; Trackio keeps its database in `<output's parent>/trackio/`."""
    command = [sys.executable, str(EXAMPLES / script), "--output_dir", str(output), "--report_to", tracker]
    env = ENV | {"TRACKIO_DIR": str(output.parent / "trackio")}
    run = subprocess.run([*command, *arguments], capture_output=True, text=True, env=env, cwd=output.parent)
    assert run.returncode == 0, run.stderr[-4000:]


def tensorboard_events(output: Path) -> dict[str, dict[str, float] | set[str]]:
    """Every TensorBoard event the run wrote, merged: the last value of each scalar, the image and text tags."""
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


def trackio_run(output: Path) -> dict[str, object]:
    """Every value the one Trackio run logged (the last one per key), from Trackio's local database; the run is
    named after the output folder."""
    database = output.parent / "trackio" / "huggingface.db"  # the Trainer's default `--project`
    assert database.exists(), f"Trackio wrote no database under {database.parent}"
    runs: dict[str, dict[str, object]] = {}
    with sqlite3.connect(database) as connection:
        for run_name, metrics in connection.execute("SELECT run_name, metrics FROM metrics ORDER BY id"):
            runs.setdefault(run_name, {}).update(json.loads(metrics))
    assert len(runs) == 1 and next(iter(runs)).startswith(f"{output.name}-"), list(runs)
    return next(iter(runs.values()))


def assert_reported(output: Path, tracker: str, scalars: dict[str, float], image: str) -> None:
    """The tracker got the Trainer's loss, the report table's `scalars` and the report plot `image`."""
    if tracker == "tensorboard":
        logged = tensorboard_events(output)
        values, images = logged["scalars"], logged["images"]
        assert "report/table/text_summary" in logged["tensors"]
        assert not (output.parent / "runs").exists()  # nothing beside the output folder
    else:
        values = trackio_run(output)
        images = {key for key, value in values.items() if isinstance(value, dict) and value["_type"].endswith("image")}
    assert "train/loss" in values
    for key, value in scalars.items():
        assert values[key] == pytest.approx(value, abs=1e-5), key
    assert f"report/{image}" in images


@pytest.mark.slow
@pytest.mark.floors  # tensorboard>=2.18, trackio>=0.43 through the Trainer's callbacks
@pytest.mark.parametrize("tracker", ["tensorboard", "trackio"])
def test_the_receipt_script_reports_to(tracker, tmp_path):
    output = tmp_path / "receipts"
    train("train_receipts.py", output, tracker, *RECEIPT_ARGUMENTS)
    eval_results = json.loads((output / "eval_results.json").read_text())
    assert_reported(
        output,
        tracker,
        {
            "eval/report/fine_tuned/accuracy": eval_results["fine-tuned"]["accuracy"],
            "eval/report/majority_class/macro_f1": eval_results["majority class"]["macro_f1"],
        },
        "confusion_matrix",
    )
    assert "train_loss" in json.loads((output / "train_results.json").read_text())
    assert {"train_loss", "fine-tuned"} <= set(json.loads((output / "all_results.json").read_text()))


@pytest.mark.slow
@pytest.mark.parametrize("tracker", ["tensorboard", "trackio"])
def test_the_orion_script_reports_to(tracker, tmp_path):
    output = tmp_path / "orion"
    train("train_orion.py", output, tracker, *ORION_ARGUMENTS)
    eval_results = json.loads((output / "eval_results.json").read_text())
    assert_reported(
        output,
        tracker,
        {
            "eval/untrained_ADE": eval_results["eval_untrained_ADE"],
            "eval/report/trained_model/ADE": eval_results["eval_trained_ADE"],
            "eval/report/constant_velocity_can_bus/FDE": eval_results["eval_constant_velocity_FDE"],
        },
        "training_report",
    )
    assert "train_loss" in json.loads((output / "train_results.json").read_text())
