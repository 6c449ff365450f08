"""The vlmheads model card survives every way of publishing: `model.push_to_hub`, `trainer.push_to_hub`,
`--push_to_hub` (`save_model`), and `save_pretrained` + `upload_folder`; the Hub client calls are replaced."""

from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from orion_helpers import FAMILIES, driving_batch, small_model
from receipt_helpers import make_model
from receipt_helpers import make_processor as make_receipt_processor
from transformers import AutoModel, Trainer, TrainingArguments

from vlmheads.publishing import dataset_name
from vlmheads.training.cards import ModelCardTrainer
from vlmheads.training.orion import TrajectoryMetrics

BASE = "Qwen/Qwen2-VL-2B-Instruct"
METRICS = ("L2@1s", "L2@2s", "L2@3s", "ADE", "FDE")


@pytest.fixture
def hub(monkeypatch):
    """Replaces the Hub: `create_repo` answers, `upload_folder` keeps the uploaded README.md of each call."""
    uploads = []

    def create_repo(self, repo_id, **kwargs):
        # The Hub puts a bare name into the namespace of the token's user.
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id if '/' in repo_id else 'me/' + repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        files = {path.name for path in Path(folder_path).iterdir()}
        uploads.append({"repo_id": repo_id, "files": files, "card": (Path(folder_path) / "README.md").read_text()})
        return "committed"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return uploads


class DrivingRecords(torch.utils.data.Dataset):
    """Small driving samples with target waypoints, as the default collator stacks them."""

    def __init__(self, config, size: int, seed: int):
        batch = driving_batch(config, batch_size=size, seed=seed)
        batch["ego_waypoints"] = torch.randn(size, config.num_waypoints, config.waypoint_dim)
        self.samples = [{name: value[index] for name, value in batch.items()} for index in range(size)]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.samples[index]


def trained(tmp_path: Path, trainer_class=ModelCardTrainer, **arguments):
    """A small Orion model trained two steps and evaluated, with a Hub base model recorded."""
    model = small_model(FAMILIES["qwen2_vl"], base_model=BASE)
    args = TrainingArguments(
        output_dir=str(tmp_path / "orion-run"),
        max_steps=2,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=4,
        learning_rate=1e-3,
        seed=7,
        label_names=["ego_waypoints"],
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        **arguments,
    )
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=DrivingRecords(model.config, 4, seed=1),
        eval_dataset=DrivingRecords(model.config, 4, seed=2),
        compute_metrics=TrajectoryMetrics(),
    )
    trainer.train()
    trainer.evaluate()
    return trainer, model


def assert_vlmheads_card(text: str, model_name: str, datasets: list[str] | None = None) -> ModelCard:
    """The vlmheads card with the evaluation as model-index, the base model, the data and the hyper-parameters."""
    card = ModelCard(text)
    assert "fine-tuned version of" not in card.text
    assert "# OrionQwenForTrajectory" in card.text
    assert card.data.library_name == "transformers" and "vlmheads" in card.data.tags
    assert card.data.base_model == BASE
    assert f"Fine-tuned from [{BASE}](https://huggingface.co/{BASE})" in card.text
    assert "| learning_rate | 0.001 |" in card.text and "| seed | 7 |" in card.text
    assert "| train_batch_size | 2 |" in card.text and "| training_steps | 2 |" in card.text
    assert card.data.model_name == model_name
    results = {result.metric_type: result for result in card.data.eval_results}
    assert set(METRICS) <= set(results)
    assert all(isinstance(result.metric_value, float) for result in results.values())
    assert "model-index" in text and "| eval |" in card.text
    row = next(line for line in card.text.splitlines() if line.startswith("| eval |"))
    assert f"{results['ADE'].metric_value:.3f}" in row
    if datasets is not None:
        assert card.data.datasets == datasets
        assert {result.dataset_name for result in results.values()} == {datasets[-1]}
    return card


def test_trainer_push_to_hub_uploads_the_vlmheads_card(hub, tmp_path):
    trainer, _ = trained(tmp_path)

    trainer.push_to_hub(dataset_tags="team/driving-logs", dataset="team/driving-logs", tags=["bench2drive"])

    (upload,) = hub
    assert upload["repo_id"] == "me/orion-run" and {"config.json", "modeling_orion_qwen.py"} <= upload["files"]
    card = assert_vlmheads_card(upload["card"], "orion-run", datasets=["team/driving-logs"])
    assert {"bench2drive", "generated_from_trainer", "orion"} <= set(card.data.tags)
    assert "on team/driving-logs." in card.text


def test_the_push_to_hub_argument_uploads_the_vlmheads_card_when_the_model_is_saved(hub, tmp_path):
    trainer, _ = trained(tmp_path, push_to_hub=True, hub_model_id="team/orion-planner")

    trainer.save_model()

    (upload,) = hub
    assert upload["repo_id"] == "team/orion-planner"
    assert_vlmheads_card(upload["card"], "orion-planner")


def test_model_push_to_hub_after_training_carries_what_the_trainer_recorded(hub, tmp_path):
    _, model = trained(tmp_path)

    model.push_to_hub("team/orion-pushed", license="mit")

    (upload,) = hub
    card = assert_vlmheads_card(upload["card"], "orion-pushed")
    assert card.data.license == "mit"


def test_save_pretrained_then_upload_folder_carries_the_card(hub, tmp_path):
    _, model = trained(tmp_path)
    folder = tmp_path / "saved"
    model.save_pretrained(folder)

    HfApi().upload_folder(repo_id="team/orion-uploaded", folder_path=folder)

    (upload,) = hub
    assert_vlmheads_card(upload["card"], "OrionQwenForTrajectory")


def test_the_plain_trainer_would_replace_the_card(hub, tmp_path):
    trainer, _ = trained(tmp_path, trainer_class=Trainer)
    trainer.push_to_hub()
    assert "fine-tuned version of" in hub[0]["card"] and "# OrionQwenForTrajectory" not in hub[0]["card"]


def test_a_script_table_replaces_the_trainer_rows_and_plots_follow_the_card(hub, tmp_path):
    trainer, model = trained(tmp_path)
    output_dir = Path(trainer.args.output_dir)
    (output_dir / "report.png").write_bytes(b"\x89PNG\r\n")
    table = {"trained model": {"ADE": 0.5, "FDE": 1.0}, "constant velocity": {"ADE": 2.0, "FDE": 4.0}}
    model.write_model_card(
        output_dir, metrics=table, model_row="trained model", datasets=["synthetic"], images=["report.png"]
    )

    trainer.push_to_hub()
    model.push_to_hub("team/orion-table")

    for upload in hub:
        card = ModelCard(upload["card"])
        assert "| trained model | 0.500 | 1.000 |" in card.text
        assert "| constant velocity | 2.000 | 4.000 |" in card.text
        assert "| eval |" not in card.text
        assert {(result.metric_type, result.metric_value) for result in card.data.eval_results} == {
            ("ADE", 0.5),
            ("FDE", 1.0),
        }
        assert "![report.png](report.png)" in card.text and "report.png" in upload["files"]
        assert card.data.datasets is None and "on synthetic." in card.text


def test_bad_card_facts_are_named():
    model = small_model(FAMILIES["qwen2_vl"])
    with pytest.raises(ValueError, match=r"model_row='trained' is not a row of the card's metrics \['eval'\]"):
        model.record_model_card(metrics={"eval": {"ADE": 1.0}}, model_row="trained")
    with pytest.raises(ValueError, match=r"metrics\['eval'\]\['ADE'\] must be a number, got 'low'"):
        model.record_model_card(metrics={"eval": {"ADE": "low"}})


def test_the_orion_card_shows_both_pipelines(tmp_path):
    model = small_model(FAMILIES["qwen2_vl"], num_modes=6)
    text = model.write_model_card(tmp_path).read_text()
    assert 'pipeline("trajectory-prediction", model="<this repository>", trust_remote_code=True)' in text
    assert 'pipeline("image-text-to-text", model="<this repository>", trust_remote_code=True)' in text
    assert "command=command,  # navigation command in [0, 6)" in text
    assert "## Training" not in text


def test_the_receipt_card_carries_the_same_facts_after_save_pretrained_and_upload_folder(hub, tmp_path):
    model = make_model(make_receipt_processor())
    model.record_model_card(
        metrics={"fine-tuned": {"accuracy": 0.9, "macro_f1": 0.85}, "majority class": {"accuracy": 0.34}},
        model_row="fine-tuned",
        datasets=["team/receipt-photos"],
        hyperparameters={"learning_rate": 5e-5, "num_epochs": 3},
        base_model="meta-llama/Llama-3.2-11B-Vision",
    )
    model.save_pretrained(tmp_path)

    HfApi().upload_folder(repo_id="team/receipts", folder_path=tmp_path)

    card = ModelCard(hub[0]["card"])
    assert "# ReceiptVLClassifier" in card.text and "| fine-tuned | 0.900 | 0.850 |" in card.text
    assert card.data.base_model == "meta-llama/Llama-3.2-11B-Vision"
    assert card.data.datasets == ["team/receipt-photos"]
    assert {(result.task_type, result.metric_type, result.metric_value) for result in card.data.eval_results} == {
        ("image-classification", "accuracy", 0.9),
        ("image-classification", "macro_f1", 0.85),
    }
    assert "| learning_rate | 5e-05 |" in card.text and "| num_epochs | 3 |" in card.text


def test_a_reloaded_model_publishes_the_same_card_and_its_processor(hub, tmp_path, shared_processors):
    _, model = trained(tmp_path)
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    shared_processors(FAMILIES["qwen2_vl"]).save_pretrained(folder)
    (folder / "report.png").write_bytes(b"\x89PNG\r\n")
    local_data = tmp_path / "drive_logs"
    local_data.mkdir()
    (local_data / "train.parquet").write_bytes(b"")
    table = {"trained model": {"ADE": 0.5, "FDE": 1.0}, "constant velocity": {"ADE": 2.0, "FDE": 4.0}}
    datasets = [str(local_data / "train.parquet"), f"{local_data}/*.parquet", "team/driving-logs"]
    model.write_model_card(folder, metrics=table, model_row="trained model", datasets=datasets, images=["report.png"])

    AutoModel.from_pretrained(folder).push_to_hub("team/reloaded")

    (upload,) = hub
    card = ModelCard(upload["card"])
    assert {(result.metric_type, result.metric_value) for result in card.data.eval_results} == {
        ("ADE", 0.5),
        ("FDE", 1.0),
    }
    assert card.data.model_name == "reloaded" and card.data.base_model == BASE
    assert card.data.datasets == ["team/driving-logs"] and "on drive_logs, team/driving-logs." in card.text
    assert str(tmp_path) not in upload["card"]
    assert "| learning_rate | 0.001 |" in card.text and "| constant velocity | 2.000 | 4.000 |" in card.text
    assert {"processor_config.json", "tokenizer.json", "report.png", "model_card.json"} <= upload["files"]


def test_a_model_without_a_processor_folder_publishes_without_one(hub, tmp_path):
    _, model = trained(tmp_path)
    model.push_to_hub("team/bare")
    assert "processor_config.json" not in hub[0]["files"]


@pytest.mark.parametrize(
    ("given", "named"),
    [
        ("team/driving-logs", "team/driving-logs"),
        ("/data/drive/train-*.parquet", "drive"),
        ("/data/drive/", "drive"),
        ("data/drive/val.parquet", "drive"),
        ("train.parquet", "train.parquet"),
        ("synthetic driving set", "synthetic driving set"),
    ],
)
def test_local_paths_are_named_by_their_folder(given, named):
    assert dataset_name(given) == named
