"""The one torch helper of decoder positions (`vlmheads.modeling.positions`), by the family table's `positions`: the
positions it gives a prompt are those the model computes itself, and decoding continues where the prompt ends."""

import pytest
import torch
from vlm_helpers import family_batch, tiny_backbone

from vlmheads.modeling.families import POSITIONS_1D, POSITIONS_MROPE, vlm_family
from vlmheads.modeling.positions import decode_positions, mrope_positions, prompt_positions


# Slow the first time in a session: it builds the tiny Qwen2-VL processor (the full Qwen tokenizer).
@pytest.mark.slow
@pytest.mark.parametrize("images", [True, False], ids=["image", "text"])
def test_mrope_prompt_positions_are_the_models_own(images):
    model = tiny_backbone("qwen2-vl").eval()
    family = vlm_family("qwen2-vl")
    assert family.positions == POSITIONS_MROPE
    batch = family_batch("qwen2-vl", ["A short one.", "A longer question about it?"], seeds=[0, 1] if images else None)
    positions, offsets = prompt_positions(model, family, batch)
    assert positions.shape == (3, *batch["input_ids"].shape) and offsets.shape == (2, 1)
    with torch.no_grad():
        expected = model(**batch).logits
        given = model(**batch, position_ids=positions).logits
    # At the real tokens; the padding's own positions differ and are never attended to.
    real_tokens = batch["attention_mask"].bool()
    assert torch.allclose(given[real_tokens], expected[real_tokens], atol=1e-5)
    # The next token sits one past the last prompt position on every row.
    real = batch["attention_mask"].sum(dim=1)
    following = decode_positions(family, real + offsets[:, 0])
    assert following.shape == (3, 2, 1)
    assert torch.equal(following[:, :, 0], positions.amax(dim=2) + 1)
    if not images:
        assert torch.equal(offsets, torch.zeros(2, 1, dtype=torch.long))


def test_mrope_positions_need_the_token_types_with_images():
    model = tiny_backbone("qwen2-vl")
    batch = family_batch("qwen2-vl", ["What is it?"], seeds=[0])
    batch.pop("mm_token_type_ids")
    with pytest.raises(ValueError, match=r"\['image_grid_thw'\] need mm_token_type_ids"):
        mrope_positions(model, batch["input_ids"], batch["attention_mask"], image_grid_thw=batch["image_grid_thw"])


def test_1d_positions_count_the_real_tokens():
    family = vlm_family("llava")
    assert family.positions == POSITIONS_1D
    inputs = {
        "input_ids": torch.ones(2, 5, dtype=torch.long),
        "attention_mask": torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]),
    }
    positions, offsets = prompt_positions(None, family, inputs)
    assert torch.equal(positions, torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]))
    assert torch.equal(offsets, torch.zeros(2, 1, dtype=torch.long))
    assert torch.equal(decode_positions(family, torch.tensor([3, 5])), torch.tensor([[3], [5]]))
