import json

import numpy as np
import pytest

from vlmheads.data.driving import (
    ACCELERATION,
    SPEED,
    YAW_RATE,
    along_path_distance,
    arc_positions,
    check_driving_dataset,
    constant_velocity_waypoints,
    load_driving_dataset,
    synthetic_driving_dataset,
)
from vlmheads.metrics import load_metric


@pytest.fixture(scope="module")
def synthetic():
    return synthetic_driving_dataset(512, seed=3).with_format("numpy")


def test_synthetic_records_follow_the_schema(synthetic):
    record = synthetic[0]
    assert record["scene_queries"].shape == (16, 256) and record["history_queries"].shape == (4, 256)
    assert record["can_bus"].shape == (89,) and record["ego_waypoints"].shape == (6, 2)
    assert record["prompt"].count("<ego_wp>") == 1 and record["answer"]
    check_driving_dataset(synthetic)
    assert len(set(synthetic["id"])) == len(synthetic)


def test_the_same_seed_gives_the_same_set_and_another_seed_does_not():
    first, again = (synthetic_driving_dataset(8, seed=5).with_format("numpy") for _ in range(2))
    np.testing.assert_array_equal(first["ego_waypoints"], again["ego_waypoints"])
    other = synthetic_driving_dataset(8, seed=6).with_format("numpy")
    assert not np.allclose(first["ego_waypoints"], other["ego_waypoints"])


def test_without_stop_lines_the_future_is_the_can_bus_kinematics():
    dataset = synthetic_driving_dataset(64, seed=1, stop_line_probability=0.0).with_format("numpy")[:]
    can_bus = dataset["can_bus"].astype(np.float64)
    times = np.arange(1, 7) / 2
    distance = along_path_distance(can_bus[:, SPEED], can_bus[:, ACCELERATION], times)
    expected = arc_positions(distance, can_bus[:, SPEED], np.radians(can_bus[:, YAW_RATE]))
    np.testing.assert_allclose(dataset["ego_waypoints"], expected, rtol=1e-4, atol=1e-4)
    assert not np.abs(dataset["scene_queries"][:, 0, :8]).any()


def test_a_stop_line_is_only_in_scene_query_zero_and_stops_the_car(synthetic):
    synthetic = synthetic[:]
    scene = synthetic["scene_queries"]
    has_stop_line = scene[:, 0, 0] == 1.0
    assert 0.35 < has_stop_line.mean() < 0.65
    waypoints = synthetic["ego_waypoints"]
    travelled = np.linalg.norm(waypoints[:, -1], axis=-1)
    stop_distance = scene[:, 0, 3] * 10.0
    assert (travelled[has_stop_line] <= stop_distance[has_stop_line] - 1.0 + 1e-3).all()
    # The CAN bus carries no trace of the stop line: its noise entries look alike with or without one.
    noise = synthetic["can_bus"][:, 3:]
    assert abs(noise[has_stop_line].mean() - noise[~has_stop_line].mean()) < 0.02


def test_the_constant_velocity_baseline_misses_the_stops(synthetic):
    synthetic = synthetic[:]
    baseline = constant_velocity_waypoints(synthetic["can_bus"])
    error_3s = np.linalg.norm(baseline[:, -1] - synthetic["ego_waypoints"][:, -1], axis=-1)
    has_stop_line = synthetic["scene_queries"][:, 0, 0] == 1.0
    assert error_3s[has_stop_line].mean() > 4 * error_3s[~has_stop_line].mean()
    assert error_3s.mean() > 3.0


def test_users_records_load_from_parquet_and_json(tmp_path):
    records = synthetic_driving_dataset(6, seed=2, with_answers=False)
    records.to_parquet(tmp_path / "train.parquet")
    with open(tmp_path / "val.jsonl", "w") as file:
        for record in records.with_format("numpy"):
            file.write(json.dumps({key: np.asarray(value).tolist() for key, value in record.items()}) + "\n")
    for path in (tmp_path / "train.parquet", tmp_path / "val.jsonl"):
        loaded = load_driving_dataset(str(path)).with_format("numpy")
        assert len(loaded) == 6
        np.testing.assert_allclose(np.stack(loaded["ego_waypoints"]), np.asarray(records["ego_waypoints"]))


BAD_RECORDS = {
    "missing field": (
        lambda r: r.pop("can_bus"),
        r"Record 2 \(id='synthetic-4-2'\): missing field\(s\) \['can_bus'\]",
    ),
    "waypoint count": (
        lambda r: r.update(ego_waypoints=r["ego_waypoints"][:5]),
        r"Record 2 .*ego_waypoints must have shape \(6, 2\), got \(5, 2\)",
    ),
    "nan feature": (
        lambda r: r["scene_queries"][1].__setitem__(7, float("nan")),
        r"Record 2 .*scene_queries contains NaN or inf",
    ),
    "prompt without ego token": (
        lambda r: r.update(prompt="Plan the trajectory."),
        r"Record 2 .*prompt must hold exactly one <ego_wp>, got 0",
    ),
    "ragged scene queries": (
        lambda r: r["scene_queries"].__setitem__(0, [1.0]),
        r"Record 2 .*scene_queries is not a numeric array",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_a_bad_record_in_a_file_is_rejected_with_its_index(tmp_path, case):
    records = [
        {key: np.asarray(value).tolist() for key, value in record.items()}
        for record in synthetic_driving_dataset(4, seed=4, with_answers=False).with_format("numpy")
    ]
    mutate, message = BAD_RECORDS[case]
    mutate(records[2])
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    with pytest.raises(ValueError, match=message):
        load_driving_dataset(str(path))


def test_unknown_file_types_are_errors():
    with pytest.raises(ValueError, match=r"\.parquet, \.json or \.jsonl"):
        load_driving_dataset("records.csv")


def test_invalid_generator_settings_are_errors():
    with pytest.raises(ValueError, match=r"num_samples, num_scene_queries and num_history_queries must be positive"):
        synthetic_driving_dataset(0)


def test_the_l2_metric_follows_both_conventions():
    metric = load_metric("trajectory_l2")
    references = np.zeros((2, 6, 2))
    predictions = np.zeros((2, 6, 2))
    predictions[:, :, 0] = np.arange(1, 7)  # an error of k metres at waypoint k
    point = metric.compute(predictions=predictions, references=references)
    assert point == pytest.approx({"L2@1s": 2.0, "L2@2s": 4.0, "L2@3s": 6.0, "ADE": 3.5, "FDE": 6.0})
    stp3 = metric.compute(predictions=predictions, references=references, convention="stp3")
    assert stp3 == pytest.approx({"L2@1s": 1.5, "L2@2s": 2.5, "L2@3s": 3.5, "ADE": 3.5, "FDE": 6.0})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"predictions": np.zeros((2, 6, 2)), "references": np.zeros((2, 5, 2))}, r"\(N, T, D\)"),
        ({"predictions": np.zeros((1, 6, 2)), "references": np.zeros((1, 6, 2)), "horizons": (4,)}, r"beyond"),
        ({"predictions": np.zeros((1, 6, 2)), "references": np.zeros((1, 6, 2)), "convention": "mean"}, r"point"),
    ],
)
def test_the_l2_metric_rejects_bad_inputs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_metric("trajectory_l2").compute(**kwargs)


def test_unknown_metrics_are_errors():
    with pytest.raises(ValueError, match=r"Unknown metric 'bleu'"):
        load_metric("bleu")
