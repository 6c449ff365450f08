"""Folders saved by vlmheads 0.1 (commit bb45e7d) load with the current code and give the same outputs.

The folders and their reference inputs and outputs are checked in under `tests/fixtures/saved_v0_1/`, written by
`make_fixtures.py` there with that version installed.
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel

from vlmheads import (
    OrionQwenForTrajectory,
    ReceiptVLClassifier,
    VLAForActionPrediction,
    VLMForImageClassification,
    VLMForTrajectory,
)

SAVED = Path(__file__).resolve().parent / "fixtures" / "saved_v0_1"
FOLDERS = {
    "orion_qwen2_vl": OrionQwenForTrajectory,
    "receipt_vl": ReceiptVLClassifier,
    "vlm_image_classification_llava": VLMForImageClassification,
    "vlm_trajectory_llava": VLMForTrajectory,
    "vla_paligemma": VLAForActionPrediction,
}


def _reference(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    tensors = load_file(folder / "reference.safetensors")
    inputs = {key.removeprefix("input."): value for key, value in tensors.items() if key.startswith("input.")}
    outputs = {key.removeprefix("output."): value for key, value in tensors.items() if key.startswith("output.")}
    return inputs, outputs


@pytest.mark.parametrize("name", FOLDERS)
def test_folder_saved_by_0_1_loads_with_the_same_outputs(name):
    folder = SAVED / name
    model = FOLDERS[name].from_pretrained(folder).eval()
    inputs, expected = _reference(folder)
    assert expected, f"{folder} holds no reference outputs"
    with torch.no_grad():
        outputs = model(**inputs)
    for key, value in expected.items():
        torch.testing.assert_close(getattr(outputs, key), value, rtol=0, atol=1e-5, msg=f"{name}: {key}")


@pytest.mark.parametrize("name", FOLDERS)
def test_auto_model_loads_a_0_1_folder_into_the_current_class(name):
    model = AutoModel.from_pretrained(SAVED / name)
    assert type(model) is FOLDERS[name]
