"""LeRobot data sets as users have them, read as laid out: v3.0 (tasks.parquet, episode metadata, chunked parquet,
MP4 files holding several episodes) and v2.1 (tasks.jsonl, one parquet per episode); a VLA trains on the v3.0 one."""

import io
import json
import subprocess
import sys
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pandas
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlmheads.data.manipulation import decode_video_frames, lerobot_tasks, load_lerobot_dataset, load_lerobot_episodes

ROOT = Path(__file__).resolve().parents[1]
FPS = 10
SIDE = 32
TASKS = ["pick up the cube", "push the ball"]
EPISODE_LENGTHS = [5, 4, 6]
CAMERA = "observation.images.front"


def frame_pixels(global_index: int) -> np.ndarray:
    """A flat grey whose level encodes the frame's index in the video file: 12 levels apart survive H.264."""
    return np.full((SIDE, SIDE, 3), 10 + 12 * global_index, dtype=np.uint8)


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def frame_columns(episode: int, length: int, first: int) -> dict[str, list]:
    return {
        "observation.state": [[float(episode), float(step)] for step in range(length)],
        "action": [[float(episode + step), -float(step), 0.5] for step in range(length)],
        "timestamp": [step / FPS for step in range(length)],
        "frame_index": list(range(length)),
        "episode_index": [episode] * length,
        "index": list(range(first, first + length)),
        "task_index": [episode % 2] * length,
    }


@pytest.fixture(scope="module")
def lerobot_v3(tmp_path_factory) -> Path:
    """A LeRobot v3.0 folder: every episode in one data file and one MP4 per camera, as LeRobot writes them."""
    root = tmp_path_factory.mktemp("lerobot_v3")
    for folder in ("meta/episodes/chunk-000", "data/chunk-000", f"videos/{CAMERA}/chunk-000"):
        (root / folder).mkdir(parents=True)
    info = {
        "codebase_version": "v3.0",
        "fps": FPS,
        "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
        "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
        "features": {
            CAMERA: {"dtype": "video", "shape": [SIDE, SIDE, 3]},
            "observation.state": {"dtype": "float32", "shape": [2]},
            "action": {"dtype": "float32", "shape": [3]},
        },
    }
    (root / "meta" / "info.json").write_text(json.dumps(info))
    pandas.DataFrame({"task_index": [0, 1]}, index=pandas.Index(TASKS, name="task")).to_parquet(
        root / "meta" / "tasks.parquet"
    )
    columns: dict[str, list] = {}
    episodes: dict[str, list] = {"episode_index": [], "length": []}
    prefix = f"videos/{CAMERA}/"
    for key in ("chunk_index", "file_index", "from_timestamp", "to_timestamp"):
        episodes[prefix + key] = []
    first = 0
    for episode, length in enumerate(EPISODE_LENGTHS):
        for name, values in frame_columns(episode, length, first).items():
            columns.setdefault(name, []).extend(values)
        episodes["episode_index"].append(episode)
        episodes["length"].append(length)
        for key, value in (("chunk_index", 0), ("file_index", 0), ("from_timestamp", first / FPS)):
            episodes[prefix + key].append(value)
        episodes[prefix + "to_timestamp"].append((first + length) / FPS)
        first += length
    pq.write_table(pa.table(columns), root / "data" / "chunk-000" / "file-000.parquet")
    pq.write_table(pa.table(episodes), root / "meta" / "episodes" / "chunk-000" / "file-000.parquet")
    writer = imageio_ffmpeg.write_frames(
        str(root / "videos" / CAMERA / "chunk-000" / "file-000.mp4"), (SIDE, SIDE), fps=FPS, quality=10
    )
    writer.send(None)
    for index in range(first):
        writer.send(frame_pixels(index).tobytes())
    writer.close()
    return root


def test_v3_frames_come_from_the_video_at_each_timestamp(lerobot_v3):
    records = load_lerobot_dataset(lerobot_v3, chunk_size=2)
    assert len(records) == sum(EPISODE_LENGTHS)
    assert lerobot_tasks(lerobot_v3) == {0: TASKS[0], 1: TASKS[1]}
    first = 0
    for episode, length in enumerate(EPISODE_LENGTHS):
        for step in range(length):
            record = records[first + step]
            assert record["id"] == f"episode-{episode}-frame-{step}"
            assert record["instruction"] == TASKS[episode % 2]
            level = np.asarray(record["images"][0]).mean()
            assert abs(level - (10 + 12 * (first + step))) < 4, (episode, step, level)
            assert record["state"] == [float(episode), float(step)]
            following = min(step + 1, length - 1)
            np.testing.assert_allclose(
                record["actions"], [[episode + step, -step, 0.5], [episode + following, -following, 0.5]]
            )
        first += length


def test_keys_are_chosen_by_flag_and_checked(lerobot_v3):
    records = load_lerobot_dataset(lerobot_v3, image_keys=[CAMERA], state_key="no.state")
    assert "state" not in records.column_names
    with pytest.raises(ValueError, match=r"no feature \['observation.images.wrist'\]"):
        load_lerobot_dataset(lerobot_v3, image_keys=["observation.images.wrist"])
    with pytest.raises(FileNotFoundError, match=r"--train_files: no such folder or file: /no/such/lerobot"):
        load_lerobot_dataset("/no/such/lerobot")


def test_a_timestamp_past_the_video_is_named(lerobot_v3):
    video = lerobot_v3 / "videos" / CAMERA / "chunk-000" / "file-000.mp4"
    with pytest.raises(ValueError, match=r"file-000.mp4: no frame at 9.000 s"):
        decode_video_frames(video, [0.0, 9.0])


def test_v2_1_tasks_jsonl_and_one_parquet_per_episode(tmp_path):
    (tmp_path / "meta").mkdir()
    (tmp_path / "data" / "chunk-000").mkdir(parents=True)
    info = {
        "codebase_version": "v2.1",
        "fps": FPS,
        "chunks_size": 1000,
        "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
        "features": {
            "observation.images.top": {"dtype": "image", "shape": [SIDE, SIDE, 3]},
            "observation.state": {"dtype": "float32", "shape": [2]},
            "action": {"dtype": "float32", "shape": [3]},
        },
    }
    (tmp_path / "meta" / "info.json").write_text(json.dumps(info))
    (tmp_path / "meta" / "tasks.jsonl").write_text(
        "".join(json.dumps({"task_index": i, "task": t}) + "\n" for i, t in enumerate(TASKS))
    )
    first = 0
    for episode, length in enumerate(EPISODE_LENGTHS[:2]):
        columns = frame_columns(episode, length, first)
        # LeRobot embeds image features in the parquet as {"bytes", "path"}.
        columns["observation.images.top"] = [
            {"bytes": png_bytes(frame_pixels(first + step)), "path": f"frame-{first + step}.png"}
            for step in range(length)
        ]
        pq.write_table(pa.table(columns), tmp_path / "data" / "chunk-000" / f"episode_{episode:06d}.parquet")
        first += length
    records = load_lerobot_dataset(tmp_path)
    assert len(records) == sum(EPISODE_LENGTHS[:2])
    assert [records[0]["instruction"], records[-1]["instruction"]] == TASKS
    assert np.asarray(records[6]["images"][0]).mean() == 10 + 12 * 6


def test_a_missing_image_file_is_named(tmp_path):
    table = tmp_path / "episodes.parquet"
    pq.write_table(pa.table({"observation.images.top": ["gone.png"], "action": [[1.0]], "task": ["x"]}), table)
    with pytest.raises(FileNotFoundError, match=rf"no such file: {tmp_path / 'gone.png'}"):
        load_lerobot_episodes(str(table))


@pytest.mark.slow
def test_a_vla_trains_on_a_lerobot_v3_folder_with_videos(lerobot_v3, tmp_path):
    arguments = ["--train_files", str(lerobot_v3), "--image_keys", CAMERA, "--chunk_size", "2", "--max_steps", "2"]
    arguments += ["--per_device_train_batch_size", "4", "--output_dir", str(tmp_path), "--disable_tqdm", "true"]
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_vla.py"), *arguments],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "reloaded with AutoModel: same actions" in result.stdout
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["action_dim"] == 3 and config["state_dim"] == 2 and config["chunk_size"] == 2
