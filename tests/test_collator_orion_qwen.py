import numpy as np
import pytest
import torch
from orion_helpers import camera_image

from vlmheads.data.driving import ARRAY_FIELDS, synthetic_driving_dataset
from vlmheads.offline import tiny_orion_processor
from vlmheads.processing.collator_orion_qwen import OrionDataCollator


@pytest.fixture(scope="module")
def processor():
    return tiny_orion_processor("qwen2_vl", num_scene_queries=16, num_history_queries=4)


@pytest.fixture
def records():
    dataset = synthetic_driving_dataset(3, seed=7).with_format(
        "numpy", columns=list(ARRAY_FIELDS), output_all_columns=True
    )
    return [dict(dataset[index]) for index in range(3)]


def test_a_batch_is_padded_and_stacks_the_driving_tensors(processor, records):
    records[1]["prompt"] = "A much longer question about the scene ahead, before planning.<ego_wp>"
    batch = OrionDataCollator(processor)(records)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["mm_token_type_ids"].shape
    lengths = batch["attention_mask"].sum(dim=1)
    assert lengths[1] == batch["input_ids"].shape[1] and lengths[0] < lengths[1]
    assert (batch["input_ids"][0, lengths[0] :] == processor.tokenizer.pad_token_id).all()
    assert batch["scene_queries"].shape == (3, 16, 256) and batch["scene_queries"].dtype == torch.float32
    assert batch["history_queries"].shape == (3, 4, 256) and batch["can_bus"].shape == (3, 89)
    torch.testing.assert_close(
        batch["ego_waypoints"], torch.from_numpy(np.stack([r["ego_waypoints"] for r in records]))
    )
    for row in batch["input_ids"]:
        assert (row == processor.scene_token_id).sum() == 16 and (row == processor.ego_token_id).sum() == 1


def test_only_the_answer_tokens_are_labelled(processor, records):
    batch = OrionDataCollator(processor)(records)
    for index, record in enumerate(records):
        labelled = batch["labels"][index] != -100
        decoded = processor.decode(batch["input_ids"][index][labelled])
        assert decoded == record["answer"] + "<|im_end|>\n"
        placeholders = torch.isin(
            batch["input_ids"][index],
            torch.tensor([processor.scene_token_id, processor.history_token_id, processor.can_bus_token_id]),
        )
        assert not (labelled & placeholders).any()
        assert not labelled[batch["attention_mask"][index] == 0].any()


def test_without_answers_there_are_no_labels_and_no_answer_text(processor, records):
    batch = OrionDataCollator(processor, with_answers=False)(records)
    assert "labels" not in batch
    assert records[0]["answer"] not in processor.decode(batch["input_ids"][0])
    assert processor.decode(batch["input_ids"][0]).endswith("<|im_start|>assistant\n")


def test_placeholders_a_prompt_places_itself_are_kept_where_they_are(processor, records):
    records[0]["prompt"] = "What is ahead?<scene> And behind?<history><can_bus> Plan.<ego_wp>"
    text = processor.decode(OrionDataCollator(processor, with_answers=False)(records[:1])["input_ids"][0])
    assert "What is ahead?<scene>" in text and "And behind?<history>" in text and "<can_bus> Plan.<ego_wp>" in text


def test_camera_images_become_image_tokens(processor, records):
    records[0]["images"] = [camera_image(0)]
    records[2]["images"] = [camera_image(1), camera_image(2, width=84)]
    batch = OrionDataCollator(processor)(records)
    assert batch["image_grid_thw"].shape == (3, 3)
    image_tokens = (batch["mm_token_type_ids"] == 1).sum(dim=1).tolist()
    assert image_tokens == [4, 0, 4 + 6]


def test_commands_are_stacked(processor, records):
    for index, record in enumerate(records):
        record["command"] = index + 2
    assert OrionDataCollator(processor)(records)["command"].tolist() == [2, 3, 4]


BAD_RECORDS = {
    "missing field": (lambda r: r.pop("history_queries"), r"missing field\(s\) \['history_queries'\]"),
    "waypoint count": (
        lambda r: r.update(ego_waypoints=r["ego_waypoints"][:4]),
        r"ego_waypoints must have shape \(6, 2\), got \(4, 2\)",
    ),
    "nan can bus": (lambda r: r["can_bus"].__setitem__(5, np.nan), r"can_bus contains NaN or inf"),
    "inf history": (
        lambda r: r["history_queries"].__setitem__((0, 0), np.inf),
        r"history_queries contains NaN or inf",
    ),
    "prompt without ego token": (lambda r: r.update(prompt="Plan."), r"prompt must hold exactly one <ego_wp>, got 0"),
    "scene rows": (
        lambda r: r.update(scene_queries=r["scene_queries"][:12]),
        r"scene_queries has 12 rows but the processor expects 16",
    ),
    "text features": (lambda r: r.update(can_bus="fast"), r"can_bus is not a numeric array"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_a_bad_record_stops_the_batch_with_its_id_and_reason(processor, records, case):
    mutate, reason = BAD_RECORDS[case]
    mutate(records[1])
    with pytest.raises(
        ValueError, match=r"Record id='synthetic-7-1' \(position 1 in the batch\) was rejected: " + reason
    ):
        OrionDataCollator(processor)(records)


def test_commands_on_some_records_only_are_an_error(processor, records):
    records[0]["command"] = 1
    with pytest.raises(ValueError, match=r"Records \['synthetic-7-1', 'synthetic-7-2'\] have no command"):
        OrionDataCollator(processor)(records)
