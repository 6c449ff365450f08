import pytest
import torch
from receipt_helpers import batch, make_model, make_plain_mllama, make_processor, photo, question_prompt
from safetensors import safe_open
from torch.nn import functional as F
from transformers import AutoModel, AutoModelForImageClassification

from vlmheads import ReceiptVLClassifier, ReceiptVLClassifierOutput

HEAD_KEYS = {
    "classifier.hidden.0.weight",
    "classifier.hidden.0.bias",
    "classifier.hidden.1.weight",
    "classifier.hidden.1.bias",
    "classifier.hidden.1.running_mean",
    "classifier.hidden.1.running_var",
    "classifier.hidden.1.num_batches_tracked",
    "classifier.out_proj.weight",
    "classifier.out_proj.bias",
}
IMAGE_INPUTS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")


@pytest.fixture(scope="module")
def processor():
    return make_processor()


@pytest.mark.parametrize("pooling", ["vision", "multimodal"])
def test_forward_returns_logits_per_class_and_the_cross_entropy(processor, pooling):
    model = make_model(processor, pooling=pooling)
    inputs = batch(processor, multimodal=pooling == "multimodal")
    labels = torch.tensor([2, 0])
    out = model(**inputs, labels=labels)
    assert isinstance(out, ReceiptVLClassifierOutput)
    assert out.logits.shape == (2, 3)
    assert out.pooled_features.shape == (2, model.config.text_config.hidden_size)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))
    assert model(**inputs).loss is None
    assert model(**inputs, return_dict=False)[0].shape == (2, 3)


def test_a_plain_mllama_checkpoint_loads_every_backbone_weight_and_only_the_head_is_new(processor, tmp_path):
    plain = make_plain_mllama(processor)
    plain.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as checkpoint:
        assert any(key.startswith("language_model.model.") for key in checkpoint.keys())  # the Hub layout

    model, info = ReceiptVLClassifier.from_pretrained(
        tmp_path, output_loading_info=True, classifier_hidden_dims=[64], classifier_dropout_rates=[0.1]
    )
    assert set(info["missing_keys"]) == HEAD_KEYS
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    plain_state, model_state = plain.state_dict(), model.state_dict()
    assert set(model_state) - set(plain_state) == HEAD_KEYS
    for key, value in plain_state.items():
        assert torch.equal(model_state[key], value), key
    assert model.config.model_type == "receipt_vl" and model.config.id2label == {0: "0", 1: "1", 2: "2 or more"}

    # The same weights answer as the plain model: next-token logits and greedy generation are identical.
    model.eval()
    inputs = processor(images=[photo(3)], text=[question_prompt(processor, "What is the total?")], return_tensors="pt")
    with torch.no_grad():
        lm = model(**inputs, language_modeling=True)
        reference = plain(**inputs)
    torch.testing.assert_close(lm.logits, reference.logits, rtol=0, atol=0)
    generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert generated.shape == (1, inputs["input_ids"].shape[1] + 6)
    assert torch.equal(generated, plain.generate(**inputs, max_new_tokens=6, do_sample=False))


def test_save_and_reload_keep_every_weight_and_both_auto_classes_give_the_classifier(processor, tmp_path):
    model = make_model(processor, pooling="multimodal")
    model.save_pretrained(tmp_path)
    inputs = batch(processor, multimodal=True)
    for auto_class in (AutoModel, AutoModelForImageClassification):
        reloaded, info = auto_class.from_pretrained(tmp_path, output_loading_info=True)
        assert type(reloaded) is ReceiptVLClassifier
        assert not any(info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"))
        torch.testing.assert_close(reloaded.eval()(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


def test_vision_pooling_never_runs_the_text_decoder(processor):
    model = make_model(processor, pooling="vision")
    calls = []
    for module in (model.model.language_model, model.lm_head):
        module.register_forward_hook(lambda *_: calls.append(1))
    inputs = batch(processor, multimodal=True)  # even with a prompt at hand
    model(**inputs)
    model(**{name: inputs[name] for name in IMAGE_INPUTS})
    assert calls == []


def test_multimodal_pooling_runs_the_decoder_once_and_reads_the_image(processor):
    model = make_model(processor, pooling="multimodal")
    calls = []
    model.model.language_model.register_forward_hook(lambda *_: calls.append(1))
    inputs = batch(processor, multimodal=True)
    logits = model(**inputs).logits
    assert len(calls) == 1
    other = batch(processor, multimodal=True, sizes=((60, 20), (33, 33)))
    assert not torch.allclose(model(**other).logits, logits)


def test_vision_pooling_is_the_mean_over_valid_tiles_only(processor):
    model = make_model(processor, pooling="vision")
    wide, small = photo(0, 90, 30), photo(1, 30, 30)  # 3 tiles and 1 tile
    inputs = processor(images=[wide, small], return_tensors="pt")
    assert inputs["aspect_ratio_mask"].tolist() == [[[1, 1, 1, 0]], [[1, 0, 0, 0]]]
    pooled = model(**inputs).pooled_features

    vision = model.model.vision_model(**{name: inputs[name] for name in IMAGE_INPUTS}).last_hidden_state
    projected = model.model.multi_modal_projector(vision)  # (B, images, tiles, patches, H)
    torch.testing.assert_close(pooled[0], projected[0, 0, :3].mean(dim=(0, 1)))
    torch.testing.assert_close(pooled[1], projected[1, 0, :1].mean(dim=(0, 1)))
    # The vision tower does output tokens for the padding tiles; the mean leaves them out.
    assert not torch.allclose(pooled[1], projected[1, 0].mean(dim=(0, 1)), atol=1e-4)


def test_vision_pooling_skips_padding_images_of_samples_with_fewer_photos(processor):
    model = make_model(processor, pooling="vision")
    two = processor(images=[[photo(0), photo(1)], [photo(2)]], return_tensors="pt")
    assert two["aspect_ratio_ids"][1, 1] == 0  # the second sample's padding image
    alone = processor(images=[[photo(2)]], return_tensors="pt")
    torch.testing.assert_close(model(**two).pooled_features[1], model(**alone).pooled_features[0])


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_multimodal_pooling_reads_the_last_real_token_whatever_the_padding(processor, padding_side):
    model = make_model(processor, pooling="multimodal")
    prompts = [processor.classification_prompt(), question_prompt(processor, "How many receipts? Count them all.")]
    images = [photo(0), photo(1)]
    padded = processor(images=images, text=prompts, padding=True, padding_side=padding_side, return_tensors="pt")
    assert (padded["attention_mask"] == 0).any()
    logits = model(**padded).logits
    for index in range(2):
        alone = processor(images=[images[index]], text=[prompts[index]], return_tensors="pt")
        torch.testing.assert_close(logits[index], model(**alone).logits[0], rtol=1e-4, atol=1e-4)


def test_generate_answers_a_question_with_the_classifier_weights(processor):
    model = make_model(processor, pooling="vision")
    prompt = question_prompt(processor, "What is the total?")
    inputs = processor(
        images=[photo(0), photo(1)], text=[prompt] * 2, padding_side="left", padding=True, return_tensors="pt"
    )
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert generated.shape == (2, inputs["input_ids"].shape[1] + 5)
    assert torch.equal(generated[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    answers = processor.batch_decode(generated[:, inputs["input_ids"].shape[1] :])
    assert all(isinstance(answer, str) and answer for answer in answers)


def test_the_head_trains_with_the_backbone(processor):
    model = make_model(processor, pooling="multimodal").train()
    inputs = batch(processor, multimodal=True)
    model(**inputs, labels=torch.tensor([1, 2])).loss.backward()
    for name in ("classifier.out_proj.weight", "model.multi_modal_projector.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    assert model.get_parameter("lm_head.weight").grad is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda i: i.pop("pixel_values"), "pixel_values is required: the classifier reads the image"),
        (lambda i: i.pop("aspect_ratio_mask"), "aspect_ratio_mask is required"),
        (
            lambda i: i.update(pixel_values=i["pixel_values"][..., :16, :16]),
            "pixel_values must have shape (B, images, tiles, channels, image_size, image_size) = "
            "('*', '*', '*', 3, 32, 32), got (2, 1, 4, 3, 16, 16)",
        ),
        (
            lambda i: i.update(aspect_ratio_ids=i["aspect_ratio_ids"][:1]),
            "The inputs disagree on the batch size: {'pixel_values': 2, 'aspect_ratio_ids': 1",
        ),
        (lambda i: i.update(labels=torch.tensor([0, 3])), "labels must be class ids in [0, 3)"),
        (lambda i: i.update(labels=torch.tensor([0.0, 1.0])), "labels must be class ids in [0, 3)"),
        (lambda i: i.update(labels=torch.tensor([0, 1, 2])), "The inputs disagree on the batch size"),
        (lambda i: i.update(aspect_ratio_ids=torch.tensor([[0], [1]])), "Every sample needs an image"),
    ],
)
def test_bad_inputs_are_clear_errors(processor, change, message):
    model = make_model(processor, pooling="vision")
    inputs = dict(batch(processor, multimodal=False))
    change(inputs)
    with pytest.raises(ValueError) as error:
        model(**inputs)
    assert message in str(error.value)


def test_multimodal_pooling_rejects_a_prompt_without_its_image_token(processor):
    model = make_model(processor, pooling="multimodal")
    images = batch(processor, multimodal=False)
    with pytest.raises(ValueError, match='pooling="multimodal" reads the decoder after it cross-attends'):
        model(**images)
    # A prompt that lost its <|image|> (the processor would refuse it too; here the ids come from elsewhere).
    inputs = dict(batch(processor, multimodal=True))
    inputs["input_ids"] = inputs["input_ids"].masked_fill(inputs["input_ids"] == processor.image_token_id, 100)
    with pytest.raises(ValueError) as error:
        model(**inputs)
    assert f"Prompt 0 holds 0 <|image|> tokens (id {processor.image_token_id}) for 1 images" in str(error.value)
    inputs = dict(batch(processor, multimodal=True))
    inputs["cross_attention_mask"] = inputs["cross_attention_mask"][:, :-1]
    with pytest.raises(ValueError, match=r"cross_attention_mask must have shape \(B, L, images, tiles\)"):
        model(**inputs)


def test_batch_norm_needs_two_samples_per_training_batch(processor):
    model = make_model(processor, pooling="vision").train()
    inputs = processor(images=[photo(0)], return_tensors="pt")
    with pytest.raises(ValueError, match="batch norm needs at least 2 samples per training batch, got 1"):
        model(**inputs)
    model.eval()(**inputs)
    no_norm = make_model(processor, pooling="vision", classifier_batch_norm=False).train()
    assert no_norm(**inputs).logits.shape == (1, 3)
