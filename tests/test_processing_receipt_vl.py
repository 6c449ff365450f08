import numpy as np
import pytest
import torch
from PIL import Image
from receipt_helpers import TILE, make_processor, photo, photo_file, question_prompt
from transformers import AutoProcessor

from vlmheads import ReceiptVLProcessor


@pytest.fixture(scope="module")
def processor():
    return make_processor()


def test_the_classification_prompt_follows_the_llama_3_chat_format(processor):
    prompt = processor.classification_prompt()
    assert prompt == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>How many receipts are in this photo?"
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert processor.classification_prompt("Count the receipts.").count("Count the receipts.") == 1
    ids = processor(images=[photo(0)], text=[prompt])["input_ids"][0]
    assert ids.count(processor.image_token_id) == 1 and ids.count(processor.tokenizer.bos_token_id) == 1


def test_a_batch_of_different_sizes_and_aspect_ratios_is_tiled_and_padded(processor):
    # 48 x 40 fits 2 x 2 tiles, 90 x 30 a row of 3, 20 x 20 one tile.
    images = [photo(0, 48, 40), photo(1, 90, 30), photo(2, 20, 20)]
    prompts = [processor.classification_prompt(), question_prompt(processor, "What is the total amount?"), "<|image|>"]
    inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    assert inputs["pixel_values"].shape == (3, 1, 4, 3, TILE, TILE)
    assert inputs["aspect_ratio_mask"].tolist() == [[[1, 1, 1, 1]], [[1, 1, 1, 0]], [[1, 0, 0, 0]]]
    supported = [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)]
    assert [supported[i - 1] for i in inputs["aspect_ratio_ids"][:, 0].tolist()] == [(2, 2), (1, 3), (1, 1)]
    assert (inputs["pixel_values"][1, 0, 3] == 0).all() and (inputs["pixel_values"][2, 0, 1:] == 0).all()

    length = inputs["input_ids"].shape[1]
    assert inputs["cross_attention_mask"].shape == (3, length, 1, 4)
    for sample in range(3):
        ids = inputs["input_ids"][sample]
        image_at = int((ids == processor.image_token_id).nonzero()[0])
        mask = inputs["cross_attention_mask"][sample, :, 0]
        assert (mask[:image_at] == 0).all()  # tokens before <|image|> do not see it
        tiles = int(inputs["aspect_ratio_mask"][sample, 0].sum())
        assert (mask[image_at:, :tiles] == 1).all() and (mask[:, tiles:] == 0).all()


def test_several_photos_per_sample_pad_the_missing_images(processor):
    inputs = processor(
        images=[[photo(0), photo(1, 70, 30)], [photo(2)]],
        text=["<|image|><|image|>Which photo holds more receipts?", "<|image|>How many?"],
        padding=True,
        return_tensors="pt",
    )
    assert inputs["pixel_values"].shape[:3] == (2, 2, 4)
    assert inputs["aspect_ratio_ids"][1, 1] == 0  # padding image
    assert inputs["cross_attention_mask"].shape[2] == 2


def test_image_files_give_the_same_inputs_as_the_images(processor, tmp_path):
    path = photo_file(tmp_path, 4, 60, 50)
    from_file = processor(images=[path], labels=["1"], return_tensors="pt")
    from_image = processor(images=[photo(4, 60, 50)], labels=[1], return_tensors="pt")
    assert from_file.keys() == from_image.keys() == {"pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "labels"}
    for name in from_file:
        assert torch.equal(from_file[name], from_image[name]), name
    array = processor(images=[np.array(photo(4, 60, 50))], return_tensors="pt")
    assert torch.equal(array["pixel_values"], from_image["pixel_values"])


def test_label_names_and_ids_map_through_the_config_classes(processor):
    assert processor.label_ids(["0", "2 or more", 1, np.int64(2)]) == [0, 2, 1, 2]
    inputs = processor(images=[photo(0), photo(1)], labels=["2 or more", "0"], return_tensors="pt")
    assert inputs["labels"].tolist() == [2, 0]
    custom = make_processor(id2label={0: "no receipt", 1: "receipt"})
    assert custom.label_ids(["receipt"]) == [1]
    assert custom.model_config_kwargs() == {
        "id2label": {0: "no receipt", 1: "receipt"},
        "label2id": {"no receipt": 0, "receipt": 1},
        "image_token_index": custom.tokenizer.convert_tokens_to_ids("<|image|>"),
    }


def test_logits_become_ranked_class_probabilities(processor):
    ranked = processor.post_process_classification(torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]]))
    assert [entry["label"] for entry in ranked[0]] == ["1", "2 or more", "0"]
    assert ranked[1][0]["label"] == "0"
    assert sum(entry["score"] for entry in ranked[0]) == pytest.approx(1.0)
    assert ranked[0][0]["score"] == pytest.approx(float(torch.tensor([0.0, 2.0, 1.0]).softmax(0)[1]))
    assert len(processor.post_process_classification(torch.zeros(1, 3), top_k=1)[0]) == 1


def test_save_and_load_keep_the_classes_question_and_template(processor, tmp_path):
    custom = make_processor(id2label={0: "none", 1: "some"}, question="Is there a receipt?")
    custom.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is ReceiptVLProcessor
    assert loaded.id2label == {0: "none", 1: "some"} and loaded.question == "Is there a receipt?"
    assert loaded.classification_prompt() == custom.classification_prompt()
    assert loaded.image_processor.size["height"] == TILE
    image = photo(1)
    assert torch.equal(
        loaded(images=[image], return_tensors="pt")["pixel_values"],
        custom(images=[image], return_tensors="pt")["pixel_values"],
    )


def test_a_non_image_file_is_a_clear_error(processor, tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not an image")
    with pytest.raises(ValueError, match=r"images\[1\] = '.*notes.png' is not a readable image file"):
        processor(images=[photo(0), str(path)])
    with pytest.raises(ValueError, match=r"images\[0\]: no such file: .*missing.png"):
        processor(images=[tmp_path / "missing.png"])


def test_a_truncated_image_file_is_a_clear_error(processor, tmp_path):
    path = photo_file(tmp_path, 0, 64, 64, suffix="jpg")
    data = open(path, "rb").read()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"images\[0\] = '.*truncated.jpg' is not a readable image file: .*truncated"):
        processor(images=[str(truncated)])


@pytest.mark.parametrize(
    "empty",
    [Image.new("RGB", (0, 30)), np.zeros((30, 0, 3), dtype=np.uint8), torch.zeros(3, 0, 20)],
    ids=["pil", "array", "tensor"],
)
def test_an_image_of_zero_size_is_a_clear_error(processor, empty):
    with pytest.raises(ValueError, match=r"images\[1\] has zero size"):
        processor(images=[photo(0), empty])


def test_an_unknown_label_is_a_clear_error(processor):
    with pytest.raises(ValueError, match=r"labels\[1\] = 'three' is not a class of this model: \{0: '0'"):
        processor(images=[photo(0), photo(1)], labels=["1", "three"])
    with pytest.raises(ValueError, match=r"labels\[0\] = 3 is not a class of this model"):
        processor(images=[photo(0)], labels=[3])


def test_a_prompt_whose_image_tokens_differ_from_its_images_is_a_clear_error(processor):
    with pytest.raises(ValueError, match=r"Prompt 1 holds 0 <\|image\|> tokens for 1 image\(s\)"):
        processor(images=[photo(0), photo(1)], text=[processor.classification_prompt(), "How many receipts?"])
    with pytest.raises(ValueError, match=r"Prompt 0 holds 2 <\|image\|> tokens for 1 image\(s\)"):
        processor(images=[photo(0)], text=["<|image|><|image|>How many?"])


def test_mismatched_batch_sizes_are_clear_errors(processor):
    with pytest.raises(ValueError, match="Got 1 prompts for 2 samples of images"):
        processor(images=[photo(0), photo(1)], text=[processor.classification_prompt()])
    with pytest.raises(ValueError, match="Got 3 labels for 2 samples"):
        processor(images=[photo(0), photo(1)], labels=["0", "1", "1"])
    with pytest.raises(ValueError, match="images are required"):
        processor(text=["<|image|>"])
