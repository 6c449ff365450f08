"""Experiment tracking for the training scripts: what `--report_to tensorboard` / `--report_to trackio` receive
beyond the Trainer's own logs (the comparison table and the report plots).

Install the trackers with `pip install "vlmheads[tracking]"`.
"""

import os
import re
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import Image
from transformers import Trainer, TrainingArguments
from transformers.integrations import TensorBoardCallback, TrackioCallback


def prepare_tracking(args: TrainingArguments) -> None:
    """Call before building the Trainer.

    Sends TensorBoard events to `<output_dir>/runs/` unless `TENSORBOARD_LOGGING_DIR` says otherwise, also for an
    evaluation before training (the Trainer's callback would otherwise write it to `./runs/`). Names the run
    `<output_dir name>-<date>-<time>` unless `--run_name` is given: Trackio's callback ends its run when training
    ends and resumes it by name for the logs that follow (the final evaluation, the report), so an unnamed run would
    be split in two.
    """
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(Path(args.output_dir) / "runs"))
    if args.run_name is None:
        args.run_name = f"{Path(args.output_dir).resolve().name}-{datetime.now():%Y%m%d-%H%M%S}"


def _tag(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z]+", "_", name).strip("_").lower()


def log_report(trainer: Trainer, table: dict[str, dict[str, float]], images: Sequence[str | Path] = ()) -> None:
    """Logs a comparison `table` (row name → metric → value) and report `images` (PNG files) to the trackers of
    `--report_to`.

    Every tracker gets the table as scalars `eval/report/<row>/<metric>` through `trainer.log`; TensorBoard also
    gets it as a Markdown text and the images as images, Trackio gets the images as `trackio.Image`s.
    """
    trainer.log(
        {
            f"eval_report/{_tag(row)}/{metric}": float(value)
            for row, metrics in table.items()
            for metric, value in metrics.items()
        }
    )
    metrics = list(next(iter(table.values())))
    markdown = "\n".join(
        [
            "| | " + " | ".join(metrics) + " |",
            "|---|" + "---|" * len(metrics),
            *(
                f"| {row} | " + " | ".join(f"{values[metric]:.4f}" for metric in metrics) + " |"
                for row, values in table.items()
            ),
        ]
    )
    step = trainer.state.global_step
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.tb_writer is not None:
            callback.tb_writer.add_text("report/table", markdown, step)
            for path in images:
                pixels = np.asarray(Image.open(path).convert("RGB"))
                callback.tb_writer.add_image(f"report/{Path(path).stem}", pixels, step, dataformats="HWC")
            callback.tb_writer.flush()
        elif isinstance(callback, TrackioCallback):
            import trackio

            if images:
                trackio.log({f"report/{Path(path).stem}": trackio.Image(str(path)) for path in images})
            # Ends the run the table resumed, as training's end does.
            callback.on_train_end(trainer.args, trainer.state, trainer.control)
