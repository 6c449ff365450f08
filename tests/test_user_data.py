"""Your own data in: an imagefolder with class names of your own, for the receipt classifier and for
`VLMForImageClassification` on any family; paths that do not exist and Hub ids told apart with clear errors."""

import subprocess
import sys
from pathlib import Path

import pytest

from vlmheads.data.receipts import load_image_folder, save_as_imagefolder, synthetic_receipts
from vlmheads.data.sources import is_hub_id, local_or_hub

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["--max_steps", "2", "--per_device_train_batch_size", "8", "--disable_tqdm", "true", "--report_to", "none"]


@pytest.fixture(scope="module")
def user_photos(tmp_path_factory) -> Path:
    """A user's imagefolder: classes named none / one / many, not the receipt set's 0 / 1 / 2 or more."""
    folder = tmp_path_factory.mktemp("photos")
    save_as_imagefolder(synthetic_receipts(24, seed=5), folder)
    for old, new in (("0", "none"), ("1", "one"), ("2 or more", "many")):
        (folder / old).rename(folder / new)
    return folder


def test_the_class_folders_are_the_labels_unless_given(user_photos):
    assert load_image_folder(user_photos).features["label"].names == ["many", "none", "one"]
    assert load_image_folder(user_photos, ["none", "one", "many"]).features["label"].names == ["none", "one", "many"]
    with pytest.raises(ValueError, match=r"must hold one folder per class \['cat', 'dog'\], found \['many', 'none'"):
        load_image_folder(user_photos, ["cat", "dog"])


def test_missing_folders_and_hub_ids_are_told_apart(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    assert is_hub_id("team/receipt-photos") and not is_hub_id("outputs/orion_dmo") and not is_hub_id("x.parquet")
    with pytest.raises(FileNotFoundError, match=r"--data_dir: no such folder or file: outputs/orion_dmo"):
        local_or_hub("outputs/orion_dmo", "--data_dir")
    with pytest.raises(FileNotFoundError, match=r"--data_dir: no such folder or file: /nowhere/photos"):
        local_or_hub("/nowhere/photos", "--data_dir")
    assert local_or_hub("team/receipt-photos", "--data_dir") == "team/receipt-photos"


def test_a_hub_id_offline_says_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match=r"--data_dir: someone/no-such-photos is not a local folder.*not reachable"):
        load_image_folder("someone/no-such-photos")


def run_script(script: str, arguments: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *arguments, *SHORT],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


@pytest.mark.slow
def test_the_receipt_classifier_trains_on_a_users_class_names(user_photos, tmp_path):
    result = run_script("train_receipts.py", ["--data_dir", str(user_photos), "--output_dir", str(tmp_path)])
    assert "Held-out confusion matrix" in result.stdout
    config = (tmp_path / "config.json").read_text()
    assert '"many"' in config and '"none"' in config and '"one"' in config


@pytest.mark.slow
def test_any_family_classifier_trains_on_a_users_labels(user_photos, tmp_path):
    labels = ["--labels", "none", "one", "many"]
    result = run_script(
        "train_classifier.py",
        ["--family", "smolvlm", "--data_dir", str(user_photos), *labels, "--output_dir", str(tmp_path)],
    )
    assert "smolvlm classifier, labels ['none', 'one', 'many']" in result.stdout
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert model.config.id2label == {0: "none", 1: "one", 2: "many"}
    assert (tmp_path / "confusion_matrix.png").is_file() and "| fine-tuned |" in (tmp_path / "README.md").read_text()


def test_a_missing_image_file_is_named(tmp_path):
    from vlmheads.processing.image_inputs import open_image

    with pytest.raises(ValueError, match=rf"images\[0\]: no such file: {tmp_path / 'photo.png'}$"):
        open_image(str(tmp_path / "photo.png"), "images[0]")
