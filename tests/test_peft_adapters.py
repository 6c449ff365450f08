"""Adapters with the released peft: `get_peft_model` → `save_pretrained` → `PeftModel.from_pretrained`.

transformers 5.24's `load_adapter` works with it too; its other adapter methods (`add_adapter`, `set_adapter`,
`enable_adapters`, ...) ask for peft >= 0.22, not yet released.
"""

import importlib.metadata

import pytest
import torch
from orion_helpers import FAMILIES, driving_features, driving_prompt, make_processor, real_vocab_model
from packaging import version
from peft import LoraConfig, PeftModel

from vlmheads.training.orion import add_lora


@pytest.fixture(scope="module")
def setup():
    family = FAMILIES["qwen2_vl"]
    processor = make_processor(family)
    inputs = processor(
        text=[driving_prompt(processor, image=False)] * 2, **driving_features(2), padding=True, return_tensors="pt"
    )
    return family, processor, dict(inputs)


def trajectory(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).trajectory


def test_a_saved_lora_adapter_loads_with_peft_model_from_pretrained(setup, tmp_path):
    family, processor, inputs = setup
    adapted = add_lora(real_vocab_model(family, processor, seed=0), r=4, alpha=8, dropout=0.0)
    # Fresh LoRA B matrices are zero: give the adapters and the fully trained head a visible effect.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in adapted.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    adapted.eval()
    expected = trajectory(adapted, inputs)
    adapted.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").exists() and (tmp_path / "adapter_model.safetensors").exists()

    base = real_vocab_model(family, processor, seed=0)
    untouched = trajectory(base, inputs)
    assert not torch.allclose(untouched, expected, atol=1e-4)
    loaded = PeftModel.from_pretrained(base, tmp_path).eval()
    torch.testing.assert_close(trajectory(loaded, inputs), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(trajectory(loaded.merge_and_unload(), inputs), expected, rtol=1e-4, atol=1e-4)

    plain = real_vocab_model(family, processor, seed=0)
    plain.load_adapter(str(tmp_path))
    torch.testing.assert_close(trajectory(plain, inputs), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(
    version.parse(importlib.metadata.version("peft")) >= version.parse("0.22"), reason="peft >= 0.22 is installed"
)
def test_transformers_own_add_adapter_asks_for_an_unreleased_peft(setup):
    family, processor, _ = setup
    with pytest.raises(ValueError, match=r"please use a version >= 0\.22"):
        real_vocab_model(family, processor, seed=0).add_adapter(LoraConfig(r=4, target_modules=["q_proj"]))
