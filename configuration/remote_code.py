"""Self-contained remote code: what `save_pretrained` writes so that a folder loads where vlmheads is not installed.

transformers ships a custom class by copying its source file and the files it imports with same-folder
relative imports (`from .x import y`). Inside the vlmheads package the model-side code spans several folders
(`from ..configuration.configuration_orion_qwen import ...`), which transformers can neither follow nor load.
`SelfContainedCodeMixin` writes every module a class needs next to the weights, flat, with package-relative
imports rewritten into same-folder ones, and records the class in `auto_map`, so that
`Auto*.from_pretrained(folder, trust_remote_code=True)` works where vlmheads is not installed.

A model names its Hugging Face pipelines by string (`pipelines`), never imports them: the pipeline's code is looked
up only when the model is saved, so a folder ships the code of its own task only.

Imports only the standard library (transformers' remote-code loader inside the one function that needs it):
configurations use it, and they import no torch.
"""

import ast
import importlib
import importlib.util
import re
import sys
from pathlib import Path
from typing import ClassVar

_RELATIVE_IMPORT = re.compile(r"^(\s*)from\s+\.+(?:\w+\.)*(\w+)\s+import\b", re.MULTILINE)


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


def write_code_files(module_name: str, save_directory: str | Path) -> list[Path]:
    """Writes the code of an imported module into `save_directory` as flat files that import only each other and
    libraries."""
    own_package = module_name.split(".")[0]
    written = []
    for file_name, path in code_files(module_name).items():
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


def code_reference(cls: type) -> str:
    """How `auto_map` and `custom_pipelines` name a class of the flat saved code: `"module_file.ClassName"`."""
    return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"


def import_pipeline_module(owner: type, reference: str, source: str | None = None) -> str:
    """Imports the module of a pipeline named by `reference` (`"..processing.pipeline_x.PipelineClass"`, relative to
    `owner`'s module) and returns its module name.

    Code loaded from a saved folder is flat: there the module is a sibling (`".pipeline_x"`), or, when loading the
    model did not need it, a file of the folder or Hub repository `source` the model came from, imported the way
    transformers imports remote code.
    """
    module_path, _, class_name = reference.rpartition(".")
    file_stem = module_path.rsplit(".", 1)[-1]
    package = owner.__module__.rpartition(".")[0]
    tried = []
    for candidate in (module_path, "." + file_stem):
        name = importlib.util.resolve_name(candidate, package)
        tried.append(name)
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError:
            continue
        if not isinstance(getattr(module, class_name, None), type):
            raise ValueError(f"{owner.__name__}.pipelines names {reference!r}, but {name} defines no {class_name}.")
        return name
    if source:
        # Only remote code re-saved from its folder gets here; transformers is what loaded it.
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        try:
            return get_class_from_dynamic_module(f"{file_stem}.{class_name}", source).__module__
        except (OSError, AttributeError) as error:
            tried.append(f"{source}/{file_stem}.py ({error})")
    raise ValueError(f"{owner.__name__}.pipelines names {reference!r}, but none of {tried} can be imported.")


def check_code_references(folder: str | Path, config) -> None:
    """Raises a `ValueError` when `auto_map` or `custom_pipelines` of a saved folder's config name code it lacks.

    A folder saved by another vlmheads version can name files or classes that its code files no longer hold;
    transformers would fail later with a bare import error. References into other repositories (`repo--x.Y`)
    are not checked.
    """
    folder = Path(folder)
    references = {f"auto_map[{key!r}]": value for key, value in (getattr(config, "auto_map", None) or {}).items()}
    for task, entry in (getattr(config, "custom_pipelines", None) or {}).items():
        references[f"custom_pipelines[{task!r}]['impl']"] = entry.get("impl") if isinstance(entry, dict) else entry
    held = sorted(path.name for path in folder.glob("*.py"))
    for where, value in references.items():
        for reference in value if isinstance(value, (list, tuple)) else [value]:
            if reference is None or "--" in reference:
                continue
            module, _, class_name = reference.rpartition(".")
            path = folder / f"{module}.py"
            if not module or not path.is_file():
                raise ValueError(
                    f"{folder / 'config.json'}: {where} = {reference!r} names {module}.py, which the folder does not "
                    f"hold (it holds {held}); it was saved by another version of its code: save it again."
                )
            defined = {node.name for node in ast.parse(path.read_text(encoding="utf-8")).body if hasattr(node, "name")}
            if class_name not in defined:
                raise ValueError(
                    f"{folder / 'config.json'}: {where} = {reference!r}, but {path.name} defines no class "
                    f"{class_name}; it was saved by another version of its code: save it again."
                )


class SelfContainedCodeMixin:
    """Makes `save_pretrained` write the class's code as flat, self-contained files and record it in `auto_map`.

    Mix in before the transformers base class (configurations, processors; models through
    `modeling_base.SelfContainedModelMixin`). Subclasses list the Auto classes that should load them, and models
    the pipelines that ship with them, by task and by reference relative to their module:
    `pipelines = {"trajectory-prediction": "..processing.pipeline_orion_trajectory.OrionTrajectoryPipeline"}` saves
    the pipeline's code next to the model's and records it in `config.custom_pipelines`, which
    `transformers.pipeline(task, model=folder, trust_remote_code=True)` reads.
    """

    auto_classes: ClassVar[tuple[str, ...]] = ()
    pipelines: ClassVar[dict[str, str]] = {}

    @classmethod
    def from_dict(cls, *args, **kwargs):
        """Configs only: every load of a config (`AutoConfig`, `from_pretrained`, remote code) ends here."""
        loaded = super().from_dict(*args, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        folder = Path(config.name_or_path or ".")
        if config.name_or_path and (folder / "config.json").is_file():
            check_code_references(folder, config)
        return loaded

    def code_owner(self):
        """What holds `auto_map` and `custom_pipelines`: configurations and processors themselves, models their
        configuration."""
        return self

    def model_auto_classes(self) -> list[str]:
        """The `AutoModel*` classes that load this class: what `custom_pipelines` names as the pipeline's `pt`."""
        return [name for name in self.auto_classes if name.startswith("AutoModel")]

    def save_pretrained(self, save_directory: str | Path, *args, **kwargs):
        owner = self.code_owner()
        reference = code_reference(type(self))
        owner.auto_map = {**(getattr(owner, "auto_map", None) or {}), **dict.fromkeys(self.auto_classes, reference)}
        source = getattr(owner, "name_or_path", None)
        pipeline_modules = {
            task: import_pipeline_module(type(self), impl, source) for task, impl in self.pipelines.items()
        }
        if self.pipelines:
            owner.custom_pipelines = {
                task: {"impl": ".".join(impl.rsplit(".", 2)[-2:]), "pt": self.model_auto_classes()}
                for task, impl in self.pipelines.items()
            }
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            for module_name in (type(self).__module__, *pipeline_modules.values()):
                write_code_files(module_name, save_directory)
        return result
