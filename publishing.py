"""What `save_pretrained` and `push_to_hub` add for the vlmheads models: a model card, its facts, the processor.

The self-contained remote code that saved folders carry is written by `configuration/remote_code.py`.

This file imports only the standard library, transformers and huggingface_hub: it ships with every saved model.
"""

import json
import numbers
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from transformers import AutoProcessor
from transformers.utils import FEATURE_EXTRACTOR_NAME, PROCESSOR_NAME, cached_file

_HUB_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
# The card's facts, saved next to the weights and read back by `from_pretrained`.
MODEL_CARD_FACTS = "model_card.json"
# How data files are named: a path ending so is a file, whatever the Hub id pattern says.
_DATA_FILE_SUFFIXES = (".parquet", ".arrow", ".json", ".jsonl", ".csv", ".tsv", ".txt")
# `from_pretrained` arguments that say where the card's facts are read from.
_HUB_FILE_ARGUMENTS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")


def dataset_name(name: str) -> str:
    """How a card names a data set: a Hub id as given, a local folder, file or glob by its folder's base name.

    `"team/driving-logs"` stays; `"/data/drive/train-*.parquet"` and `"/data/drive/"` become `"drive"`, and a bare
    `"train.parquet"` stays a file name: no local path reaches a published card.
    """
    path = Path(name)
    is_path = path.exists() or path.is_absolute() or any(character in name for character in "*?[")
    if _HUB_REPO_ID.match(name) and not is_path and path.suffix not in _DATA_FILE_SUFFIXES:
        return name
    parts = [part for part in path.parts if not any(character in part for character in "*?[")]
    if parts and (path.is_file() or Path(parts[-1]).suffix in _DATA_FILE_SUFFIXES) and len(parts) > 1:
        parts = parts[:-1]
    return Path(*parts).name if parts and Path(*parts).name else name


class ModelCardMixin:
    """Writes `README.md` from a template in the vlmheads `model_cards/` folder when a model is saved or pushed.

    The installed package sets `model_card_dir`; a model loaded as remote code has no templates and keeps the
    card that its Hub repository already has. What a card reports beyond the config (evaluation figures, data
    sets, training hyper-parameters, plots) is remembered on the model by `record_model_card` and
    `write_model_card`, so that every later card carries it, whichever way the model is published:
    `save_pretrained`, `push_to_hub`, or the Trainer of `vlmheads.training.cards`.
    """

    model_card_dir: ClassVar[Path | None] = None
    model_card_template: ClassVar[str] = ""
    model_card_training_template: ClassVar[str] = "_training.md"
    pipeline_tag: ClassVar[str | None] = None
    model_card_tags: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config, *args, **kwargs):
        # The checkpoint a model is first built from is its base model; later saves keep the recorded one.
        if getattr(config, "base_model", "") is None and config.name_or_path:
            config.base_model = config.name_or_path
        super().__init__(config, *args, **kwargs)

    def base_model_id(self) -> str | None:
        """Hub id of the checkpoint the backbone weights came from, if they came from the Hub."""
        candidates = (self.model_card_facts.get("base_model"), getattr(self.config, "base_model", None))
        for candidate in (*candidates, self.config.name_or_path):
            if candidate and _HUB_REPO_ID.match(candidate) and not Path(candidate).exists():
                return candidate
        return None

    @property
    def model_card_facts(self) -> dict[str, Any]:
        """What `record_model_card` remembered for this model's cards."""
        return self.__dict__.setdefault("_model_card_facts", {})

    def record_model_card(
        self,
        *,
        license: str | None = None,
        tags: Sequence[str] | None = None,
        metrics: dict[str, dict[str, float]] | None = None,
        model_row: str | None = None,
        datasets: Sequence[str] | None = None,
        hyperparameters: dict[str, Any] | None = None,
        base_model: str | None = None,
        model_name: str | None = None,
    ) -> None:
        """Remembers facts for every card this model writes later; an argument left `None` keeps what it had.

        `metrics` maps a row name (e.g. "trained model", "constant-velocity baseline") to metric values; `model_row`
        names the row scored by this model, published as `model-index` evaluation results so that the Hub shows
        them. `datasets`: data set names or Hub ids (the last one is the evaluation set); `hyperparameters`: the
        training settings; `model_name`: the name in `model-index` (defaults to the class name). Local data paths
        are recorded by their folder's base name (`dataset_name`).
        """
        facts = self.model_card_facts
        given = {
            "license": license,
            "tags": None if tags is None else list(tags),
            "metrics": metrics,
            "model_row": model_row,
            "datasets": None if datasets is None else list(dict.fromkeys(map(dataset_name, datasets))),
            "hyperparameters": hyperparameters,
            "base_model": base_model,
            "model_name": model_name,
        }
        for row, values in (metrics or {}).items():
            for name, value in values.items():
                if not isinstance(value, numbers.Real) or isinstance(value, bool):
                    raise ValueError(f"metrics[{row!r}][{name!r}] must be a number, got {value!r}.")
        rows = metrics if metrics is not None else facts.get("metrics", {})
        row = model_row if model_row is not None else facts.get("model_row")
        if row is not None and row not in rows:
            raise ValueError(f"model_row={row!r} is not a row of the card's metrics {sorted(rows)}.")
        facts.update({name: value for name, value in given.items() if value is not None})

    def write_model_card(
        self, save_directory: str | Path, *, images: Sequence[str] | None = None, **facts: Any
    ) -> Path | None:
        """Renders the model card into `save_directory/README.md`, remembering `facts` (see `record_model_card`).

        `images` are file names inside `save_directory` to embed; they are remembered with their folder and copied
        into the folders of later cards. Returns the card's path, or None where no template is available. The facts
        are saved beside the card in `model_card.json`, which `from_pretrained` reads back, so that a reloaded model
        publishes the same card.
        """
        self.record_model_card(**facts)
        save_directory = Path(save_directory)
        if images is not None:
            self.model_card_facts["images"] = [(save_directory / name).resolve() for name in images]
        facts = self.model_card_facts
        for image in facts.get("images", []):
            if image.is_file() and not (save_directory / image.name).is_file():
                shutil.copy(image, save_directory / image.name)
        saved = {**facts, "images": [image.name for image in facts.get("images", [])]}
        (save_directory / MODEL_CARD_FACTS).write_text(json.dumps(saved, indent=2, default=str), encoding="utf-8")
        if self.model_card_dir is None:
            return None
        metrics = facts.get("metrics", {})
        datasets = facts.get("datasets", [])
        model_name = facts.get("model_name") or type(self).__name__
        eval_results = None
        if facts.get("model_row") is not None:
            evaluated_on = datasets[-1] if datasets else "held-out set"
            eval_results = [
                EvalResult(
                    task_type=self.pipeline_tag or "other",
                    dataset_type=evaluated_on,
                    dataset_name=evaluated_on,
                    metric_type=name,
                    metric_name=name,
                    metric_value=float(value),
                )
                for name, value in metrics[facts["model_row"]].items()
            ]
        base_model = self.base_model_id()
        card_data = ModelCardData(
            library_name="transformers",
            base_model=base_model,
            datasets=[name for name in datasets if _HUB_REPO_ID.match(name) and not Path(name).exists()] or None,
            pipeline_tag=self.pipeline_tag,
            license=facts.get("license", "apache-2.0"),
            tags=list(dict.fromkeys(["vlmheads", "custom_code", *self.model_card_tags, *facts.get("tags", [])])),
            model_name=model_name if eval_results else None,
            eval_results=eval_results,
        )
        hyperparameters = facts.get("hyperparameters", {})
        # Every template places the shared training section with `{{ training }}`.
        training = (self.model_card_dir / self.model_card_training_template).read_text(encoding="utf-8")
        template = (self.model_card_dir / self.model_card_template).read_text(encoding="utf-8")
        card = ModelCard.from_template(
            card_data,
            template_str=template.replace("{{ training }}", training),
            model_class=type(self).__name__,
            config=self.config,
            metrics=metrics,
            metric_names=list(dict.fromkeys(name for row in metrics.values() for name in row)),
            images=[image.name for image in facts.get("images", [])],
            base_model=base_model,
            datasets=datasets,
            hyperparameters=hyperparameters,
        )
        path = save_directory / "README.md"
        card.save(path)
        return path

    def save_pretrained(self, save_directory: str | Path, *args, **kwargs):
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            self.write_model_card(save_directory)
        return result

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, then the card's facts from the folder's `model_card.json`, if any."""
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        where = {name: kwargs[name] for name in _HUB_FILE_ARGUMENTS if name in kwargs}
        model.restore_model_card(pretrained_model_name_or_path, **where)
        return loaded

    def restore_model_card(self, pretrained_model_name_or_path: str | Path, **where: Any) -> None:
        """Remembers the facts of the `model_card.json` saved in a folder or Hub repository (none: nothing to do).

        `where` takes `from_pretrained`'s file arguments (`revision`, `cache_dir`, `local_files_only`, ...).
        """
        found = cached_file(
            pretrained_model_name_or_path, MODEL_CARD_FACTS, _raise_exceptions_for_missing_entries=False, **where
        )
        if found is None:
            return
        facts = json.loads(Path(found).read_text(encoding="utf-8"))
        images = [
            cached_file(pretrained_model_name_or_path, name, _raise_exceptions_for_missing_entries=False, **where)
            for name in facts.pop("images", [])
        ]
        self.record_model_card(**facts)
        self.model_card_facts["images"] = [Path(image).resolve() for image in images if image is not None]

    def source_processor(self) -> Any:
        """The processor saved in the local folder this model was loaded from, or None (no folder, no processor)."""
        source = Path(self.config.name_or_path or "")
        processor_files = (source / PROCESSOR_NAME, source / FEATURE_EXTRACTOR_NAME)
        if not self.config.name_or_path or not any(path.is_file() for path in processor_files):
            return None
        return AutoProcessor.from_pretrained(source)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = "50GB",
        tags: list[str] | None = None,
        license: str | None = None,
    ):
        """Like `PreTrainedModel.push_to_hub`, but uploads this package's model card instead of a generic one, and
        the processor of the folder the model was loaded from, so that the repository runs as the folder did."""
        if self.model_card_dir is None:
            return super().push_to_hub(
                repo_id,
                commit_message=commit_message,
                commit_description=commit_description,
                private=private,
                token=token,
                revision=revision,
                create_pr=create_pr,
                max_shard_size=max_shard_size,
                tags=tags,
            )
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, max_shard_size=max_shard_size)
            processor = self.source_processor()
            if processor is not None:
                processor.save_pretrained(folder)
            self.write_model_card(folder, license=license, tags=tags, model_name=repo_id.rsplit("/", 1)[-1])
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                commit_message=commit_message or "Upload model",
                commit_description=commit_description,
                revision=revision,
                create_pr=create_pr,
            )
