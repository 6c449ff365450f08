"""Robot manipulation samples for the VLA: the record schema, a learnable synthetic set and a LeRobot loader.

A manipulation record is one step of a robot episode:

| field | type | meaning |
|---|---|---|
| `id` | str | unique name of the sample, used in error messages |
| `images` | list of images | the camera images at this step (one per camera, same cameras in every record) |
| `instruction` | str | the task in words, e.g. "pick up the red cube" |
| `state` | (S,) float, optional | the proprioceptive state (e.g. gripper position) |
| `actions` | (T, D) float | the action chunk to take from this step: T actions of D dimensions |

`synthetic_manipulation_dataset` draws a table top with a few coloured objects and asks for one of them: the action
is the displacement from the gripper to the named object, so neither the image nor the instruction alone gives it.
`load_lerobot_episodes` reads a LeRobot-format episode table (parquet with `observation.images.*`,
`observation.state`, `action`, `task`) into the same records, through `datasets`.
"""

import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from PIL import Image, ImageDraw

from .sources import hub_dataset_folder, local_or_hub

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230)}
SHAPES = ("cube", "ball")
# Where the instruction asks the gripper to go, next to the named object: offsets in grid cells (x right, y down).
DIRECTIONS = {"left of": (-0.5, 0.0), "right of": (0.5, 0.0), "above": (0.0, -0.5), "below": (0.0, 0.5)}
BACKGROUND = (190, 190, 180)
# Action dimensions of the synthetic set: the gripper's displacement x (right) and y (down), in half image widths.
SYNTHETIC_ACTION_NAMES = ("dx", "dy")


def draw_scene(objects: Sequence[tuple[str, str, float, float]], image_size: int, object_size: float) -> Image.Image:
    """A table-top image: `objects` as (colour, shape, x, y) with x, y in [-1, 1] (right, down), each `object_size`
    pixels wide."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    radius = object_size / 2
    for color, shape, x, y in objects:
        center_x, center_y = (x + 1) / 2 * image_size, (y + 1) / 2 * image_size
        box = (center_x - radius, center_y - radius, center_x + radius - 1, center_y + radius - 1)
        (draw.rectangle if shape == "cube" else draw.ellipse)(box, fill=COLORS[color])
    return image


def synthetic_manipulation_dataset(
    num_samples: int,
    seed: int = 0,
    image_size: int = 32,
    grid_size: int = 2,
    num_distractors: int = 0,
    chunk_size: int = 1,
    with_state: bool = False,
) -> datasets.Dataset:
    """A learnable manipulation set whose actions depend on the image *and* on the instruction.

    Each image shows a coloured object (red, green or blue; cube or ball) in one cell of a `grid_size` x `grid_size`
    grid over an `image_size` pixel table top, and `num_distractors` objects of the other colours in other cells.
    The instruction names the object and a side of it: "move left of the red cube", "move below the blue ball".
    The action chunk (chunk_size, 2) brings the gripper to that side, half a cell from the object's centre, in equal
    steps: step t is (t + 1) / chunk_size of the displacement (dx, dy) from the gripper (image coordinates in
    [-1, 1], x right, y down). The gripper starts at the centre, or, `with_state`, at a random position given as
    `state` (x, y).

    Without the image the object's position is unknown; without the instruction, the side (and, with distractors,
    the object).
    """
    if num_samples < 1 or grid_size < 2 or chunk_size < 1 or not 0 <= num_distractors < len(COLORS):
        raise ValueError(
            f"num_samples and chunk_size must be positive, grid_size at least 2 and num_distractors within "
            f"0..{len(COLORS) - 1}; got {num_samples}, {chunk_size}, {grid_size}, {num_distractors}."
        )
    if image_size < 4 * grid_size:
        raise ValueError(f"image_size must be at least 4 pixels per grid cell ({4 * grid_size}), got {image_size}.")
    rng = np.random.default_rng(seed)
    cell = 2 / grid_size
    num_objects = 1 + num_distractors
    directions = list(DIRECTIONS)
    columns: dict[str, list] = {"id": [], "images": [], "instruction": [], "actions": []}
    if with_state:
        columns["state"] = []
    steps = (np.arange(1, chunk_size + 1) / chunk_size)[:, None]
    for index in range(num_samples):
        cells = rng.choice(grid_size * grid_size, size=num_objects, replace=False)
        jitter = rng.uniform(-0.1, 0.1, size=(num_objects, 2)) * cell
        positions = np.stack([cells % grid_size, cells // grid_size], axis=1) * cell - 1 + cell / 2 + jitter
        colors = rng.choice(list(COLORS), size=num_objects, replace=False)
        shapes = rng.choice(SHAPES, size=num_objects)
        direction = directions[rng.integers(len(directions))]
        gripper = rng.uniform(-0.75, 0.75, size=2) if with_state else np.zeros(2)
        drawn = zip(colors, shapes, positions, strict=True)
        objects = [(str(color), str(shape), float(x), float(y)) for color, shape, (x, y) in drawn]
        goal = positions[0] + np.asarray(DIRECTIONS[direction]) * cell
        columns["id"].append(f"synthetic-{seed}-{index}")
        columns["images"].append([draw_scene(objects, image_size, 0.8 * image_size / grid_size)])
        columns["instruction"].append(f"move {direction} the {colors[0]} {shapes[0]}")
        columns["actions"].append((steps * (goal - gripper)).astype(np.float32))
        if with_state:
            columns["state"].append(gripper.astype(np.float32).tolist())
    features = {
        "id": datasets.Value("string"),
        "images": datasets.List(datasets.Image()),
        "instruction": datasets.Value("string"),
        "actions": datasets.Array2D((chunk_size, len(SYNTHETIC_ACTION_NAMES)), "float32"),
    }
    if with_state:
        features["state"] = datasets.List(datasets.Value("float32"), length=2)
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def _open_image(value: Any, folder: Path) -> Image.Image:
    """A LeRobot image cell as a PIL image: a PIL image, `{"bytes", "path"}`, raw bytes or a path (relative to the
    table's folder)."""
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, Mapping):
        if value.get("bytes"):
            return _open_image(value["bytes"], folder)
        if value.get("path"):
            return _open_image(value["path"], folder)
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value)).convert("RGB")
    if isinstance(value, str):
        path = Path(value) if Path(value).is_absolute() else folder / value
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        return Image.open(path).convert("RGB")
    raise ValueError(f"cannot read an image from a {type(value).__name__}: expected PIL, bytes or a path")


def load_lerobot_episodes(
    data_files: str | Sequence[str],
    chunk_size: int = 1,
    image_keys: Sequence[str] | None = None,
    tasks: Mapping[int, str] | None = None,
    state_key: str = "observation.state",
    action_key: str = "action",
) -> datasets.Dataset:
    """Reads LeRobot-format episode tables (parquet) into manipulation records.

    Each row is one frame: `observation.images.<camera>` (an image as PIL, `{"bytes", "path"}`, bytes or a path
    relative to the file), `state_key` (S,), `action_key` (D,), and `task` (str) or `task_index` with `tasks`
    (LeRobot's meta/tasks.jsonl as {index: task}); `episode_index` and `frame_index` order the frames (one episode
    if absent). The action chunk of a frame holds its action and the next `chunk_size - 1` of its episode, the last
    action repeated past the episode's end (LeRobot pads the same way). `image_keys` picks and orders the cameras
    (default: every `observation.images.*` column, sorted). A whole LeRobot data set folder (v2.1 or v3.0, with
    videos) is read by `load_lerobot_dataset`.
    """
    files = [data_files] if isinstance(data_files, str) else list(data_files)
    if not files or any(not file.endswith(".parquet") for file in files):
        raise ValueError(f"data_files must be .parquet files, got {files}.")
    missing = [file for file in files if not Path(file).is_file()]
    if missing:
        raise FileNotFoundError(f"no such file: {missing[0]}")
    table = datasets.load_dataset("parquet", data_files=files, split="train")
    cameras = list(image_keys or sorted(name for name in table.column_names if name.startswith("observation.images.")))
    folder = Path(files[0]).parent
    return _frames_to_records(
        table, cameras, tasks, chunk_size, state_key, action_key, lambda row, camera: _open_image(row[camera], folder)
    )


def _frames_to_records(
    table: datasets.Dataset,
    cameras: list[str],
    tasks: Mapping[int, str] | None,
    chunk_size: int,
    state_key: str,
    action_key: str,
    image_of: Any,
) -> datasets.Dataset:
    """LeRobot frames (rows of `table`) → manipulation records; `image_of(row, camera)` gives a frame's image."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}.")
    columns_present = set(table.column_names) | set(getattr(table, "video_keys", ()))
    missing = [name for name in (*cameras, action_key) if name not in columns_present]
    if not cameras or missing:
        raise ValueError(
            f"A LeRobot table needs observation.images.* camera columns (or --image_keys) and the action column "
            f"{action_key!r} (--action_key); missing {missing or 'cameras'} in columns {table.column_names}."
        )
    if "task" not in table.column_names and ("task_index" not in table.column_names or tasks is None):
        raise ValueError("A LeRobot table needs a task column, or task_index with tasks={index: task}.")
    episodes: dict[int, list[dict]] = {}
    for row in table.to_list():
        episodes.setdefault(int(row.get("episode_index", 0)), []).append(row)
    columns: dict[str, list] = {"id": [], "images": [], "instruction": [], "actions": []}
    has_state = state_key in table.column_names
    if has_state:
        columns["state"] = []
    for episode, frames in sorted(episodes.items()):
        frames.sort(key=lambda frame: frame.get("frame_index", 0))
        actions = np.asarray([frame[action_key] for frame in frames], dtype=np.float32)
        if actions.ndim != 2:
            raise ValueError(f"episode {episode}: {action_key} must be a vector per frame, got shape {actions.shape}.")
        for position, frame in enumerate(frames):
            chunk = [actions[min(position + step, len(frames) - 1)] for step in range(chunk_size)]
            columns["id"].append(f"episode-{episode}-frame-{frame.get('frame_index', position)}")
            columns["images"].append([image_of(frame, camera) for camera in cameras])
            task_index = frame.get("task_index")
            if "task" in frame:
                task = frame["task"]
            elif int(task_index) in tasks:
                task = tasks[int(task_index)]
            else:
                raise ValueError(f"episode {episode}: task_index {task_index} is not in the task table {dict(tasks)}.")
            columns["instruction"].append(task)
            columns["actions"].append(np.stack(chunk))
            if has_state:
                columns["state"].append(np.asarray(frame[state_key], dtype=np.float32).tolist())
    action_dim = columns["actions"][0].shape[1]
    features = {
        "id": datasets.Value("string"),
        "images": datasets.List(datasets.Image()),
        "instruction": datasets.Value("string"),
        "actions": datasets.Array2D((chunk_size, action_dim), "float32"),
    }
    if has_state:
        features["state"] = datasets.List(datasets.Value("float32"))
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def lerobot_tasks(folder: str | Path) -> dict[int, str]:
    """A LeRobot data set's task table {task_index: task}: `meta/tasks.parquet` (v3.0) or `meta/tasks.jsonl` (v2.x)."""
    meta = Path(folder) / "meta"
    if (meta / "tasks.parquet").is_file():
        import pandas

        # v3.0 writes the tasks as the pandas index of a task_index column.
        frame = pandas.read_parquet(meta / "tasks.parquet").reset_index()
        task_column = "task" if "task" in frame.columns else frame.columns[0]
        return {int(index): str(task) for index, task in zip(frame["task_index"], frame[task_column], strict=True)}
    if (meta / "tasks.jsonl").is_file():
        lines = (meta / "tasks.jsonl").read_text().splitlines()
        return {int(entry["task_index"]): entry["task"] for entry in map(json.loads, filter(str.strip, lines))}
    raise FileNotFoundError(f"no such file: {meta / 'tasks.parquet'} (v3.0) or {meta / 'tasks.jsonl'} (v2.x)")


def decode_video_frames(path: Path, timestamps: Sequence[float]) -> dict[float, Image.Image]:
    """The frames of an MP4 (any codec ffmpeg reads) nearest to each timestamp in seconds, as RGB PIL images.

    Decoded with imageio-ffmpeg, which ships its own ffmpeg binary: it needs no system FFmpeg (torchcodec does) and
    no PyAV (torchvision's reader, deprecated since 0.22). A timestamp more than half a frame past the video's end
    is a `ValueError` naming the file.
    """
    try:
        import imageio_ffmpeg
    except ImportError as error:
        raise ImportError('LeRobot videos are decoded with imageio-ffmpeg: pip install "vlmheads[video]"') from error
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    fps, (width, height) = float(meta["fps"]), meta["size"]
    wanted: dict[int, list[float]] = {}
    for timestamp in timestamps:
        wanted.setdefault(round(timestamp * fps), []).append(timestamp)
    frames: dict[float, Image.Image] = {}
    for index, raw in enumerate(reader):
        if index in wanted:
            image = Image.frombytes("RGB", (width, height), raw)
            frames.update(dict.fromkeys(wanted.pop(index), image))
        if not wanted:
            reader.close()
            break
    if wanted:
        late = sorted(stamp for stamps in wanted.values() for stamp in stamps)
        raise ValueError(f"{path}: no frame at {late[0]:.3f} s ({fps:g} fps, {index + 1} frames).")
    return frames


def _episode_table(folder: Path) -> dict[int, dict]:
    """v3.0's per-episode metadata (`meta/episodes/**/*.parquet`) by episode index; {} for v2.x."""
    files = sorted((folder / "meta" / "episodes").glob("**/*.parquet"))
    if not files:
        return {}
    rows = datasets.load_dataset("parquet", data_files=[str(file) for file in files], split="train").to_list()
    return {int(row["episode_index"]): row for row in rows}


def load_lerobot_dataset(
    source: str | Path,
    chunk_size: int = 1,
    image_keys: Sequence[str] | None = None,
    state_key: str = "observation.state",
    action_key: str = "action",
    what: str = "--train_files",
) -> datasets.Dataset:
    """A LeRobot data set as laid out, v2.1 or v3.0: a folder with `meta/info.json`, or a Hub data set id.

    - v2.x: `meta/tasks.jsonl`, one parquet per episode (`data/chunk-*/episode_*.parquet`), one MP4 per episode
      and camera (`videos/chunk-*/<camera>/episode_*.mp4`);
    - v3.0: `meta/tasks.parquet`, `meta/episodes/chunk-*/file-*.parquet` (which file and time span of each video
      holds an episode), chunked parquet files of many episodes, MP4 files of many episodes per camera.

    Camera features of dtype `video` are decoded at each frame's `timestamp` (plus the episode's start in the file,
    v3.0); dtype `image` are read from the parquet. `image_keys` picks and orders the cameras (default: every image
    or video feature, sorted); `state_key` and `action_key` name the state and action features. Records as
    `load_lerobot_episodes`.
    """
    where = local_or_hub(source, what)
    folder = hub_dataset_folder(where, what) if isinstance(where, str) else where
    info_file = folder / "meta" / "info.json"
    if not info_file.is_file():
        raise FileNotFoundError(f"{what} {source}: no such file: {info_file} (a LeRobot data set folder holds meta/).")
    info = json.loads(info_file.read_text())
    features = info.get("features", {})
    kinds = {name: feature.get("dtype") for name, feature in features.items()}
    cameras = list(image_keys or sorted(name for name, kind in kinds.items() if kind in ("video", "image")))
    unknown = [name for name in (*cameras, action_key) if name not in kinds]
    if unknown:
        raise ValueError(f"{info_file}: no feature {unknown}; its features are {sorted(kinds)}.")
    data_files = sorted(str(file) for file in (folder / "data").glob("**/*.parquet"))
    if not data_files:
        raise FileNotFoundError(f"{what} {source}: no parquet files under {folder / 'data'}.")
    table = datasets.load_dataset("parquet", data_files=data_files, split="train")
    episodes = _episode_table(folder)
    videos = [camera for camera in cameras if kinds[camera] == "video"]

    def video_file(camera: str, episode: int) -> tuple[Path, float]:
        """The MP4 that holds `episode` for `camera`, and the episode's start time in it."""
        if episodes:  # v3.0: many episodes per file
            entry = episodes[episode]
            prefix = f"videos/{camera}/"
            path = info["video_path"].format(
                video_key=camera, chunk_index=entry[f"{prefix}chunk_index"], file_index=entry[f"{prefix}file_index"]
            )
            return folder / path, float(entry[f"{prefix}from_timestamp"])
        chunk = episode // int(info.get("chunks_size", 1000))
        path = info["video_path"].format(episode_chunk=chunk, video_key=camera, episode_index=episode)
        return folder / path, 0.0

    decoded: dict[tuple[str, int, float], Image.Image] = {}
    if videos:
        requests: dict[Path, list[tuple[str, int, float, float]]] = {}
        for episode, timestamp in zip(table["episode_index"], table["timestamp"], strict=True):
            for camera in videos:
                path, start = video_file(camera, int(episode))
                requests.setdefault(path, []).append(
                    (camera, int(episode), float(timestamp), start + float(timestamp))
                )
        for path, wanted in requests.items():
            frames = decode_video_frames(path, [at for *_, at in wanted])
            decoded.update({(camera, episode, stamp): frames[at] for camera, episode, stamp, at in wanted})

    def image_of(row: dict, camera: str) -> Image.Image:
        if kinds[camera] == "video":
            return decoded[camera, int(row["episode_index"]), float(row["timestamp"])]
        return _open_image(row[camera], folder)

    table.video_keys = videos  # the cameras that are not parquet columns
    return _frames_to_records(table, cameras, lerobot_tasks(folder), chunk_size, state_key, action_key, image_of)
