"""The receipt classifier (`pooling="vision"`) as one ONNX graph: logits match PyTorch, bad inputs, no torch."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from receipt_helpers import make_model, make_processor, photo

from vlmheads.onnx_export.classifier import export_classifier_graph
from vlmheads.onnx_export.classifier_runtime import ClassifierRunner

PROVIDERS = ["CPUExecutionProvider"]
PIXEL_INPUTS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")


@pytest.fixture(scope="module")
def processor():
    return make_processor()


@pytest.fixture(scope="module")
def model(processor):
    return make_model(processor, pooling="vision")


@pytest.fixture(scope="module")
def exported(model, processor, tmp_path_factory):
    done = {}

    def get(dtype: str):
        if dtype not in done:
            out_dir = tmp_path_factory.mktemp(f"classifier_{dtype}")
            done[dtype] = out_dir, export_classifier_graph(model, processor, out_dir, (48, 40), dtype)
        return done[dtype]

    return get


def torch_logits(model, inputs) -> np.ndarray:
    with torch.no_grad():
        return model(**{name: inputs[name] for name in PIXEL_INPUTS}).logits.numpy()


# One photo; three samples of different shapes; samples with one and two photos (a padding image in the first).
BATCHES = {
    "one_photo": [[(60, 30)]],
    "three_samples": [[(20, 90)], [(33, 33)], [(100, 50)]],
    "padding_image": [[(48, 40)], [(30, 90), (64, 64)]],
}


@pytest.mark.parametrize("layout", sorted(BATCHES))
def test_classifier_graph_matches_pytorch(model, processor, exported, layout):
    out_dir, entry = exported("float32")
    assert not any(module.training for module in model.modules()), "the export changed the model's mode"
    assert entry["num_labels"] == model.config.num_labels
    assert entry["id2label"] == {str(index): label for index, label in model.config.id2label.items()}
    images = [[photo(seed, *size) for seed, size in enumerate(sample)] for sample in BATCHES[layout]]
    inputs = processor(images=images, return_tensors="pt")
    logits = ClassifierRunner(out_dir, entry, PROVIDERS)(**{name: value.numpy() for name, value in inputs.items()})
    expected = torch_logits(model, inputs)
    assert logits.shape == (len(images), model.config.num_labels)
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4)
    if len(images) > 1:
        assert np.abs(logits[0] - logits[1]).max() > 1e-3


def test_float16_classifier_graph(model, processor, exported):
    out_dir, entry = exported("float16")
    inputs = processor(images=[[photo(7)], [photo(8, 90, 30)]], return_tensors="pt")
    logits = ClassifierRunner(out_dir, entry, PROVIDERS)(**{name: value.numpy() for name, value in inputs.items()})
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits, torch_logits(model, inputs), rtol=0, atol=2e-2)


def test_other_pooling_is_rejected(processor, tmp_path):
    multimodal = make_model(processor, pooling="multimodal")
    with pytest.raises(ValueError, match='Only pooling="vision" exports as one graph'):
        export_classifier_graph(multimodal, processor, tmp_path, (48, 40), "float32")
    with pytest.raises(ValueError, match="exports a ReceiptVLClassifier, got Linear"):
        export_classifier_graph(torch.nn.Linear(2, 2), processor, tmp_path, (48, 40), "float32")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda i: i.pop("aspect_ratio_mask"), r"missing \['aspect_ratio_mask'\]"),
        (lambda i: i.update(pixel_values=i["pixel_values"][..., :16]), r"pixel_values must have shape \(B, images"),
        (lambda i: i.update(aspect_ratio_ids=i["aspect_ratio_ids"][:1]), r"aspect_ratio_ids must have shape"),
        (lambda i: i.update(aspect_ratio_mask=i["aspect_ratio_mask"][:, :, :2]), r"aspect_ratio_mask must have"),
        (lambda i: i.update(aspect_ratio_ids=i["aspect_ratio_ids"] + 50), r"aspect_ratio_ids must lie in \[0, "),
        (lambda i: i.update(aspect_ratio_ids=np.zeros_like(i["aspect_ratio_ids"])), "Every sample needs an image"),
    ],
)
def test_bad_inputs_are_rejected(processor, exported, change, message):
    out_dir, entry = exported("float32")
    inputs = dict(processor(images=[[photo(1)], [photo(2)]], return_tensors="np"))
    change(inputs)
    with pytest.raises(ValueError, match=message):
        ClassifierRunner(out_dir, entry, PROVIDERS)(**inputs)


def test_classifier_runtime_runs_without_torch(processor, exported, tmp_path):
    out_dir, entry = exported("float32")
    inputs = {name: value for name, value in processor(images=[photo(3)], return_tensors="np").items()}
    np.savez(tmp_path / "inputs.npz", **{name: inputs[name] for name in PIXEL_INPUTS})
    script = f"""
import json, sys
sys.modules["torch"] = None
import numpy as np
from vlmheads.onnx_export.classifier_runtime import ClassifierRunner
inputs = dict(np.load({str(tmp_path / "inputs.npz")!r}))
runner = ClassifierRunner({str(out_dir)!r}, json.loads({json.dumps(entry)!r}), {PROVIDERS!r})
np.save({str(tmp_path / "logits.npy")!r}, runner(**inputs))
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    expected = ClassifierRunner(out_dir, entry, PROVIDERS)(**{name: inputs[name] for name in PIXEL_INPUTS})
    np.testing.assert_array_equal(np.load(tmp_path / "logits.npy"), expected)
