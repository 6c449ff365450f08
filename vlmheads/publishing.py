"""What `save_pretrained` and `push_to_hub` add for the vlmheads classes: self-contained code and a model card.

transformers ships a custom class by copying its source file and the files it imports with same-folder
relative imports (`from .x import y`). Inside the vlmheads package the model-side code spans several folders
(`from ..configuration.configuration_orion_qwen import ...`), which transformers can neither follow nor load.
`SelfContainedCodeMixin` writes every module a class needs next to the weights, flat, with package-relative
imports rewritten into same-folder ones, and records the class in `auto_map`, so that
`Auto*.from_pretrained(folder, trust_remote_code=True)` works where vlmheads is not installed.

This file imports only the standard library, transformers and huggingface_hub: it ships with every saved model.
"""

import ast
import importlib.util
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from huggingface_hub import HfApi, ModelCard, ModelCardData
from transformers import PreTrainedModel

_RELATIVE_IMPORT = re.compile(r"^(\s*)from\s+\.+(?:\w+\.)*(\w+)\s+import\b", re.MULTILINE)
_HUB_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def code_files(module_name: str) -> dict[str, Path]:
    """Source files of an imported module and of every module it imports relatively, transitively, by file name."""
    files: dict[str, Path] = {}
    pending = [module_name]
    while pending:
        module = sys.modules[pending.pop()]
        path = Path(module.__file__)
        if path.name == "__init__.py":
            raise ValueError(f"{module.__name__} is a package: model-side code must import names from module files.")
        if path.name in files:
            if files[path.name] != path:
                raise ValueError(f"{files[path.name]} and {path} would both be saved as {path.name}.")
            continue
        files[path.name] = path
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                if node.module is None:
                    raise ValueError(f"{path}: `from . import x` cannot be shipped; write `from .module import x`.")
                pending.append(importlib.util.resolve_name("." * node.level + node.module, module.__package__))
    return files


def flatten_relative_imports(source: str) -> str:
    """Rewrites `from ..package.module import x` into the same-folder import `from .module import x`."""
    return _RELATIVE_IMPORT.sub(r"\1from .\2 import", source)


def write_code_files(cls: type, save_directory: str | Path) -> list[Path]:
    """Writes the code `cls` needs into `save_directory` as flat files that import only each other and libraries."""
    own_package = cls.__module__.split(".")[0]
    written = []
    for file_name, path in code_files(cls.__module__).items():
        source = flatten_relative_imports(path.read_text(encoding="utf-8"))
        for node in ast.walk(ast.parse(source)):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            if any(name.split(".")[0] == own_package for name in names):
                raise ValueError(f"{path} imports {own_package} absolutely: the saved folder would need it installed.")
        target = Path(save_directory) / file_name
        target.write_text(source, encoding="utf-8")
        written.append(target)
    return written


class SelfContainedCodeMixin:
    """Makes `save_pretrained` write the class's code as flat, self-contained files and record it in `auto_map`.

    Mix in before the transformers base class. Subclasses list the Auto classes that should load them.
    """

    auto_classes: ClassVar[tuple[str, ...]] = ()

    def save_pretrained(self, save_directory: str | Path, *args, **kwargs):
        if isinstance(self, PreTrainedModel):
            # Write transformers' own key layout, not the legacy Hub one: the Trainer resumes a checkpoint with a
            # plain `load_state_dict`, which skips renamed keys (transformers issue #43701).
            kwargs.setdefault("save_original_format", False)
        # Models keep `auto_map` in their config, configs and processors in themselves.
        owner = self.config if isinstance(self, PreTrainedModel) else self
        reference = f"{type(self).__module__.rsplit('.', 1)[-1]}.{type(self).__name__}"
        owner.auto_map = {**(getattr(owner, "auto_map", None) or {}), **dict.fromkeys(self.auto_classes, reference)}
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            write_code_files(type(self), save_directory)
        return result


class ModelCardMixin:
    """Writes `README.md` from a template in the vlmheads `model_cards/` folder when a model is saved or pushed.

    The installed package sets `model_card_dir`; a model loaded as remote code has no templates and keeps the
    card that its Hub repository already has.
    """

    model_card_dir: ClassVar[Path | None] = None
    model_card_template: ClassVar[str] = ""
    pipeline_tag: ClassVar[str | None] = None
    model_card_tags: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config, *args, **kwargs):
        # The checkpoint a model is first built from is its base model; later saves keep the recorded one.
        if getattr(config, "base_model", "") is None and config.name_or_path:
            config.base_model = config.name_or_path
        super().__init__(config, *args, **kwargs)

    def base_model_id(self) -> str | None:
        """Hub id of the checkpoint the backbone weights came from, if they came from the Hub."""
        for candidate in (getattr(self.config, "base_model", None), self.config.name_or_path):
            if candidate and _HUB_REPO_ID.match(candidate) and not Path(candidate).exists():
                return candidate
        return None

    def write_model_card(
        self,
        save_directory: str | Path,
        *,
        license: str = "apache-2.0",
        tags: Sequence[str] = (),
        metrics: dict[str, dict[str, float]] | None = None,
        images: Sequence[str] = (),
    ) -> Path | None:
        """Renders the model card into `save_directory/README.md`.

        `metrics` maps a row name (e.g. "trained model") to its metric values; `images` are file names inside
        `save_directory` to embed. Returns the card's path, or None where no template is available.
        """
        if self.model_card_dir is None:
            return None
        card_data = ModelCardData(
            library_name="transformers",
            base_model=self.base_model_id(),
            pipeline_tag=self.pipeline_tag,
            license=license,
            tags=list(dict.fromkeys(["vlmheads", "custom_code", *self.model_card_tags, *tags])),
        )
        card = ModelCard.from_template(
            card_data,
            template_str=(self.model_card_dir / self.model_card_template).read_text(encoding="utf-8"),
            model_class=type(self).__name__,
            config=self.config,
            metrics=metrics or {},
            metric_names=list(dict.fromkeys(name for row in (metrics or {}).values() for name in row)),
            images=list(images),
        )
        path = Path(save_directory) / "README.md"
        card.save(path)
        return path

    def save_pretrained(self, save_directory: str | Path, *args, **kwargs):
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            self.write_model_card(save_directory)
        return result

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
        license: str = "apache-2.0",
    ):
        """Like `PreTrainedModel.push_to_hub`, but uploads this package's model card instead of a generic one."""
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
            self.write_model_card(folder, license=license, tags=tags or ())
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                commit_message=commit_message or "Upload model",
                commit_description=commit_description,
                revision=revision,
                create_pr=create_pr,
            )
