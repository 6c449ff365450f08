import numpy as np
import pytest
import torch
from orion_helpers import (
    NUM_HISTORY,
    NUM_SCENE,
    camera_image,
    driving_features,
    driving_prompt,
    make_processor,
    real_vocab_model,
)
from transformers import AutoProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

from vlmheads.offline import qwen2_vl_tokenizer, tiny_image_processor_kwargs


def test_placeholder_tokens_are_added_once_after_the_qwen_special_tokens(family, processor):
    tokens = [processor.scene_token, processor.history_token, processor.can_bus_token, processor.ego_token]
    assert tokens == ["<scene>", "<history>", "<can_bus>", "<ego_wp>"]
    ids = [processor.scene_token_id, processor.history_token_id, processor.can_bus_token_id, processor.ego_token_id]
    assert ids == [151657, 151658, 151659, 151660]
    assert processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") == 151655

    tokenizer = processor.tokenizer
    again = family.processor(processor.image_processor, tokenizer, processor.video_processor)
    assert len(tokenizer) == 151661 and again.ego_token_id == 151660
    assert processor.model_config_kwargs() == {
        "num_scene_queries": NUM_SCENE,
        "num_history_queries": NUM_HISTORY,
        "scene_token_id": 151657,
        "history_token_id": 151658,
        "can_bus_token_id": 151659,
        "ego_token_id": 151660,
    }


def test_placeholders_expand_like_image_tokens_and_are_text_positions(processor):
    inputs = processor(
        images=[camera_image(0)], text=[driving_prompt(processor)], **driving_features(1), return_tensors="pt"
    )
    ids, types = inputs["input_ids"][0], inputs["mm_token_type_ids"][0]
    counts = {name: int((ids == getattr(processor, f"{name}_token_id")).sum()) for name in ("scene", "history")}
    assert counts == {"scene": NUM_SCENE, "history": NUM_HISTORY}
    assert int((ids == processor.can_bus_token_id).sum()) == int((ids == processor.ego_token_id).sum()) == 1
    image_tokens = ids == processor.image_token_id
    assert int(image_tokens.sum()) == 4 and bool((types[image_tokens] == 1).all())
    assert int(types[~image_tokens].sum()) == 0
    assert inputs["scene_queries"].shape == (1, NUM_SCENE, 256) and inputs["can_bus"].shape == (1, 89)


def test_features_pass_through_from_lists_and_arrays(processor):
    features = driving_features(1)
    inputs = processor(
        text=[driving_prompt(processor, image=False)],
        scene_queries=features["scene_queries"].numpy(),
        history_queries=features["history_queries"].tolist(),
        can_bus=features["can_bus"],
        return_tensors="pt",
    )
    for name, value in features.items():
        torch.testing.assert_close(inputs[name].float(), value)


def test_chat_template_places_the_driving_placeholders(processor):
    prompt = driving_prompt(processor, "Where is the stop line?")
    assert prompt.endswith(
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|><scene><history><can_bus>"
        "Where is the stop line?<ego_wp><|im_end|>\n<|im_start|>assistant\n"
    )
    assert prompt.startswith("<|im_start|>system\n")


BAD_PROMPTS = {
    "two ego tokens": (
        "<scene><history><can_bus><ego_wp><ego_wp>",
        r"Prompt 0 holds 2 <ego_wp> tokens; a prompt holds at most one",
    ),
    "two scene placeholders": (
        "<scene><scene><history><can_bus><ego_wp>",
        r"Prompt 0 holds 2 <scene> placeholders; expected exactly one, as scene_queries were given",
    ),
    "missing history placeholder": (
        "<scene><can_bus><ego_wp>",
        r"Prompt 0 holds 0 <history> placeholders; expected exactly one",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_PROMPTS))
def test_bad_prompts_are_clear_errors(processor, case):
    prompt, message = BAD_PROMPTS[case]
    with pytest.raises(ValueError, match=message):
        processor(text=[prompt], **driving_features(1))


def test_a_prompt_without_ego_token_is_a_plain_question_answered_without_a_trajectory(family, processor):
    model = real_vocab_model(family, processor).eval()
    features = driving_features(1)
    inputs = processor(text=["<scene><history><can_bus>What is ahead?"], **features, return_tensors="pt")
    assert int((inputs["input_ids"] == processor.ego_token_id).sum()) == 0
    with torch.no_grad():
        output = model(**inputs)
    assert output.trajectory is None and output.logits.shape[:2] == inputs["input_ids"].shape


def test_a_placeholder_without_features_is_an_error(processor):
    with pytest.raises(
        ValueError, match=r"Prompt 1 holds 1 <can_bus> placeholders; expected none, as no can_bus were given"
    ):
        processor(text=["<ego_wp>", "<can_bus><ego_wp>"])


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        (
            "scene_queries",
            np.zeros((2, NUM_SCENE, 256)),
            r"scene_queries must have shape \(B, 4, width\) with B=1 prompts, got \(2, 4, 256\)",
        ),
        (
            "history_queries",
            np.zeros((1, 2, 256)),
            r"history_queries must have shape \(B, 3, width\) with B=1 prompts, got \(1, 2, 256\)",
        ),
        ("can_bus", np.zeros(89), r"can_bus must have shape \(B, width\) with B=1 prompts, got \(89,\)"),
    ],
)
def test_features_of_the_wrong_shape_are_errors(processor, name, value, message):
    features = {**driving_features(1), name: value}
    with pytest.raises(ValueError, match=message):
        processor(text=[driving_prompt(processor, image=False)], **features)


def test_invalid_processor_settings_are_errors(family):
    with pytest.raises(ValueError, match=r"num_scene_queries must be a positive integer, got 0"):
        make_processor(family, num_scene_queries=0)
    with pytest.raises(ValueError, match=r"distinct"):
        make_processor(family, history_token="<scene>")


def test_save_and_reload_keep_tokens_counts_and_template(family, tmp_path):
    processor = make_processor(family, ego_token="<waypoint_ego>", num_scene_queries=5)
    processor.save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(reloaded) is family.processor
    assert reloaded.model_config_kwargs() == processor.model_config_kwargs()
    assert reloaded.ego_token == "<waypoint_ego>" and reloaded.chat_template == processor.chat_template
    prompt = driving_prompt(reloaded, image=False)
    assert "<waypoint_ego>" in prompt
    features = {**driving_features(1), "scene_queries": torch.randn(1, 5, 256)}
    first = processor(text=[prompt], **features, return_tensors="pt")
    second = reloaded(text=[prompt], **features, return_tensors="pt")
    assert torch.equal(first["input_ids"], second["input_ids"])


def test_a_qwen_tokenizer_that_already_has_the_tokens_keeps_its_ids(family):
    tokenizer = qwen2_vl_tokenizer()
    tokenizer.add_tokens(["<ego_wp>"], special_tokens=True)
    processor = family.processor(
        image_processor=Qwen2VLImageProcessor(**tiny_image_processor_kwargs()),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
    )
    assert processor.ego_token_id == 151657 and processor.scene_token_id == 151658
