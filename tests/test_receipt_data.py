import datasets
import numpy as np
import pytest
from PIL import Image

from vlmheads.data.receipts import (
    RECEIPT_CLASSES,
    load_receipt_folder,
    majority_rate,
    random_split,
    receipt_label,
    render_receipt_photo,
    save_as_imagefolder,
    synthetic_receipts,
)
from vlmheads.metrics import load_metric


@pytest.fixture(scope="module")
def receipts():
    return synthetic_receipts(30, seed=3)


def test_the_synthetic_set_is_balanced_labelled_by_count_and_holds_images(receipts):
    assert isinstance(receipts.features["image"], datasets.Image)
    assert receipts.features["label"].names == list(RECEIPT_CLASSES) == ["0", "1", "2 or more"]
    assert np.bincount(receipts["label"]).tolist() == [10, 10, 10]
    for example in receipts:
        assert example["label"] == min(example["receipt_count"], 2) == receipt_label(example["receipt_count"])
        assert isinstance(example["image"], Image.Image) and example["image"].mode == "RGB"
        assert 80 <= example["image"].width <= 128 and 80 <= example["image"].height <= 128
    assert set(receipts["receipt_count"]) == {0, 1, 2, 3}
    assert len({example["image"].size for example in receipts}) > 10  # varied sizes and aspect ratios


def test_the_synthetic_set_is_reproducible_and_seeded(receipts):
    again = synthetic_receipts(30, seed=3)
    assert again["label"] == receipts["label"]
    assert np.array_equal(np.asarray(again[0]["image"]), np.asarray(receipts[0]["image"]))
    assert synthetic_receipts(30, seed=4)["label"] != receipts["label"]


def test_receipts_are_bright_paper_on_a_darker_table():
    rng = np.random.default_rng(0)
    empty = np.asarray(render_receipt_photo(0, rng, 100, 100)).min(axis=-1)
    three = np.asarray(render_receipt_photo(3, rng, 100, 100)).min(axis=-1)
    assert (empty > 215).mean() < 0.01 < 0.05 < (three > 215).mean()


def test_bad_generator_settings_are_clear_errors():
    with pytest.raises(ValueError, match="num_samples must be a positive multiple of 3"):
        synthetic_receipts(10)
    with pytest.raises(ValueError, match=r"count must lie in \[0, 3\], got 5"):
        render_receipt_photo(5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="count must be non-negative"):
        receipt_label(-1)


def test_photos_in_class_folders_load_through_imagefolder(receipts, tmp_path):
    save_as_imagefolder(receipts, tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["0", "1", "2 or more"]
    loaded = load_receipt_folder(tmp_path)
    assert loaded.features["label"].names == ["0", "1", "2 or more"]
    assert sorted(loaded["label"]) == sorted(receipts["label"])
    by_size = {example["image"].size: example["label"] for example in receipts}
    for example in loaded:
        assert by_size[example["image"].size] == example["label"]


def test_class_folders_follow_the_model_labels_not_their_sorted_order(receipts, tmp_path):
    save_as_imagefolder(receipts, tmp_path)
    (tmp_path / "2 or more").rename(tmp_path / "many")
    (tmp_path / "0").rename(tmp_path / "zero")
    (tmp_path / "1").rename(tmp_path / "one")
    loaded = load_receipt_folder(tmp_path, ["zero", "one", "many"])
    assert loaded.features["label"].names == ["zero", "one", "many"]
    assert sorted(loaded["label"]) == sorted(receipts["label"])


def test_folders_that_are_not_the_classes_are_a_clear_error(receipts, tmp_path):
    save_as_imagefolder(receipts.select(range(6)), tmp_path)
    (tmp_path / "1").rename(tmp_path / "one")
    with pytest.raises(ValueError, match=r"must hold one folder per class \['0', '1', '2 or more'\], found"):
        load_receipt_folder(tmp_path)


def test_the_held_out_split_keeps_the_class_balance(receipts):
    train, held_out = random_split(receipts, 0.2, seed=0)
    assert len(train) == 24 and len(held_out) == 6
    assert np.bincount(held_out["label"]).tolist() == [2, 2, 2]
    assert majority_rate(train["label"]) == pytest.approx(1 / 3)
    assert majority_rate([0, 0, 0, 1]) == 0.75


def test_accuracy_and_macro_f1_are_local_evaluate_modules():
    predictions, references = [0, 1, 2, 2, 0, 1], [0, 1, 1, 2, 2, 1]
    assert load_metric("accuracy").compute(predictions=predictions, references=references) == {
        "accuracy": pytest.approx(4 / 6)
    }
    result = load_metric("macro_f1").compute(predictions=predictions, references=references, num_labels=3)
    # Per class: 0 → P 1/2, R 1 → 2/3; 1 → P 1, R 2/3 → 4/5; 2 → P 1/2, R 1/2 → 1/2.
    assert result["f1_per_class"] == pytest.approx([2 / 3, 4 / 5, 1 / 2])
    assert result["macro_f1"] == pytest.approx((2 / 3 + 4 / 5 + 1 / 2) / 3)
    never_predicted = load_metric("macro_f1").compute(predictions=[0, 0], references=[0, 1], num_labels=3)
    assert never_predicted["f1_per_class"] == pytest.approx([2 / 3, 0.0])
    with pytest.raises(ValueError, match="predictions and references must be non-empty and alike"):
        load_metric("accuracy").compute(predictions=[], references=[])
