"""Batches driving records (schema in `vlmheads.data.driving`) for the Orion models."""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import ProcessorMixin

from ..configuration.constants import EGO_TOKEN

REQUIRED_FIELDS = ("id", "scene_queries", "history_queries", "can_bus", "prompt", "ego_waypoints")
FEATURE_RANKS = {"scene_queries": 2, "history_queries": 2, "can_bus": 1, "ego_waypoints": 2}
IGNORE_INDEX = -100


def check_driving_record(
    record: Mapping[str, Any], num_waypoints: int = 6, waypoint_dim: int = 2, ego_token: str = EGO_TOKEN
) -> None:
    """Raises a `ValueError` saying what is wrong with one record: a missing field, a wrong shape, NaN or inf."""
    missing = [name for name in REQUIRED_FIELDS if record.get(name) is None]
    if missing:
        raise ValueError(f"missing field(s) {missing}")
    for name, rank in FEATURE_RANKS.items():
        try:
            values = np.asarray(record[name], dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{name} is not a numeric array ({error})") from None
        if values.ndim != rank or values.size == 0:
            raise ValueError(f"{name} must be a non-empty {rank}-D array, got shape {values.shape}")
        if not np.isfinite(values).all():
            raise ValueError(f"{name} contains NaN or inf values")
    waypoints = np.shape(record["ego_waypoints"])
    if waypoints != (num_waypoints, waypoint_dim):
        raise ValueError(f"ego_waypoints must have shape ({num_waypoints}, {waypoint_dim}), got {waypoints}")
    if record["prompt"].count(ego_token) != 1:
        raise ValueError(f"prompt must hold exactly one {ego_token}, got {record['prompt'].count(ego_token)}")


@dataclass
class OrionDataCollator:
    """Turns driving records into a padded Orion batch.

    Each prompt goes through the processor's chat template as the user turn: camera images first, then the
    `<scene>`, `<history>` and `<can_bus>` placeholders the prompt does not place itself, then the prompt text.
    With `with_answers`, a record's `answer` becomes the assistant turn and only its tokens are labelled; the
    prompt, the placeholders and the padding get -100. Every record is checked first: a bad record stops the
    batch with its id and the reason, so no sample is dropped or altered silently.

    Returns `input_ids`, `attention_mask`, `mm_token_type_ids` (B, L); `scene_queries` (B, Ns, Ds),
    `history_queries` (B, Nh, Dh), `can_bus` (B, Dc), `ego_waypoints` (B, T, 2); and when present `labels` (B, L),
    `command` (B,), `pixel_values` and `image_grid_thw`.
    """

    processor: ProcessorMixin
    num_waypoints: int = 6
    waypoint_dim: int = 2
    with_answers: bool = True
    _prefixes: dict[tuple[str, int], str] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __call__(self, records: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        for position, record in enumerate(records):
            try:
                self._check(record)
            except ValueError as error:
                raise ValueError(
                    f"Record id={record.get('id')!r} (position {position} in the batch) was rejected: {error}."
                ) from None
        prompts, full_texts = zip(*(self._texts(record) for record in records), strict=True)
        images = [image for record in records for image in record.get("images") or []]
        batch = self.processor(
            images=images or None,
            text=list(full_texts),
            **{name: self._stack(records, name) for name in ("scene_queries", "history_queries", "can_bus")},
            padding=True,
            padding_side="right",
            return_tensors="pt",
        )
        batch["ego_waypoints"] = self._stack(records, "ego_waypoints")
        if self.with_answers and any(record.get("answer") for record in records):
            batch["labels"] = self._labels(batch, prompts, full_texts)
        commands = [record.get("command") for record in records]
        if any(command is not None for command in commands):
            if any(command is None for command in commands):
                missing = [
                    record.get("id") for record, command in zip(records, commands, strict=True) if command is None
                ]
                raise ValueError(f"Records {missing} have no command while others in the batch do.")
            batch["command"] = torch.tensor(commands, dtype=torch.long)
        return dict(batch)

    def _check(self, record: Mapping[str, Any]) -> None:
        check_driving_record(record, self.num_waypoints, self.waypoint_dim, self.processor.ego_token)
        for name, rows in (
            ("scene_queries", self.processor.num_scene_queries),
            ("history_queries", self.processor.num_history_queries),
        ):
            if len(record[name]) != rows:
                raise ValueError(f"{name} has {len(record[name])} rows but the processor expects {rows}")

    def _messages(self, prompt: str, num_images: int) -> list[dict[str, Any]]:
        content = [{"type": "image"} for _ in range(num_images)]
        for kind in ("scene", "history", "can_bus"):
            if getattr(self.processor, f"{kind}_token") not in prompt:
                content.append({"type": kind})
        return [{"role": "user", "content": [*content, {"type": "text", "text": prompt}]}]

    def _prefix(self, prompt: str, num_images: int) -> str:
        """The chat-formatted user turn of a prompt, up to the assistant turn; rendered once per prompt."""
        key = (prompt, num_images)
        if key not in self._prefixes:
            messages = self._messages(prompt, num_images)
            self._prefixes[key] = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        return self._prefixes[key]

    def _texts(self, record: Mapping[str, Any]) -> tuple[str, str]:
        """The chat-formatted prompt (up to the assistant turn) and the full text with the answer, if any."""
        num_images = len(record.get("images") or [])
        prefix = self._prefix(record["prompt"], num_images)
        answer = record.get("answer") if self.with_answers else None
        if not answer:
            return prefix, prefix
        messages = [*self._messages(record["prompt"], num_images), {"role": "assistant", "content": answer}]
        full = self.processor.apply_chat_template(messages)
        if not full.startswith(prefix):
            raise ValueError("The chat template renders the assistant turn after a different prompt prefix.")
        return prefix, full

    def _labels(
        self, batch: Mapping[str, torch.Tensor], prompts: Sequence[str], full_texts: Sequence[str]
    ) -> torch.Tensor:
        """-100 everywhere but on each answer's tokens, which close every (right-padded) sequence."""
        labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        for index, (prompt, full, length) in enumerate(zip(prompts, full_texts, lengths, strict=True)):
            if full == prompt:
                continue
            answer_ids = self.processor.tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
            start = length - len(answer_ids)
            if batch["input_ids"][index, start:length].tolist() != answer_ids:
                raise ValueError(f"Sample {index}: the answer does not tokenize the same inside the prompt.")
            labels[index, start:length] = batch["input_ids"][index, start:length]
        return labels

    @staticmethod
    def _stack(records: Sequence[Mapping[str, Any]], name: str) -> torch.Tensor:
        arrays = [np.asarray(record[name], dtype=np.float32) for record in records]
        if len({array.shape for array in arrays}) > 1:
            shapes = {record.get("id"): array.shape for record, array in zip(records, arrays, strict=True)}
            raise ValueError(f"{name} differ in shape across the batch: {shapes}.")
        return torch.from_numpy(np.stack(arrays))
