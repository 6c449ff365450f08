"""Driving samples for the Orion models: the record schema, its checks, and a learnable synthetic set.

A driving record is one planning sample:

| field | type | meaning |
|---|---|---|
| `id` | str | unique name of the sample, used in error messages |
| `scene_queries` | (Ns, Ds) float | the perception module's scene queries |
| `history_queries` | (Nh, Dh) float | the temporal memory's history queries |
| `can_bus` | (Dc,) float | the ego CAN-bus state |
| `prompt` | str | the user turn; holds `<ego_wp>` where the trajectory is read (see below) |
| `ego_waypoints` | (T, 2) float | future ego positions in the ego frame (x forward, y left, metres), at 2 Hz |
| `answer` | str, optional | the assistant's text answer, trained with the language-model loss |
| `images` | list of images, optional | camera images, placed before the prompt text |
| `command` | int, optional | navigation command, for models with one trajectory mode per command |

The prompt may place `<scene>`, `<history>` and `<can_bus>` itself; otherwise the collator puts them first.
Users' data in this schema loads with `load_driving_dataset(path)` (parquet, json or jsonl through
`datasets.load_dataset`), which checks every record.
"""

import datasets
import numpy as np
import pyarrow as pa
from datasets.formatting import NumpyFormatter

from ..processing.collator_orion_qwen import FEATURE_RANKS, REQUIRED_FIELDS, check_driving_record

# The numeric fields of a record, best read as numpy arrays: `dataset.with_format("numpy", columns=ARRAY_FIELDS)`.
ARRAY_FIELDS = tuple(FEATURE_RANKS)
# The synthetic CAN-bus layout: speed (m/s), acceleration (m/s²) and yaw rate (deg/s) are the entries the
# kinematics read; the other entries are unrelated signals.
SPEED, ACCELERATION, YAW_RATE = 0, 1, 2
WAYPOINT_HZ = 2
PROMPT = "Plan a safe trajectory for the ego car.<ego_wp>"


def _batch_passes(batch: dict, size: int, num_waypoints: int = 6, waypoint_dim: int = 2, ego_token: str = "<ego_wp>"):
    """A vectorised check of a numpy-formatted batch: True only if every record in it is good (False may be wrong)."""
    for name, rank in FEATURE_RANKS.items():
        values = batch.get(name)
        if not isinstance(values, np.ndarray) or values.dtype.kind not in "fiu" or values.ndim != rank + 1:
            return False
        # NaN and inf make the sum non-finite; a sum that overflows only sends the batch to the exact check.
        if len(values) != size or 0 in values.shape[1:] or not np.isfinite(values.sum()):
            return False
    if batch["ego_waypoints"].shape[1:] != (num_waypoints, waypoint_dim):
        return False
    ids, prompts = batch.get("id"), batch.get("prompt")
    if ids is None or prompts is None or any(record_id is None for record_id in ids):
        return False
    return all(prompt is not None and prompt.count(ego_token) == 1 for prompt in prompts)


def _check_batch(table: pa.Table, indices: list[int], features: datasets.Features, record_settings: dict) -> None:
    arrays = [name for name in ARRAY_FIELDS if name in table.column_names]
    if any(table.column(name).null_count for name in arrays):
        records = table.to_pylist()
    else:
        batch = NumpyFormatter(features=features).format_batch(table)
        if _batch_passes(batch, len(indices), **record_settings):
            return
        records = [{name: column[position] for name, column in batch.items()} for position in range(len(indices))]
    for index, record in zip(indices, records, strict=True):
        try:
            check_driving_record(record, **record_settings)
        except ValueError as error:
            record_id = None if record.get("id") is None else str(record["id"])
            raise ValueError(f"Record {index} (id={record_id!r}): {error}.") from None


def check_driving_dataset(
    dataset: datasets.Dataset, num_proc: int | None = None, batch_size: int = 64, **record_settings
) -> None:
    """Checks every record with `Dataset.map(batched=True, num_proc=num_proc)` and a progress bar; raises a
    `ValueError` naming the first bad record's index, id and what is wrong with it.

    `record_settings` go to `check_driving_record` (`num_waypoints`, `waypoint_dim`, `ego_token`). Each batch is
    checked at once on numpy arrays (B, Ns, Ds); only a batch that fails, or holds missing values, is checked record
    by record.
    """
    present = [name for name in REQUIRED_FIELDS if name in dataset.column_names]
    records = dataset.select_columns(present)
    records.with_format("arrow").map(
        _check_batch,
        batched=True,
        batch_size=batch_size,
        with_indices=True,
        num_proc=num_proc,
        fn_kwargs={"features": records.features, "record_settings": record_settings},
        desc="Checking driving records",
    )


def load_driving_dataset(
    data_files: str | list[str], num_proc: int | None = None, **record_settings
) -> datasets.Dataset:
    """Loads driving records from parquet, json or jsonl files and checks every one of them (`num_proc` processes)."""
    files = [data_files] if isinstance(data_files, str) else list(data_files)
    suffixes = {file.rsplit(".", 1)[-1] for file in files}
    formats = {"parquet": "parquet", "json": "json", "jsonl": "json"}
    if len(suffixes) != 1 or next(iter(suffixes)) not in formats:
        raise ValueError(f"data_files must all be .parquet, .json or .jsonl files, got {files}.")
    dataset = datasets.load_dataset(formats[suffixes.pop()], data_files=files, split="train", num_proc=num_proc)
    check_driving_dataset(dataset, num_proc=num_proc, **record_settings)
    return dataset


def along_path_distance(speed: np.ndarray, acceleration: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Distance travelled at constant acceleration, stopping (not reversing) at zero speed.

    `speed` (N,), `acceleration` (N,), `times` (T,) → (N, T).
    """
    times = times[None, :]
    speed, acceleration = speed[:, None], acceleration[:, None]
    braking = acceleration < 0
    stop_time = np.where(braking, speed / np.where(braking, -acceleration, 1.0), np.inf)
    moving = speed * times + 0.5 * acceleration * times**2
    stopped = speed**2 / (2 * np.where(braking, -acceleration, 1.0))
    return np.where(times < stop_time, moving, stopped)


def arc_positions(distance: np.ndarray, speed: np.ndarray, yaw_rate: np.ndarray) -> np.ndarray:
    """Ego-frame points after `distance` (N, T) along an arc of curvature yaw_rate / speed: → (N, T, 2)."""
    curvature = (yaw_rate / np.maximum(speed, 0.5))[:, None]
    straight = np.abs(curvature) < 1e-6
    safe = np.where(straight, 1.0, curvature)
    x = np.where(straight, distance, np.sin(curvature * distance) / safe)
    y = np.where(straight, 0.5 * curvature * distance**2, (1 - np.cos(curvature * distance)) / safe)
    return np.stack([x, y], axis=-1)


def constant_velocity_waypoints(
    can_bus: np.ndarray, num_waypoints: int = 6, waypoint_hz: float = WAYPOINT_HZ
) -> np.ndarray:
    """The baseline: keep the CAN-bus speed and yaw rate. (N, Dc) → (N, T, 2), synthetic CAN-bus layout."""
    can_bus = np.asarray(can_bus, dtype=np.float64)
    times = np.arange(1, num_waypoints + 1) / waypoint_hz
    speed = can_bus[:, SPEED]
    return arc_positions(speed[:, None] * times[None, :], speed, np.radians(can_bus[:, YAW_RATE]))


def synthetic_driving_dataset(
    num_samples: int,
    seed: int = 0,
    num_scene_queries: int = 16,
    num_history_queries: int = 4,
    query_dim: int = 256,
    can_bus_dim: int = 89,
    num_waypoints: int = 6,
    stop_line_probability: float = 0.5,
    with_answers: bool = True,
) -> datasets.Dataset:
    """A learnable driving set whose future depends on the CAN bus *and* on the scene.

    The ego car follows an arc set by its CAN-bus speed and yaw rate, with the CAN-bus acceleration, unless the
    scene holds a stop line: then it brakes evenly to stop one metre before it. The stop line (presence and
    distance) is written only into scene query 0; the other scene queries and the unrelated CAN-bus entries are
    noise, and the history queries encode past speeds. Keeping the CAN-bus speed (the constant-velocity
    baseline) therefore misses every stop, and only a model that reads both inputs can do much better.
    """
    if num_samples < 1 or num_scene_queries < 1 or num_history_queries < 1 or query_dim < 8 or can_bus_dim < 3:
        raise ValueError(
            "num_samples, num_scene_queries and num_history_queries must be positive, query_dim at least 8 and "
            f"can_bus_dim at least 3; got {num_samples}, {num_scene_queries}, {num_history_queries}, {query_dim}, "
            f"{can_bus_dim}."
        )
    rng = np.random.default_rng(seed)
    speed = rng.uniform(2.0, 12.0, num_samples)
    acceleration = rng.uniform(-1.0, 1.0, num_samples)
    yaw_rate = np.clip(rng.normal(0.0, 0.1, num_samples), -0.3, 0.3)
    has_stop_line = rng.random(num_samples) < stop_line_probability
    stop_distance = rng.uniform(3.0, 25.0, num_samples)

    times = np.arange(1, num_waypoints + 1) / WAYPOINT_HZ
    braking = -(speed**2) / (2 * np.maximum(stop_distance - 1.0, 0.5))
    distance = along_path_distance(speed, np.where(has_stop_line, braking, acceleration), times)
    waypoints = arc_positions(distance, speed, yaw_rate)

    can_bus = rng.normal(0.0, 0.1, (num_samples, can_bus_dim))
    can_bus[:, SPEED], can_bus[:, ACCELERATION], can_bus[:, YAW_RATE] = speed, acceleration, np.degrees(yaw_rate)

    scene = rng.normal(0.0, 1.0, (num_samples, num_scene_queries, query_dim))
    scene[:, 0] = rng.normal(0.0, 0.1, (num_samples, query_dim))
    present = has_stop_line.astype(np.float64)
    closeness = present * (1.0 - stop_distance / 25.0)
    scene[:, 0, :8] = np.stack([present, closeness, closeness**2, present * stop_distance / 10.0] * 2, axis=-1)

    past_times = -np.arange(1, num_history_queries + 1) / WAYPOINT_HZ
    history = rng.normal(0.0, 0.1, (num_samples, num_history_queries, query_dim))
    history[:, :, 0] = np.maximum(speed[:, None] + acceleration[:, None] * past_times[None, :], 0.0)

    answers = [
        f"Stop line in {d:.0f} m: braking to stop before it." if stop else f"Road clear: keeping about {v:.0f} m/s."
        for stop, d, v in zip(has_stop_line, stop_distance, speed, strict=True)
    ]
    columns = {
        "id": [f"synthetic-{seed}-{index}" for index in range(num_samples)],
        "scene_queries": scene.astype(np.float32),
        "history_queries": history.astype(np.float32),
        "can_bus": can_bus.astype(np.float32),
        "prompt": [PROMPT] * num_samples,
        "ego_waypoints": waypoints.astype(np.float32),
    }
    features = {
        "id": datasets.Value("string"),
        "scene_queries": datasets.Array2D((num_scene_queries, query_dim), "float32"),
        "history_queries": datasets.Array2D((num_history_queries, query_dim), "float32"),
        "can_bus": datasets.List(datasets.Value("float32"), length=can_bus_dim),
        "prompt": datasets.Value("string"),
        "ego_waypoints": datasets.Array2D((num_waypoints, 2), "float32"),
    }
    if with_answers:
        columns["answer"], features["answer"] = answers, datasets.Value("string")
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))
