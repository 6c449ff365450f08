"""Every family with a tiny offline configuration: build, forward, generate, encode_images, freezing, LoRA, 8/4-bit."""

import numpy as np
import pytest
import torch
from torch import nn
from vlm_helpers import FAMILY_NAMES, family_batch, tiny_backbone, tiny_image, tiny_processor

from vlmheads import VLMForImageClassification, create_vlm, encode_images, hidden_size, quantization_config
from vlmheads.modeling.families import VLM_FAMILIES
from vlmheads.modeling.modeling_vlm_heads import image_features
from vlmheads.training.backbones import add_lora, freeze

pytestmark = pytest.mark.parametrize("name", FAMILY_NAMES)


def _names_under(model: nn.Module, prefix: str) -> set[str]:
    return {name for name, _ in model.named_parameters() if name.startswith(prefix + ".")}


@pytest.mark.slow
def test_forward_and_generate(name):
    model = tiny_backbone(name)
    batch = family_batch(name, ["what is shown", "describe it"], seeds=[0, 1])
    assert isinstance(model, VLM_FAMILIES[name].model_cls)
    with torch.no_grad():
        logits = model(**batch).logits
    vocab = model.config.get_text_config().vocab_size
    assert logits.shape[0] == 2 and logits.shape[-1] >= vocab
    assert torch.isfinite(logits).all()
    generated = model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    # Decoder-only models return prompt + answer; Florence-2's decoder starts from its start token.
    prompt_length = 1 if model.config.is_encoder_decoder else batch["input_ids"].shape[1]
    assert generated.shape == (2, prompt_length + 3)


def test_encode_images(name):
    model, processor = tiny_backbone(name), tiny_processor(name)
    images = [tiny_image(0), tiny_image(1), tiny_image(0)]
    with torch.no_grad():
        features = encode_images(model, processor, images)
    assert features.ndim == 3 and features.shape[0] == 3 and features.shape[1] > 0
    assert features.shape[2] == hidden_size(model) == model.config.get_text_config().hidden_size
    torch.testing.assert_close(features[0], features[2])
    assert not torch.allclose(features[0], features[1])
    # The same through a head, and from arrays in either channel layout.
    head = VLMForImageClassification.from_backbone(model, num_labels=2)
    arrays = [np.asarray(image) for image in images]
    with torch.no_grad():
        torch.testing.assert_close(encode_images(head, processor, arrays), features)
        channels_first = [torch.from_numpy(array).permute(2, 0, 1) for array in arrays]
        torch.testing.assert_close(encode_images(head, processor, channels_first), features)


@pytest.mark.parametrize("part", ["vision", "projector", "language"])
def test_freeze_freezes_exactly_the_named_part(name, part):
    family = VLM_FAMILIES[name]
    model = tiny_backbone(name)
    freeze(model, **{part: True})
    frozen = {name for name, parameter in model.named_parameters() if not parameter.requires_grad}
    if part == "vision":
        expected = _names_under(model, family.vision_tower) - _names_under(model, family.projector)
    elif part == "projector":
        expected = _names_under(model, family.projector)
    else:
        expected = _names_under(model, family.language_model) | _names_under(model, family.lm_head)
    assert expected and frozen == expected


def test_add_lora_adapts_only_the_language_model(name):
    family = VLM_FAMILIES[name]
    head = VLMForImageClassification.from_backbone(tiny_backbone(name), num_labels=2)
    model = add_lora(head, r=4)
    lora = [name for name, _ in model.named_parameters() if "lora_" in name]
    assert lora
    language = f"base_model.model.backbone.{family.language_model}."
    assert all(name.startswith(language) for name in lora), [n for n in lora if not n.startswith(language)][:3]
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    classifier = {name for name in trainable if ".classifier." in name}
    assert classifier and trainable == set(lora) | classifier


@pytest.mark.slow
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_loading_keeps_the_skip_list_in_full_precision(name, bits, tmp_path):
    import bitsandbytes as bnb

    family = VLM_FAMILIES[name]
    tiny_backbone(name).save_pretrained(tmp_path)
    model = family.model_cls.from_pretrained(tmp_path, quantization_config=quantization_config(name, bits))
    quantized_type = bnb.nn.Linear8bitLt if bits == 8 else bnb.nn.Linear4bit
    linears = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    language = [module for path, module in linears.items() if path.startswith(family.language_model + ".")]
    kept = [
        module
        for path, module in linears.items()
        if any(path == skip or path.startswith(skip + ".") for skip in family.quantization_skip_modules)
    ]
    assert language and all(isinstance(module, quantized_type) for module in language)
    assert kept and not any(isinstance(module, quantized_type) for module in kept)
    batch = family_batch(name, ["what is shown"], seeds=[0])
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits.float()).all()


def test_unknown_name_and_foreign_config_are_clear_errors(name):
    with pytest.raises(ValueError, match="Unknown VLM 'no-such-vlm'; known names: .*" + name):
        create_vlm("no-such-vlm", tiny=True)
    other = FAMILY_NAMES[(FAMILY_NAMES.index(name) + 1) % len(FAMILY_NAMES)]
    with pytest.raises(ValueError, match=f"is a '{other}' configuration"):
        create_vlm(name, config=tiny_backbone(other).config)


def test_image_features_pad_images_of_different_sizes(name):
    """Images of different sizes (Qwen keeps each one's size, InternVL tiles the larger): each image's rows as when
    encoded alone, the shorter padded with zeros and masked."""
    family = VLM_FAMILIES[name]
    model, processor = tiny_backbone(name), tiny_processor(name)

    def encode(images):
        outputs = processor.image_processor(images=[[image] for image in images], return_tensors="pt")
        with torch.no_grad():
            inputs = {key: outputs[key] for key in family.image_inputs}
            return image_features(model, num_patches=outputs.get("num_patches"), **inputs)

    small, large = tiny_image(0, size=64), tiny_image(1, size=128)
    features, valid = encode([small, large])
    for index, image in enumerate((small, large)):
        alone, alone_valid = encode([image])
        rows = int(alone_valid.sum())
        assert int(valid[index].sum()) == rows
        torch.testing.assert_close(features[index][valid[index]], alone[0][alone_valid[0]], atol=1e-5, rtol=1e-4)
        assert not features[index][~valid[index]].any()
