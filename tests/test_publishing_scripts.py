"""Every example training script publishes with `--push_to_hub` (the Hub client stubbed by `stubbed_hub.py`), and the
uploaded card keeps its figures: `model-index`, the training section, the data set names, the processor files."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
PUSH = ["--push_to_hub", "true", "--hub_model_id", "team/pushed", "--disable_tqdm", "true", "--report_to", "none"]


def push(module: str, arguments: list[str], tmp_path: Path) -> list[Path]:
    """Runs `module` with `--push_to_hub`; returns the uploaded folders, in upload order."""
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    result = subprocess.run(
        [sys.executable, str(TESTS / "stubbed_hub.py"), module, *arguments, *PUSH],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "STUBBED_HUB_UPLOADS": str(uploads)},
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    folders = sorted(uploads.iterdir(), key=lambda folder: int(folder.name))
    assert folders and all((folder / "repo_id.txt").read_text() == "team/pushed" for folder in folders)
    return folders


def assert_published(folder: Path, model_row: str, metric: str, dataset: str, processor_file: str) -> ModelCard:
    card = ModelCard((folder / "README.md").read_text())
    assert "fine-tuned version of" not in card.text
    assert card.data.model_name == "pushed"
    results = {result.metric_type: result for result in card.data.eval_results}
    assert metric in results and {result.dataset_name for result in results.values()} == {dataset}
    row = next(line for line in card.text.splitlines() if line.startswith(f"| {model_row} |"))
    cells = [float(cell) for cell in row.strip("| ").split(" | ")[1:] if cell]
    assert any(abs(cell - results[metric].metric_value) < 1e-3 for cell in cells), (row, results[metric])
    assert "## Training" in card.text and "| learning_rate |" in card.text
    assert {"config.json", "model.safetensors", "model_card.json", processor_file} <= {
        p.name for p in folder.iterdir()
    }
    assert str(ROOT) not in card.content and "/tmp" not in card.content
    return card


RELOAD_AND_PUSH = """
import sys
import stubbed_hub  # noqa: F401  (the Hub client replaced)
from vlmheads import OrionQwenForTrajectory
OrionQwenForTrajectory.from_pretrained(sys.argv[1]).push_to_hub("team/pushed")
"""


@pytest.mark.slow
def test_train_orion_pushes_its_table_and_processor_and_so_does_the_reloaded_model(tmp_path):
    data = ["--num_train_samples", "32", "--num_eval_samples", "8", "--max_steps", "2", "--compare_flow_planner", "0"]
    folders = push("vlmheads.examples.train_orion", [*data, "--output_dir", str(tmp_path / "run")], tmp_path)
    card = assert_published(folders[-1], "trained model", "ADE", "synthetic driving set", "processor_config.json")
    assert "| constant velocity (CAN bus) |" in card.text and "training_report.png" in card.text

    # The saved folder, reloaded in a new process, publishes the same card (model-index included) and its processor.
    reloaded = subprocess.run(
        [sys.executable, "-c", RELOAD_AND_PUSH, str(tmp_path / "run")],
        capture_output=True,
        text=True,
        cwd=TESTS,
        env={**os.environ, "STUBBED_HUB_UPLOADS": str(tmp_path / "uploads")},
        timeout=600,
    )
    assert reloaded.returncode == 0, reloaded.stderr[-4000:]
    again = sorted((tmp_path / "uploads").iterdir(), key=lambda folder: int(folder.name))[-1]
    assert again.name == str(len(folders))
    reloaded_card = assert_published(again, "trained model", "ADE", "synthetic driving set", "processor_config.json")
    assert reloaded_card.data.eval_results == card.data.eval_results


@pytest.mark.slow
def test_train_receipts_pushes_its_table_and_processor(tmp_path):
    data = ["--num_synthetic", "24", "--max_steps", "2", "--tile_size", "16"]
    folders = push("vlmheads.examples.train_receipts", [*data, "--output_dir", str(tmp_path / "run")], tmp_path)
    card = assert_published(folders[-1], "fine-tuned", "accuracy", "synthetic receipts", "processor_config.json")
    assert "| majority class |" in card.text and "confusion_matrix.png" in card.text


@pytest.mark.slow
def test_train_vla_pushes_its_table_pipeline_and_processor(tmp_path):
    data = [
        "--num_train_samples",
        "16",
        "--num_eval_samples",
        "4",
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "4",
    ]
    folders = push("vlmheads.examples.train_vla", [*data, "--output_dir", str(tmp_path / "run")], tmp_path)
    card = assert_published(
        folders[-1], "trained model", "action_l1", "synthetic manipulation set", "processor_config.json"
    )
    assert 'pipeline("action-prediction", model="<this repository>", trust_remote_code=True)' in card.text
    assert "| mean-action baseline |" in card.text
