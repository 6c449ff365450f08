"""Record checks through `Dataset.map(batched=True, num_proc=...)`, with progress bars and errors naming the record."""

import json
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from vlmheads.data.driving import check_driving_dataset, synthetic_driving_dataset
from vlmheads.data.receipts import (
    check_receipt_dataset,
    load_receipt_folder,
    save_as_imagefolder,
    synthetic_receipts,
)


@pytest.fixture(scope="module")
def receipts():
    return synthetic_receipts(9, seed=2, min_size=40, max_size=48)


def with_bad_scene(dataset: datasets.Dataset, index: int) -> datasets.Dataset:
    columns = dataset.with_format("numpy")[:]
    columns["scene_queries"][index, 3, 5] = np.inf
    return datasets.Dataset.from_dict(columns, features=dataset.features)


def test_driving_records_are_checked_in_batches_with_a_progress_bar(capfd):
    dataset = synthetic_driving_dataset(150, seed=1, with_answers=False)
    check_driving_dataset(dataset, batch_size=32)
    assert "Checking driving records" in capfd.readouterr().err
    with pytest.raises(ValueError, match=r"Record 101 \(id='synthetic-1-101'\): scene_queries contains NaN or inf"):
        check_driving_dataset(with_bad_scene(dataset, 101), batch_size=32)


@pytest.mark.slow
def test_a_bad_record_is_named_from_a_worker_process():
    dataset = with_bad_scene(synthetic_driving_dataset(64, seed=3, with_answers=False), 50)
    with pytest.raises(ValueError, match=r"Record 50 \(id='synthetic-3-50'\): scene_queries contains NaN or inf"):
        check_driving_dataset(dataset, num_proc=2, batch_size=8)


def test_record_settings_reach_the_batched_check():
    dataset = synthetic_driving_dataset(4, seed=1, with_answers=False)
    with pytest.raises(ValueError, match=r"Record 0 .*ego_waypoints must have shape \(8, 2\), got \(6, 2\)"):
        check_driving_dataset(dataset, num_waypoints=8)
    with pytest.raises(ValueError, match=r"Record 0 .*prompt must hold exactly one <waypoint_ego>, got 0"):
        check_driving_dataset(dataset, ego_token="<waypoint_ego>")


def test_the_photo_folder_is_written_and_checked_with_progress_bars(receipts, tmp_path, capfd):
    save_as_imagefolder(receipts, tmp_path / "photos")
    assert len(list((tmp_path / "photos").glob("*/*.png"))) == 9
    loaded = load_receipt_folder(tmp_path / "photos")
    errors = capfd.readouterr().err
    assert "Writing receipt photos" in errors and "Checking receipt photos" in errors
    assert sorted(loaded["label"]) == sorted(receipts["label"])


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_a_damaged_photo_in_the_folder_is_named(receipts, tmp_path, damage):
    folder = save_as_imagefolder(receipts, tmp_path / "photos")
    victim = sorted((folder / "1").glob("*.png"))[0]
    data = victim.read_bytes()
    victim.write_bytes(b"not a png at all" if damage == "corrupt" else data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"Record \d+ image = '.*{victim.name}' is not a readable image file"):
        load_receipt_folder(folder)


def test_a_photo_without_a_class_is_named():
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    photos = [Image.new("RGB", (8, 8))] * 3
    dataset = datasets.Dataset.from_dict({"image": photos, "label": [0, 1, -1]}, features=features)
    with pytest.raises(ValueError, match=r"Record 2 \(photo in memory\): label -1 is not a class id 0 \.\.\. 1"):
        check_receipt_dataset(dataset)


def test_relabelling_keeps_the_model_ids_and_the_exact_class_names(receipts, tmp_path):
    names = ["None", "One", "Several"]
    renamed = receipts.cast_column("label", datasets.ClassLabel(names=names))
    folder = save_as_imagefolder(renamed, tmp_path / "photos")
    # Sorted folder order is None, One, Several; the model's order puts Several first.
    model_names = ["Several", "None", "One"]
    loaded = load_receipt_folder(folder, model_names)
    assert loaded.features["label"].names == model_names
    expected = sorted(model_names.index(names[label]) for label in receipts["label"])
    assert sorted(loaded["label"]) == expected


@pytest.mark.slow
def test_the_validation_benchmark_runs_at_orion_size(tmp_path):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_driving_validation.py"
    command = [sys.executable, str(script), "--num_records", "300", "--chunk", "100", "--num_proc", "1"]
    run = subprocess.run(
        [*command, "--loop_sample", "5", "--workdir", str(tmp_path / "bench")], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout[run.stdout.index("{") :])
    assert result["records"] == 300 and result["gigabytes"] > 0.15  # 512 x 256 + 16 x 256 floats a record
    assert result["validate_s"] > 0 and result["former_loop_ms_per_record"] > 0
    assert not (tmp_path / "bench").exists()
