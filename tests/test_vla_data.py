import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from vla_helpers import processor_of

from vlmheads.data.manipulation import (
    BACKGROUND,
    COLORS,
    DIRECTIONS,
    load_lerobot_episodes,
    synthetic_manipulation_dataset,
)
from vlmheads.processing.collator_vla import VLADataCollator
from vlmheads.training.vla import ActionMetrics, action_errors, mean_action_baseline


def object_center(image: Image.Image, color: str) -> np.ndarray:
    """Centre (x, y) in [-1, 1] of the pixels of one colour."""
    pixels = np.asarray(image)
    ys, xs = np.nonzero((pixels == COLORS[color]).all(axis=-1))
    size = pixels.shape[0]
    return np.array([(xs.mean() + 0.5) / size * 2 - 1, (ys.mean() + 0.5) / size * 2 - 1])


def test_the_synthetic_action_goes_to_the_named_side_of_the_drawn_object():
    dataset = synthetic_manipulation_dataset(40, seed=3, image_size=48, grid_size=3, num_distractors=2, chunk_size=4)
    assert dataset.features["actions"].shape == (4, 2)
    for record in dataset:
        words = record["instruction"].split()
        assert words[0] == "move"
        direction, color = " ".join(words[1:-3]), words[-2]
        offset = np.asarray(DIRECTIONS[direction]) * 2 / 3
        center = object_center(record["images"][0], color)
        actions = np.asarray(record["actions"])
        # The object is drawn where the action says, to within a pixel.
        np.testing.assert_allclose(actions[-1] - offset, center, atol=2 / 48 + 1e-6)
        # Equal steps: the chunk reaches the goal in 4.
        np.testing.assert_allclose(actions[0] * 4, actions[-1], atol=1e-5)
        # All three colours are drawn: the instruction's colour picks the object.
        assert all((np.asarray(record["images"][0]) == value).all(axis=-1).any() for value in COLORS.values())


def test_the_synthetic_set_is_seeded_and_the_state_moves_the_start():
    first, again = synthetic_manipulation_dataset(8, seed=5), synthetic_manipulation_dataset(8, seed=5)
    assert first["instruction"] == again["instruction"]
    np.testing.assert_array_equal(np.stack(first["actions"]), np.stack(again["actions"]))
    assert synthetic_manipulation_dataset(8, seed=6)["instruction"] != first["instruction"]
    with_state = synthetic_manipulation_dataset(30, seed=5, with_state=True)
    for record in with_state:
        color = record["instruction"].split()[-2]
        goal = np.asarray(record["actions"][0]) + np.asarray(record["state"])
        side = goal - object_center(record["images"][0], color)
        assert np.abs(side).max() == pytest.approx(0.5, abs=2 / 32 + 1e-6)


def test_neither_the_image_nor_the_instruction_alone_gives_the_action():
    dataset = synthetic_manipulation_dataset(400, seed=0)
    actions = np.stack(dataset["actions"])[:, 0]
    instructions = np.asarray(dataset["instruction"])
    images = [np.asarray(image[0]).tobytes() for image in dataset["images"]]
    # Same instruction, different actions; the best guess from the instruction alone still errs by cells.
    same_instruction = actions[instructions == instructions[0]]
    assert np.abs(same_instruction - same_instruction.mean(axis=0)).mean() > 0.3
    # The same object position with different instructions gives actions half a cell apart.
    positions = {}
    for image, action in zip(images, actions, strict=True):
        positions.setdefault(image, set()).add(tuple(np.round(action, 3)))
    assert max(len(options) for options in positions.values()) > 1


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"num_samples": 0}, "num_samples and chunk_size must be positive"),
        ({"num_samples": 4, "num_distractors": 3}, "num_distractors within 0..2"),
        ({"num_samples": 4, "grid_size": 8, "image_size": 16}, "image_size must be at least 4 pixels per grid cell"),
    ],
)
def test_bad_synthetic_settings_are_rejected(settings, message):
    with pytest.raises(ValueError, match=message):
        synthetic_manipulation_dataset(**settings)


def png_bytes(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 12), color).save(buffer, format="PNG")
    return buffer.getvalue()


def write_episodes(folder, with_task=True):
    """Two LeRobot episodes (3 and 2 frames, stored out of order): a camera as image bytes, a camera as paths."""
    frames = [(0, 2), (1, 0), (0, 0), (0, 1), (1, 1)]
    for episode, frame in frames:
        Image.new("RGB", (8, 8), (episode * 100, frame * 50, 0)).save(folder / f"wrist_{episode}_{frame}.png")
    columns = {
        "observation.images.top": [{"bytes": png_bytes((10 * e, 20 * f, 30)), "path": None} for e, f in frames],
        "observation.images.wrist": [f"wrist_{e}_{f}.png" for e, f in frames],
        "observation.state": [[float(e), float(f)] for e, f in frames],
        "action": [[float(10 * e + f), -float(f), 1.0] for e, f in frames],
        "episode_index": [e for e, _ in frames],
        "frame_index": [f for _, f in frames],
    }
    if with_task:
        columns["task"] = ["stack the cups" if e == 0 else "open the drawer" for e, _ in frames]
    else:
        columns["task_index"] = [e for e, _ in frames]
    pq.write_table(pa.table(columns), folder / "episodes.parquet")
    return str(folder / "episodes.parquet")


def test_a_lerobot_episode_table_loads_into_manipulation_records(tmp_path):
    dataset = load_lerobot_episodes(write_episodes(tmp_path), chunk_size=2)
    assert dataset["id"] == [f"episode-{e}-frame-{f}" for e, f in ((0, 0), (0, 1), (0, 2), (1, 0), (1, 1))]
    first = dataset[0]
    assert first["instruction"] == "stack the cups" and dataset[3]["instruction"] == "open the drawer"
    assert [image.size for image in first["images"]] == [(16, 12), (8, 8)]
    assert first["images"][0].getpixel((0, 0)) == (0, 0, 30)
    assert dataset[1]["images"][1].getpixel((0, 0)) == (0, 50, 0)
    assert first["state"] == [0.0, 0.0]
    # Chunks run to the next frame of the same episode; the last frame repeats its action.
    np.testing.assert_array_equal(first["actions"], [[0, 0, 1], [1, -1, 1]])
    np.testing.assert_array_equal(dataset[2]["actions"], [[2, -2, 1], [2, -2, 1]])
    np.testing.assert_array_equal(dataset[4]["actions"], [[11, -1, 1], [11, -1, 1]])
    # The cameras can be picked, and task_index with LeRobot's task list replaces the task column.
    by_index = load_lerobot_episodes(
        write_episodes(tmp_path, with_task=False),
        image_keys=["observation.images.wrist"],
        tasks={0: "stack the cups", 1: "open the drawer"},
    )
    assert by_index["instruction"] == dataset["instruction"]
    assert [image.size for image in by_index[0]["images"]] == [(8, 8)]


def test_a_lerobot_table_without_its_columns_is_rejected(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"action": [[1.0]], "task": ["x"]}), path)
    with pytest.raises(ValueError, match="needs observation.images"):
        load_lerobot_episodes(str(path))
    with pytest.raises(ValueError, match="needs a task column, or task_index"):
        load_lerobot_episodes(write_episodes(tmp_path, with_task=False))
    with pytest.raises(ValueError, match="must be .parquet files"):
        load_lerobot_episodes("episodes.csv")


def test_the_collator_uses_the_chat_template_where_there_is_one():
    samples = list(synthetic_manipulation_dataset(3, seed=0, chunk_size=2, with_state=True))
    llava = VLADataCollator(processor_of("llava"), chunk_size=2, action_dim=2, state_dim=2)
    batch = llava(samples)
    assert llava.prompt("go", 1).startswith("USER: <image>\ngo") and llava.prompt("go", 1).endswith("ASSISTANT:")
    assert batch["actions"].shape == (3, 2, 2) and batch["state"].shape == (3, 2)
    assert batch["pixel_values"].shape[0] == 3
    paligemma = VLADataCollator(processor_of("paligemma"), chunk_size=2, action_dim=2)
    batch = paligemma(samples)
    assert paligemma.prompt("go", 1) == "go" and "labels" not in batch and "state" not in batch
    image_token = processor_of("paligemma").image_token_id
    assert ((batch["input_ids"] == image_token).sum(dim=1) == 16).all()
    prediction = VLADataCollator(processor_of("paligemma"), 2, 2, with_actions=False)(samples)
    assert "actions" not in prediction


def test_the_collator_pads_on_the_left():
    samples = list(synthetic_manipulation_dataset(2, seed=0))
    samples[1] = {**samples[1], "instruction": "move left of the red cube, then wait there for a while"}
    batch = VLADataCollator(processor_of("llava"), 1, 2)(samples)
    mask = batch["attention_mask"]
    assert mask[:, -1].all() and not mask[0, 0]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda record: record.update(actions=np.zeros((1, 3))), r"actions must have shape \(1, 2\)"),
        (lambda record: record.update(actions=np.full((1, 2), np.nan)), "actions contains NaN"),
        (lambda record: record.pop("actions"), r"missing field\(s\) \['actions'\]"),
        (lambda record: record.update(images=[]), "images is empty"),
        (lambda record: record.update(instruction=" "), "instruction must be a non-empty string"),
        (lambda record: record.pop("state"), "state is missing"),
        (lambda record: record.update(state=[0.0, float("inf")]), "state contains NaN or inf"),
    ],
)
def test_bad_records_are_rejected_with_their_id(change, message):
    samples = [dict(record) for record in synthetic_manipulation_dataset(2, seed=0, with_state=True)]
    change(samples[1])
    with pytest.raises(ValueError, match=rf"id='synthetic-0-1' \(position 1 in the batch\) was rejected: {message}"):
        VLADataCollator(processor_of("paligemma"), 1, 2, state_dim=2)(samples)


def test_an_empty_batch_is_rejected():
    with pytest.raises(ValueError, match="The batch is empty"):
        VLADataCollator(processor_of("paligemma"), 1, 2)([])


def test_action_metrics_and_the_mean_action_baseline():
    train = np.array([[[0.0, 2.0]], [[2.0, 4.0]]])
    baseline = mean_action_baseline(train, 3)
    assert baseline.shape == (3, 1, 2) and (baseline == [[1.0, 3.0]]).all()
    errors = action_errors(baseline, np.zeros((3, 1, 2)))
    assert errors == {"action_l1": 2.0, "action_mse": 5.0, "first_action_l1": 2.0}
    prediction = type("Prediction", (), {"label_ids": np.zeros((3, 1, 2)), "predictions": (baseline, np.zeros(4))})
    assert ActionMetrics()(prediction) == errors
    with pytest.raises(ValueError, match="Expected one prediction shaped like the target actions"):
        ActionMetrics()(type("Prediction", (), {"label_ids": np.zeros((3, 1, 2)), "predictions": np.zeros(4)}))


def test_blank_images_use_the_table_colour():
    # The learning tests blank images with the background: nothing but the table is left.
    image = synthetic_manipulation_dataset(1, seed=0)[0]["images"][0]
    colors = {color for _, color in image.getcolors()}
    assert BACKGROUND in colors and len(colors) == 2
