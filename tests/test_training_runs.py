"""Training that loses nothing: a saved model is not overwritten unasked, `--resume_from_checkpoint True` resumes
from the last checkpoint, and `train_loss` after a resume is the mean over the whole run."""

import importlib
import shutil
import sys
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainingArguments

from vlmheads.training.runs import (
    RUN_LOSS_FILE,
    ScriptTrainingArguments,
    WholeRunLossMixin,
    check_output_dir,
    resolve_checkpoint,
)


class Regression(torch.nn.Module):
    """y = w x + b with an MSE loss: a model small enough to train many steps in a test."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": torch.nn.functional.mse_loss(self.linear(x).squeeze(-1), y)}


class Samples(torch.utils.data.Dataset):
    def __init__(self, size: int = 48):
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(size, 4, generator=generator)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(size, generator=generator)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[index], "y": self.y[index]}


class RunTrainer(WholeRunLossMixin, Trainer):
    pass


def train(output_dir: Path, resume=None, trainer_class=RunTrainer):
    torch.manual_seed(0)
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=9,
        per_device_train_batch_size=4,
        learning_rate=0.05,
        logging_steps=2,  # the checkpoint at step 5 falls between logging steps
        save_strategy="steps",
        save_steps=5,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = trainer_class(model=Regression(), args=args, train_dataset=Samples())
    return trainer.train(resume_from_checkpoint=resume)


def test_train_loss_after_a_resume_covers_the_whole_run(tmp_path):
    full = train(tmp_path / "full")
    assert (tmp_path / "full" / "checkpoint-5" / RUN_LOSS_FILE).is_file()

    resumed = train(tmp_path / "full", resume=str(tmp_path / "full" / "checkpoint-5"))
    plain = train(tmp_path / "full", resume=str(tmp_path / "full" / "checkpoint-5"), trainer_class=Trainer)

    assert resumed.global_step == full.global_step == 9
    assert resumed.training_loss == pytest.approx(full.training_loss, rel=1e-5)
    assert resumed.metrics["train_loss"] == resumed.training_loss
    # What transformers alone reports: the mean over the resumed steps only.
    assert abs(plain.training_loss - full.training_loss) > 0.1 * full.training_loss


def test_resume_from_checkpoint_true_resumes_from_the_last_checkpoint(tmp_path):
    full = train(tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "checkpoint-9")  # as if the run had stopped after step 5
    assert resolve_checkpoint("True", tmp_path / "run") == str(tmp_path / "run" / "checkpoint-5")
    assert resolve_checkpoint("true", tmp_path / "run") == str(tmp_path / "run" / "checkpoint-5")

    resumed = train(tmp_path / "run", resume=True)

    assert resumed.global_step == 9 and resumed.training_loss == pytest.approx(full.training_loss, rel=1e-5)
    assert resolve_checkpoint("False", tmp_path / "run") is None
    assert resolve_checkpoint(str(tmp_path / "x"), tmp_path / "run") == str(tmp_path / "x")


def test_resume_true_without_a_checkpoint_names_the_folder(tmp_path):
    with pytest.raises(ValueError, match=rf"--resume_from_checkpoint True .* and {tmp_path} holds none"):
        ScriptTrainingArguments(output_dir=str(tmp_path), resume_from_checkpoint="True")


def test_a_folder_with_a_model_is_refused_unless_overwritten_or_resumed(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(ValueError, match=r"already holds a model \(model.safetensors\)\. Pass --overwrite_output_dir"):
        ScriptTrainingArguments(output_dir=str(tmp_path))
    assert ScriptTrainingArguments(output_dir=str(tmp_path), overwrite_output_dir=True).overwrite_output_dir
    check_output_dir(tmp_path, False, str(tmp_path / "checkpoint-4"))
    check_output_dir(tmp_path / "empty", False, None)


@pytest.mark.parametrize("script", ["train_orion", "train_receipts", "train_vla"])
def test_each_script_refuses_to_overwrite_a_saved_model(script, tmp_path, monkeypatch):
    """The script's own command line, parsed in this process (a subprocess would cost a fresh import of vlmheads):
    the refusal comes while parsing its arguments, before anything is loaded or written."""
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    monkeypatch.setattr(sys, "argv", [f"{script}.py", "--output_dir", str(tmp_path)])
    main = importlib.import_module(f"vlmheads.examples.{script}").main
    with pytest.raises(
        ValueError, match=r"already holds a model \(model\.safetensors\)\. Pass --overwrite_output_dir"
    ):
        main()
    assert (tmp_path / "model.safetensors").read_bytes() == b"weights"
