"""Training runs that lose nothing: no saved model is overwritten unasked, `--resume_from_checkpoint True` resumes
from the last checkpoint, and the `train_loss` of a resumed run covers the whole run.

transformers 5 dropped `--overwrite_output_dir` from `TrainingArguments`; `ScriptTrainingArguments` declares it
again and refuses an `--output_dir` that already holds a model unless it is given (or the run resumes). The Trainer
keeps no running loss in its checkpoints, so after a resume it reports the mean over the resumed steps only;
`WholeRunLossMixin` writes the running sum beside each checkpoint and reports the mean over every step.
"""

import json
import logging
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput, get_last_checkpoint
from transformers.utils import (
    ADAPTER_SAFE_WEIGHTS_NAME,
    ADAPTER_WEIGHTS_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)

logger = logging.getLogger(__name__)

# Files that mean "a model is saved here".
MODEL_FILES = (
    SAFE_WEIGHTS_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    ADAPTER_SAFE_WEIGHTS_NAME,
    ADAPTER_WEIGHTS_NAME,
)
# Written into each checkpoint folder: the sum of the per-step training losses up to its step.
RUN_LOSS_FILE = "run_loss.json"


def resolve_checkpoint(resume_from_checkpoint: str | bool | None, output_dir: str | Path) -> str | None:
    """`--resume_from_checkpoint` as a folder: "True" (any case) is the last `checkpoint-*` of `output_dir`, "False"
    or None is no resume. Raises a `ValueError` naming the folder when "True" finds no checkpoint in it."""
    if resume_from_checkpoint is None or str(resume_from_checkpoint).lower() == "false":
        return None
    if str(resume_from_checkpoint).lower() != "true":
        return str(resume_from_checkpoint)
    last = get_last_checkpoint(str(output_dir)) if Path(output_dir).is_dir() else None
    if last is None:
        raise ValueError(
            f"--resume_from_checkpoint True resumes from the last {PREFIX_CHECKPOINT_DIR}-* folder of --output_dir, "
            f"and {output_dir} holds none; give the checkpoint folder itself, or train with --save_strategy steps."
        )
    return last


def check_output_dir(output_dir: str | Path, overwrite_output_dir: bool, resume_from_checkpoint: str | None) -> None:
    """Raises a `ValueError` when `output_dir` holds a saved model and the run neither overwrites nor resumes it."""
    folder = Path(output_dir)
    found = [name for name in MODEL_FILES if (folder / name).is_file()]
    if found and not overwrite_output_dir and resume_from_checkpoint is None:
        raise ValueError(
            f"--output_dir {folder} already holds a model ({', '.join(found)}). Pass --overwrite_output_dir to "
            "replace it, --resume_from_checkpoint to continue its training, or choose another folder."
        )


def trainer_default(name: str, default: Any = MISSING, *, default_factory: Callable[[], Any] | Any = MISSING) -> Any:
    """A dataclass field that redeclares the `TrainingArguments` field `name` with a script's own default. It keeps
    the parent field's metadata (its `--help` text, and whatever else `HfArgumentParser` reads there) and, where the
    default differs, adds transformers' own to the help; `HfArgumentParser`'s help shows the new one after it as
    "(default: ...)". Raises a `ValueError` when `TrainingArguments` has no field `name`."""
    parent = TrainingArguments.__dataclass_fields__.get(name)
    if parent is None:
        raise ValueError(f"trainer_default: {name!r} is not a field of TrainingArguments.")
    metadata = dict(parent.metadata)
    inherited = parent.default if parent.default_factory is MISSING else parent.default_factory()
    if (default if default_factory is MISSING else default_factory()) != inherited:
        metadata["help"] = f"{metadata.get('help', '')} (transformers' default: {inherited})".lstrip()
    return field(default=default, default_factory=default_factory, metadata=metadata)


@dataclass
class ScriptTrainingArguments(TrainingArguments):
    """`TrainingArguments` of the vlmheads scripts: `--overwrite_output_dir` again, `--resume_from_checkpoint True`
    resolved to the last checkpoint, and CPU runs (DDP over gloo included) without flags."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Replace a model already saved in --output_dir (refused otherwise). transformers 5 dropped this "
            "flag; the vlmheads scripts declare it."
        },
    )

    def __post_init__(self):
        # Without CUDA, the Trainer runs DDP over gloo only with use_cpu; otherwise each torchrun process runs alone.
        self.use_cpu = self.use_cpu or not torch.cuda.is_available()
        super().__post_init__()
        self.resume_from_checkpoint = resolve_checkpoint(self.resume_from_checkpoint, self.output_dir)
        check_output_dir(self.output_dir, self.overwrite_output_dir, self.resume_from_checkpoint)


class WholeRunLossMixin:
    """A Trainer whose `train_loss` after `train(resume_from_checkpoint=...)` is the mean over every step of the run.

    Each checkpoint gets `run_loss.json` with the sum of the per-step losses up to its step; a resumed run adds
    that sum to its own. Under DDP the steps since the last logging step count with the main process's loss (the
    Trainer averages over processes only when it logs). A checkpoint without the file (saved by another Trainer)
    resumes as in transformers, with a warning that `train_loss` covers the resumed steps only.
    """

    _loss_before_resume: float = 0.0
    _steps_before_resume: int = 0

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> TrainOutput:
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir) or True  # True: the Trainer's error
        self._loss_before_resume, self._steps_before_resume = 0.0, 0
        if isinstance(resume_from_checkpoint, str):
            record = Path(resume_from_checkpoint) / RUN_LOSS_FILE
            if record.is_file():
                saved = json.loads(record.read_text())
                self._loss_before_resume, self._steps_before_resume = saved["loss_sum"], saved["global_step"]
            else:
                logger.warning(
                    f"{resume_from_checkpoint} has no {RUN_LOSS_FILE}: train_loss covers the resumed steps."
                )
        output = super().train(resume_from_checkpoint, *args, **kwargs)
        return TrainOutput(output.global_step, output.metrics["train_loss"], output.metrics)

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        # The one piece the Trainer lacks: its checkpoints keep no running loss.
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            loss_sum = self._loss_before_resume + self._total_loss_scalar + self._tr_loss.item()
            record = {"global_step": self.state.global_step, "loss_sum": loss_sum}
            (folder / RUN_LOSS_FILE).write_text(json.dumps(record))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "train_loss" in logs and self._steps_before_resume:
            # Changed in place: the dict is also the metrics that `train` returns.
            logs["train_loss"] = (self._loss_before_resume + self._total_loss_scalar) / max(self.state.global_step, 1)
        super().log(logs, start_time)
