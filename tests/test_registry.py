"""The family table and the registry API: names, resolution, registration, quantization settings, real sizes."""

import dataclasses

import pytest
import torch
from transformers import AutoModelForImageTextToText, Idefics3Config

from vlmheads import create_vlm, list_vlms, load_processor, register_vlm
from vlmheads.modeling.families import VLM_FAMILIES, family_of, vlm_family
from vlmheads.offline import public_config
from vlmheads.offline.tiny import llava
from vlmheads.registry.vlms import quantization_config, resolve_vlm, tiny_vlm_config

FAMILY_NAMES = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl", "mllama", "llava", "paligemma", "internvl", "florence-2")
SEED_NAMES = ("qwen2-vl-2b", "qwen2-vl-7b", "qwen3-vl-4b", "florence-2-base", "florence-2-large", "paligemma-3b")
# Parameter counts the checkpoints' model cards publish, in billions.
PUBLISHED_SIZES = {
    "qwen2-vl": 2.21,
    "qwen2.5-vl": 3.75,
    "qwen3-vl": 2.13,
    "mllama": 10.67,
    "llava": 7.06,
    "paligemma": 2.92,
    "internvl": 0.94,
    "florence-2": 0.23,
    "smolvlm": 0.256,
    "gemma3": 4.3,
    # π0: PaliGemma (2.92) + the Gemma action expert; transformers also builds the expert's unused token table.
    "pi0": 3.5,
}


def test_every_family_and_the_seed_names_are_listed():
    names = list_vlms()
    assert set(FAMILY_NAMES) | {"smolvlm", "gemma3", "pi0"} <= set(names)
    assert set(SEED_NAMES) | {"internvl2-2b", "llava-v1.5-7b", "llava-v1.5-13b"} <= set(names)
    assert names == sorted(names)


@pytest.mark.parametrize(
    ("name", "family", "checkpoint"),
    [
        ("qwen2-vl", "qwen2-vl", "Qwen/Qwen2-VL-2B-Instruct"),
        ("qwen2-vl-7b", "qwen2-vl", "Qwen/Qwen2-VL-7B-Instruct"),
        ("qwen3-vl-4b", "qwen3-vl", "Qwen/Qwen3-VL-4B-Instruct"),
        ("internvl2-2b", "internvl", "OpenGVLab/InternVL3-2B-hf"),
        ("llava-v1.5-7b", "llava", "llava-hf/llava-1.5-7b-hf"),
        ("florence-2-base", "florence-2", "florence-community/Florence-2-base"),
        ("smolvlm", "smolvlm", "HuggingFaceTB/SmolVLM-256M-Instruct"),
        ("pi0", "pi0", "lerobot/pi0_base"),
    ],
)
def test_names_resolve_to_their_family_and_checkpoint(name, family, checkpoint):
    found, loaded = resolve_vlm(name)
    assert (found.name, loaded) == (family, checkpoint)


def test_an_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"Unknown VLM 'qwen9-vl'; known names: .*florence-2-base.*qwen2-vl-2b"):
        create_vlm("qwen9-vl", tiny=True)
    with pytest.raises(ValueError, match=r"Unknown VLM family 'blip'; known families: \[.*'llava'"):
        vlm_family("blip")


def test_family_of_finds_subclasses_and_published_model_types():
    from vlmheads import OrionQwen2_5Config, ReceiptVLConfig

    assert family_of(OrionQwen2_5Config()).name == "qwen2.5-vl"
    assert family_of(ReceiptVLConfig()).name == "mllama"
    # SmolVLM-256M-Instruct's config.json says idefics3: the same architecture under SmolVLM's classes.
    assert family_of(Idefics3Config()).name == "smolvlm"
    with pytest.raises(ValueError, match=r"BertConfig \(model_type 'bert'\) is not a registered VLM family"):
        from transformers import BertConfig

        family_of(BertConfig())


def test_a_config_or_checkpoint_of_another_family_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"config is a 'mllama' configuration \(MllamaConfig\), not 'llava'"):
        create_vlm("llava", config=tiny_vlm_config("mllama"))
    create_vlm("llava", tiny=True).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"the checkpoint .* is a 'llava' configuration .*, not 'paligemma'"):
        create_vlm("paligemma", pretrained=str(tmp_path))


def test_create_vlm_returns_the_family_class_from_a_config_a_folder_or_tiny(tmp_path):
    tiny = create_vlm("llava", tiny=True, seed=3)
    assert type(tiny) is VLM_FAMILIES["llava"].model_cls
    assert type(tiny) is type(AutoModelForImageTextToText.from_config(tiny.config))
    again = create_vlm("llava-v1.5-7b", config=tiny.config, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(tiny.state_dict().values(), again.state_dict().values(), strict=True))
    tiny.save_pretrained(tmp_path)
    loaded = create_vlm("llava", pretrained=str(tmp_path), dtype=torch.bfloat16, gradient_checkpointing=True)
    assert loaded.dtype == torch.bfloat16 and loaded.is_activation_checkpointing
    torch.testing.assert_close(loaded.lm_head.weight.float(), tiny.lm_head.weight.bfloat16().float())


def test_create_vlm_refuses_contradictory_arguments():
    with pytest.raises(ValueError, match=r"at most one of pretrained, config and tiny=True"):
        create_vlm("llava", pretrained="llava-hf/llava-1.5-7b-hf", tiny=True)
    with pytest.raises(ValueError, match=r"bits quantizes pretrained weights"):
        create_vlm("llava", tiny=True, bits=4)
    with pytest.raises(ValueError, match=r"Give pretrained or tiny=True, not both"):
        load_processor("llava", pretrained="llava-hf/llava-1.5-7b-hf", tiny=True)


def test_quantization_keeps_the_vision_tower_projector_and_heads_in_full_precision():
    config = quantization_config("qwen2-vl-7b", bits=4, keep=("classifier",))
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert config.llm_int8_skip_modules == ["model.visual", "lm_head", "classifier"]
    assert quantization_config("llava", bits=8).llm_int8_skip_modules == [
        "model.vision_tower",
        "model.multi_modal_projector",
        "lm_head",
    ]
    with pytest.raises(ValueError, match=r"bits must be 4 or 8, got 3"):
        quantization_config("llava", bits=3)


def test_a_registered_family_works_with_every_helper():
    family = dataclasses.replace(
        VLM_FAMILIES["llava"], name="my-llava", checkpoint="me/my-llava", checkpoints={"my-llava-tiny": "me/tiny"}
    )
    try:
        register_vlm(family, tiny_processor=llava.tiny_processor, tiny_config=llava.tiny_config)
        assert {"my-llava", "my-llava-tiny"} <= set(list_vlms())
        assert resolve_vlm("my-llava-tiny") == (family, "me/tiny")
        assert type(create_vlm("my-llava", tiny=True)).__name__ == "LlavaForConditionalGeneration"
        with pytest.raises(ValueError, match=r"named 'my-llava' is registered already"):
            register_vlm(family)
    finally:
        VLM_FAMILIES.pop("my-llava", None)
    with pytest.raises(ValueError, match=r"The names \['llava-v1.5-7b'\] already load another family"):
        register_vlm(dataclasses.replace(family, checkpoints={"llava-v1.5-7b": "x/y"}))
    with pytest.raises(ValueError, match=r"no tiny offline configuration"):
        register_vlm(family)
        try:
            create_vlm("my-llava", tiny=True)
        finally:
            VLM_FAMILIES.pop("my-llava", None)


@pytest.mark.parametrize("name", sorted(PUBLISHED_SIZES))
def test_public_configs_build_the_published_sizes_on_the_meta_device(name):
    family = VLM_FAMILIES[name]
    config = family.config_cls(**public_config(family.checkpoint))
    with torch.device("meta"):
        model = family.model_cls(config)
    parameters = sum(parameter.numel() for parameter in model.parameters()) / 1e9
    assert parameters == pytest.approx(PUBLISHED_SIZES[name], rel=0.02)
