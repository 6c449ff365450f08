"""LoRA adapters served beside the base model and chosen per request, as vLLM's `--lora-modules name=path` does.

`python -m vlmheads.serve --lora name=path` loads each peft LoRA folder into the served model. A request names an
adapter through `model`. Requests on different adapters and on the base model decode in one batch through peft's
mixed-batch inference (`adapter_names`, one per row, `BASE_ADAPTER` for the base model). A prompt (one request,
batch of 1, images included) and the heads' forward passes run with the request's adapter active, or with the
adapters disabled: a mixed batch indexes every adapted module's input by batch row, which a vision tower's flattened
patches (N, D) are not. peft keeps which adapter is active on the model itself, so every model call holds `lock`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # peft imports bitsandbytes, whose CPU backend warns on import: load it when adapters are served.
    from peft import PeftModel

#: peft's name for the rows of a mixed batch that run the base model alone.
BASE_ADAPTER = "__base__"
LORA_FLAG = "--lora"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class LoraSpec:
    """One `--lora name=path` value: the name requests send as `model`, and the adapter folder."""

    name: str
    path: Path

    @property
    def flag(self) -> str:
        """The flag as given, for error messages."""
        return f"{LORA_FLAG} {self.name}={self.path}"


def parse_lora_specs(values: list[str], base_id: str) -> list[LoraSpec]:
    """The `--lora name=path` values, checked before any model loads: each is `name=path` with a name that is not
    the base model's id nor `BASE_ADAPTER`, names are unique, and each path is a LoRA adapter folder
    (`check_adapter_folder`). A `ValueError` names the flag at fault."""
    specs: list[LoraSpec] = []
    for value in values:
        name, equals, path = value.partition("=")
        name, path = name.strip(), path.strip()
        if not equals or not name or not path:
            raise ValueError(f"{LORA_FLAG} {value}: expected name=path (an adapter name, then its folder).")
        spec = LoraSpec(name, Path(path))
        if name in (base_id, BASE_ADAPTER):
            raise ValueError(
                f"{spec.flag}: the name {name!r} is taken by the base model; give the adapter a name of its own."
            )
        if any(other.name == name for other in specs):
            raise ValueError(f"{spec.flag}: the name {name!r} is given to two adapters; adapter names are unique.")
        check_adapter_folder(spec)
        specs.append(spec)
    return specs


def check_adapter_folder(spec: LoraSpec) -> dict[str, Any]:
    """The adapter configuration of `spec.path` (its `adapter_config.json`); a `ValueError` naming the flag when
    the folder is missing, holds no adapter, or holds one that is not LoRA."""
    if not spec.path.is_dir():
        raise ValueError(f"{spec.flag}: no such folder.")
    config_file = spec.path / ADAPTER_CONFIG
    try:
        config = json.loads(config_file.read_text())
    except FileNotFoundError as error:
        raise ValueError(f"{spec.flag}: the folder holds no {ADAPTER_CONFIG}; it is not a peft adapter.") from error
    except (OSError, ValueError) as error:
        raise ValueError(f"{spec.flag}: {ADAPTER_CONFIG} is not readable JSON ({error}).") from error
    peft_type = config.get("peft_type") if isinstance(config, dict) else None
    if peft_type != "LORA":
        raise ValueError(f"{spec.flag}: the folder holds a {peft_type} adapter, not a LoRA adapter.")
    return config


def same_base(trained_on: str | None, served: str | None) -> bool:
    """Whether an adapter trained on `trained_on` (its `base_model_name_or_path`) fits the model served as
    `served` (its `name_or_path`): true when either is unknown, when they are equal, or when they end in the same
    name (a Hub id and a local copy of it, a relative and an absolute path)."""
    if not trained_on or not served:
        return True
    return trained_on == served or Path(trained_on.rstrip("/")).name == Path(served.rstrip("/")).name


class LoraAdapters:
    """The LoRA adapters of `specs`, loaded into `model` in place (peft wraps its adapted layers), with the lock that
    every call of the model holds.

    A `ValueError` naming the flag refuses an adapter trained on another model: another `base_model_name_or_path`
    (`same_base`), target modules the model lacks, weights of other shapes, or weights the folder lacks.
    """

    def __init__(self, model: torch.nn.Module, specs: list[LoraSpec]):
        from peft import PeftConfig, PeftModel
        from peft.utils.other import ModulesToSaveWrapper

        row_split = _row_split_class()

        if not specs:
            raise ValueError(f"LoraAdapters needs at least one {LORA_FLAG} adapter.")
        self.lock = threading.RLock()
        #: Adapter name → its folder.
        self.paths = {spec.name: spec.path for spec in specs}
        served = getattr(model, "name_or_path", None)
        self.peft_model: PeftModel | None = None
        for spec in specs:
            config = PeftConfig.from_pretrained(str(spec.path))
            if not same_base(config.base_model_name_or_path, served):
                raise ValueError(
                    f"{spec.flag}: the adapter was trained on `{config.base_model_name_or_path}` "
                    f"(base_model_name_or_path in {ADAPTER_CONFIG}); this server serves `{served}`."
                )
            config.inference_mode = True
            try:
                if self.peft_model is None:
                    # The plain PeftModel, whatever the adapter's task type: its forward calls the model as it is.
                    self.peft_model = PeftModel(model, config, spec.name)
                result = self.peft_model.load_adapter(str(spec.path), spec.name, is_trainable=False)
            except (ValueError, RuntimeError, KeyError) as error:
                raise ValueError(f"{spec.flag}: the adapter does not fit the served model: {error}") from error
            if result.missing_keys:
                raise ValueError(
                    f"{spec.flag}: the adapter does not fit the served model: the folder lacks weights for "
                    f"{len(result.missing_keys)} of its modules (e.g. {result.missing_keys[0]})."
                )
        for module in self.peft_model.modules():
            # peft built these wrappers; the subclass changes only how a mixed batch runs them.
            if type(module) is ModulesToSaveWrapper:
                module.__class__ = row_split
        self.peft_model.eval()

    @contextlib.contextmanager
    def single(self, adapter: str | None) -> Iterator[None]:
        """Holds the lock with `adapter` active (None: the adapters disabled), for a call of the model on one
        request."""
        with self.lock:
            if adapter is None:
                with self.peft_model.disable_adapter():
                    yield
            else:
                self.peft_model.set_adapter(adapter, inference_mode=True)
                yield

    def run_rows(self, adapters: list[str | None], **inputs: Any) -> Any:
        """The model on a batch whose row i runs with `adapters[i]` (None: the base model): peft's mixed batch."""
        with self.lock:
            return self.peft_model(**inputs, adapter_names=[adapter or BASE_ADAPTER for adapter in adapters])


def _rows_of(value: Any, rows: torch.Tensor, batch_size: int) -> Any:
    """`value`'s rows `rows` when it is a batch-first tensor of `batch_size` rows, else `value` itself."""
    if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == batch_size:
        return value.index_select(0, rows)
    return value


def _mixed_rows_forward(wrapper: Any, *args: Any, adapter_names: list[str], **kwargs: Any) -> torch.Tensor:
    batch_size = len(adapter_names)
    output = None
    for adapter in dict.fromkeys(adapter_names):
        rows = torch.tensor([row for row, name in enumerate(adapter_names) if name == adapter])
        copies = wrapper.modules_to_save
        module = copies[adapter] if adapter in copies else wrapper.original_module
        part = module(
            *(_rows_of(value, rows, batch_size) for value in args),
            **{key: _rows_of(value, rows, batch_size) for key, value in kwargs.items()},
        )
        if output is None:
            output = part.new_empty((batch_size, *part.shape[1:]))
        output[rows] = part
    return output


@functools.cache
def _row_split_class() -> type:
    from peft.utils.other import ModulesToSaveWrapper

    class RowSplitModulesToSave(ModulesToSaveWrapper):
        """peft's wrapper of a fully trained module (`modules_to_save`), whose mixed batches run any module: each
        adapter's copy runs on its rows of every batch-first tensor argument. peft's own `_mixed_batch_forward`
        takes Linear, Embedding and Conv layers alone, and slices the first argument only; a head such as Orion's
        driving embeddings (input_ids, inputs_embeds, ...) runs in every decode step."""

        _mixed_batch_forward = _mixed_rows_forward

    return RowSplitModulesToSave
