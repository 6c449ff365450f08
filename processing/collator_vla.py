"""Checks and batches manipulation records (schema in `vlmheads.data.manipulation`) for
`VLAForActionPrediction`, with the processor of any registered VLM family, and for transformers' π0
(`PI0ForConditionalGeneration`) with its `PI0Processor`."""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import ProcessorMixin


def check_manipulation_record(
    record: Mapping[str, Any], chunk_size: int, action_dim: int, state_dim: int = 0, with_actions: bool = True
) -> None:
    """Raises a `ValueError` saying what is wrong with one record: a missing field, a wrong shape, NaN or inf.

    `actions` must be (chunk_size, action_dim) unless `with_actions` is false; `state` (state_dim,) when
    `state_dim` > 0.
    """
    required = ("images", "instruction", "actions") if with_actions else ("images", "instruction")
    missing = [name for name in required if record.get(name) is None]
    if missing:
        raise ValueError(f"missing field(s) {missing}")
    if not record["images"]:
        raise ValueError("images is empty: a record needs at least one camera image")
    if not isinstance(record["instruction"], str) or not record["instruction"].strip():
        raise ValueError(f"instruction must be a non-empty string, got {record['instruction']!r}")
    fields = {"actions": (chunk_size, action_dim)} if with_actions else {}
    if state_dim:
        if record.get("state") is None:
            raise ValueError(f"state is missing; the model reads a state of {state_dim} values")
        fields["state"] = (state_dim,)
    for name, shape in fields.items():
        try:
            values = np.asarray(record[name], dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{name} is not a numeric array ({error})") from None
        if values.shape != shape:
            raise ValueError(f"{name} must have shape {shape}, got {values.shape}")
        if not np.isfinite(values).all():
            raise ValueError(f"{name} contains NaN or inf values")


@dataclass
class VLADataCollator:
    """Turns manipulation records into a VLA batch with the family's processor.

    Each instruction becomes the user turn of the processor's chat template (camera images first, then the text)
    when the processor has one; processors without one (PaliGemma, Florence-2, π0) place the image tokens
    themselves. Prompts are padded on the left, which the `"tokens"` head and `generate` need. Every record is
    checked first against `chunk_size`, `action_dim` and `state_dim` (a model's `config`): a bad record stops the
    batch with its id and the reason.

    Returns the processor's outputs (`input_ids`, `attention_mask`, `pixel_values`, ...), `actions`
    (B, chunk_size, action_dim) with `with_actions`, and `state` (B, state_dim) when `state_dim` > 0.
    """

    processor: ProcessorMixin
    chunk_size: int
    action_dim: int
    state_dim: int = 0
    with_actions: bool = True
    _prompts: dict[tuple[str, int], str] = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def for_model(cls, processor: ProcessorMixin, config, **kwargs) -> "VLADataCollator":
        """A collator matching a `VLAConfig`'s chunk size, action and state widths."""
        return cls(processor, config.chunk_size, config.action_dim, config.state_dim, **kwargs)

    def __call__(self, records: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        _check_records(records, self.chunk_size, self.action_dim, self.state_dim, self.with_actions)
        images = [list(record["images"]) for record in records]
        texts = [self.prompt(record["instruction"], len(record["images"])) for record in records]
        batch = dict(self.processor(images=images, text=texts, padding=True, padding_side="left", return_tensors="pt"))
        # PaliGemma's processor labels the prompt unasked; the VLA's targets are the actions.
        batch.pop("labels", None)
        if self.with_actions:
            batch["actions"] = _stack(records, "actions")
        if self.state_dim:
            batch["state"] = _stack(records, "state")
        return batch

    def prompt(self, instruction: str, num_images: int) -> str:
        """The text the processor gets for an instruction: the chat-formatted user turn up to the assistant's
        answer, or the bare instruction for processors without a chat template. Rendered once per instruction."""
        key = (instruction, num_images)
        if key not in self._prompts:
            if getattr(self.processor, "chat_template", None):
                content = [*({"type": "image"} for _ in range(num_images)), {"type": "text", "text": instruction}]
                messages = [{"role": "user", "content": content}]
                self._prompts[key] = self.processor.apply_chat_template(messages, add_generation_prompt=True)
            else:
                self._prompts[key] = instruction
        return self._prompts[key]


@dataclass
class PI0DataCollator:
    """Turns manipulation records into a batch for transformers' π0 with its `PI0Processor`, which normalises the
    state and the actions with its data set statistics (`state_mean`, `actions_mean`, ...) and pads them to
    `max_state_dim`; their widths are the statistics' (`for_processor`). Records are checked as by
    `VLADataCollator`; π0 always reads a state.

    Returns `input_ids`, `attention_mask`, `pixel_values` (B, cameras, 3, H, W), `pixel_attention_mask`, `state`
    (B, max_state_dim) and, with `with_actions`, `actions` (B, chunk_size, max_state_dim), all normalised.
    """

    processor: ProcessorMixin
    action_dim: int
    state_dim: int
    with_actions: bool = True

    @classmethod
    def for_processor(cls, processor: ProcessorMixin, **kwargs) -> "PI0DataCollator":
        """A collator of the widths of the processor's statistics, which must be set."""
        unset = [
            name
            for name in ("state_mean", "state_std", "actions_mean", "actions_std")
            if getattr(processor, name) is None
        ]
        if unset:
            raise ValueError(f"The π0 processor has no {unset}: set the training data's statistics on it.")
        return cls(processor, len(processor.actions_mean), len(processor.state_mean), **kwargs)

    @property
    def chunk_size(self) -> int:
        return self.processor.chunk_size

    def __call__(self, records: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        _check_records(records, self.chunk_size, self.action_dim, self.state_dim, self.with_actions)
        batch = self.processor(
            images=[list(record["images"]) for record in records],
            text=[record["instruction"] for record in records],
            state=_stack(records, "state"),
            actions=_stack(records, "actions") if self.with_actions else None,
            return_tensors="pt",
        )
        return dict(batch)

    def sample_actions(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """π0's sampled chunk (B, chunk_size, action_dim) in the data's units: `model.sample_actions` (normalised,
        padded) cut to `action_dim` and unnormalised as the processor normalised."""
        inputs = {name: value for name, value in batch.items() if name != "actions"}
        normalized = model.sample_actions(**inputs)[..., : self.action_dim].float()
        mean = torch.tensor(self.processor.actions_mean, dtype=torch.float32, device=normalized.device)
        std = torch.tensor(self.processor.actions_std, dtype=torch.float32, device=normalized.device)
        return normalized * (std + 1e-8) + mean


def _check_records(
    records: Sequence[Mapping[str, Any]], chunk_size: int, action_dim: int, state_dim: int, with_actions: bool
) -> None:
    if not records:
        raise ValueError("The batch is empty: give at least one record.")
    for position, record in enumerate(records):
        try:
            check_manipulation_record(record, chunk_size, action_dim, state_dim, with_actions)
        except ValueError as error:
            raise ValueError(
                f"Record id={record.get('id')!r} (position {position} in the batch) was rejected: {error}."
            ) from None


def _stack(records: Sequence[Mapping[str, Any]], name: str) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(record[name], dtype=np.float32) for record in records]))
