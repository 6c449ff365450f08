"""Shared builders of the VLA tests: the families with a tiny offline module, processors, models and batches."""

import functools
from pathlib import Path

import torch
from transformers import ProcessorMixin

from vlmheads.configuration.configuration_vla import POLICY_FAMILIES
from vlmheads.data.manipulation import synthetic_manipulation_dataset
from vlmheads.modeling.families import VLM_FAMILIES
from vlmheads.modeling.modeling_vla import VLAForActionPrediction
from vlmheads.processing.collator_vla import VLADataCollator
from vlmheads.registry.vlms import create_vlm, load_processor
from vlmheads.training.vla import make_room_for_action_bins

TINY_FOLDER = Path(__file__).resolve().parents[1] / "offline" / "tiny"
TINY_MODULES = sorted(path.stem for path in TINY_FOLDER.glob("*.py") if path.stem != "__init__")
# Every family with a tiny offline module, but the complete robot policies (π0), on which a head makes no sense.
VLA_FAMILIES = sorted(
    family.name
    for family in VLM_FAMILIES.values()
    if family.name.replace("-", "_").replace(".", "_") in TINY_MODULES and family.name not in POLICY_FAMILIES
)
ACTION_HEADS = ("regression", "tokens", "flow")
# The fastest tiny family on the CPU: 32-pixel images, 16 image tokens, a short prompt.
FAST_FAMILY = "paligemma"
# A regression VLA's settings with statistics that are not the identity, and a state of that width.
ACTION_SETTINGS = {
    "action_dim": 3,
    "chunk_size": 2,
    "state_dim": 4,
    "action_mean": [1.0, -2.0, 0.5],
    "action_std": [0.5, 2.0, 1.0],
    "state_mean": [0.0] * 4,
    "state_std": [1.0] * 4,
}
STATE = [0.1, -0.2, 0.3, 0.4]


@functools.cache
def processor_of(family: str) -> ProcessorMixin:
    """The family's tiny processor, built once; tests must not change it."""
    return load_processor(family, tiny=True)


def make_model(family: str, action_head: str, seed: int = 0, **settings) -> VLAForActionPrediction:
    """A VLA on the family's tiny random backbone; the tokens head gets room for its bins first."""
    backbone = create_vlm(family, tiny=True, seed=seed)
    if action_head == "tokens":
        make_room_for_action_bins(backbone, processor_of(family).tokenizer, settings.get("num_action_bins", 256))
    torch.manual_seed(seed)
    return VLAForActionPrediction.from_backbone(backbone, action_head=action_head, **settings)


@functools.cache
def records(num_samples: int, seed: int = 0, **settings) -> tuple[dict, ...]:
    """Synthetic manipulation records, as plain dicts."""
    return tuple(synthetic_manipulation_dataset(num_samples, seed=seed, **settings))


def batch_for(model: VLAForActionPrediction, family: str, samples, **collator_settings) -> dict[str, torch.Tensor]:
    return VLADataCollator.for_model(processor_of(family), model.config, **collator_settings)(list(samples))


def train_steps(
    model: VLAForActionPrediction,
    batch: dict[str, torch.Tensor],
    steps: int,
    learning_rate: float,
    batch_size: int,
    seed: int = 0,
) -> list[float]:
    """AdamW with a one-cycle schedule on random batches of the pre-collated `batch`; returns the losses."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, learning_rate, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    size = next(iter(batch.values())).shape[0]
    losses = []
    for _ in range(steps):
        index = torch.randint(0, size, (batch_size,), generator=generator)
        loss = model(**{name: value[index] for name, value in batch.items()}).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        losses.append(loss.item())
    return losses
