"""A Trainer that publishes the vlmheads model card, with the evaluation figures, data sets and hyper-parameters.

`Trainer.push_to_hub` (which `--push_to_hub` calls) saves the model, which writes the vlmheads card, then
overwrites README.md through `Trainer.create_model_card` with the generic "fine-tuned version of" card. That one
method is what `ModelCardTrainer` overrides: the Trainer keeps its own repository, upload and checkpoint logic.
"""

from typing import Any

from transformers import Trainer
from transformers.modelcard import TrainingSummary, extract_hyperparameters_from_trainer

from ..publishing import ModelCardMixin
from .runs import WholeRunLossMixin

# What `Trainer.evaluate` reports besides the metrics themselves.
EVALUATION_SPEED = ("runtime", "samples_per_second", "steps_per_second")


class ModelCardTrainer(WholeRunLossMixin, Trainer):
    """`Trainer` whose `push_to_hub()` / `--push_to_hub` upload the vlmheads model card instead of the generic one,
    and whose `train_loss` after a resume covers the whole run (`WholeRunLossMixin`).

    It records on the model what the card reports: the training hyper-parameters (at construction), one metrics
    row per `evaluate(metric_key_prefix=...)` (the row "eval" is the model's own score, published as `model-index`),
    and the data sets named to `push_to_hub(dataset=..., dataset_tags=...)` or inferred from the evaluation set as
    the Trainer does. `model.save_pretrained`, `model.push_to_hub` and `trainer.save_model` then write the same
    card. Scripts replace the rows with their own table through
    `model.write_model_card(..., metrics=..., model_row=...)`. Models without a vlmheads card get the Trainer's own.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        model = self.card_model()
        if model is not None:
            model.record_model_card(hyperparameters=extract_hyperparameters_from_trainer(self))

    def card_model(self) -> ModelCardMixin | None:
        """The vlmheads model under any DDP, FSDP or PEFT wrapper, or None."""
        model = self.accelerator.unwrap_model(self.model)
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        return model if isinstance(model, ModelCardMixin) else None

    def evaluate(self, eval_dataset=None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"):
        metrics = super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        model = self.card_model()
        if model is not None:
            prefix = f"{metric_key_prefix}_"
            row = {
                name.removeprefix(prefix): value
                for name, value in metrics.items()
                if name.startswith(prefix) and name.removeprefix(prefix) not in EVALUATION_SPEED
            }
            rows = {**model.model_card_facts.get("metrics", {}), metric_key_prefix: row}
            # The Trainer's own evaluation is the model's score, unless the script named another row.
            own = metric_key_prefix == "eval" and "model_row" not in model.model_card_facts
            model.record_model_card(metrics=rows, model_row="eval" if own else None)
        return metrics

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
    ) -> None:
        """Writes the vlmheads card into `args.output_dir`, with what the Trainer knows about the run."""
        model = self.card_model()
        if model is None:
            return super().create_model_card(
                language, license, tags, model_name, finetuned_from, tasks, dataset_tags, dataset, dataset_args
            )
        if not self.is_world_process_zero():
            return None
        summary = TrainingSummary.from_trainer(
            self,
            language=language,
            license=license,
            tags=[tags] if isinstance(tags, str) else tags,
            model_name=model_name,
            finetuned_from=finetuned_from,
            tasks=tasks,
            dataset_tags=dataset_tags,
            dataset=dataset,
            dataset_args=dataset_args,
        )
        # The Trainer names the evaluation set by its builder, which a `Dataset.from_dict` lacks (None).
        datasets = summary.dataset_tags or summary.dataset
        datasets = [name for name in ([datasets] if isinstance(datasets, str) else datasets or []) if name]
        model.write_model_card(
            self.args.output_dir,
            license=summary.license,
            tags=summary.tags,
            datasets=datasets or None,
            hyperparameters=summary.hyperparameters,
            base_model=finetuned_from,
            model_name=summary.model_name or None,
        )
        return None
