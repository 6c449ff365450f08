"""The VLA learns from both inputs: one test per action head on the fastest tiny family, on the CPU.

Held-out action error at most half the mean-action baseline's, and at least 1.5 times worse with the image blanked
(only the table left) and again with each sample given another sample's instruction.
"""

import time

import numpy as np
import pytest
from PIL import Image
from vla_helpers import ACTION_HEADS, FAST_FAMILY, batch_for, make_model, processor_of, records, train_steps

from vlmheads.data.manipulation import BACKGROUND
from vlmheads.processing.collator_vla import VLADataCollator
from vlmheads.training.vla import (
    action_errors,
    mean_action_baseline,
    normalization_statistics,
    predict_dataset_actions,
)

NUM_TRAIN, NUM_TEST = 1024, 128
SETTINGS = {"learning_rate": 1e-3, "batch_size": 16}
# The tokens head (a 256-way choice per dimension through the tied LM head, from random bin embeddings) leaves its
# plateau between 1,500 and 3,000 steps; the regression and flow heads learn in 600.
STEPS = {"regression": 600, "flow": 600, "tokens": 4000}


@pytest.mark.slow
@pytest.mark.parametrize("action_head", ACTION_HEADS)
def test_the_vla_learns_to_read_the_image_and_the_instruction(action_head):
    start = time.perf_counter()
    train, test = records(NUM_TRAIN, seed=0), records(NUM_TEST, seed=1)
    train_actions = np.stack([np.asarray(record["actions"]) for record in train])
    targets = np.stack([np.asarray(record["actions"]) for record in test])
    model = make_model(FAST_FAMILY, action_head, action_dim=2, chunk_size=1, **normalization_statistics(train_actions))
    losses = train_steps(model, batch_for(model, FAST_FAMILY, train), STEPS[action_head], **SETTINGS)

    collator = VLADataCollator.for_model(processor_of(FAST_FAMILY), model.config)
    blank = [{**record, "images": [Image.new("RGB", record["images"][0].size, BACKGROUND)]} for record in test]
    swapped = [{**record, "instruction": test[(i + 1) % NUM_TEST]["instruction"]} for i, record in enumerate(test)]
    errors = {
        name: action_errors(predict_dataset_actions(model, collator, inputs), targets)["action_l1"]
        for name, inputs in (("model", list(test)), ("image blanked", blank), ("instruction swapped", swapped))
    }
    errors["mean-action baseline"] = action_errors(mean_action_baseline(train_actions, NUM_TEST), targets)["action_l1"]
    print(f"\n{action_head}: held-out L1 {errors} in {time.perf_counter() - start:.0f} s")
    assert np.mean(losses[-20:]) < np.mean(losses[:20])
    assert errors["model"] <= 0.5 * errors["mean-action baseline"], errors
    assert errors["image blanked"] >= 1.5 * errors["model"], errors
    assert errors["instruction swapped"] >= 1.5 * errors["model"], errors
