"""Llama-3.2-11B-Vision, built from its public config on the meta device: the real shapes without memory."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from vlmheads import ReceiptVLClassifier, ReceiptVLConfig
from vlmheads.offline import public_config

MLLAMA_11B_PARAMETERS = 10_670_220_835  # MllamaForConditionalGeneration(Llama-3.2-11B-Vision)


def meta_model() -> ReceiptVLClassifier:
    config = ReceiptVLConfig(**public_config("meta-llama/Llama-3.2-11B-Vision"))
    with torch.device("meta"):
        return ReceiptVLClassifier(config)


@pytest.fixture(scope="module")
def model():
    return meta_model()


def test_the_public_config_is_the_11b_architecture(model):
    text, vision = model.config.text_config, model.config.vision_config
    assert text.hidden_size == 4096 and text.num_hidden_layers == 40 and text.vocab_size == 128256
    assert text.cross_attention_layers == [3, 8, 13, 18, 23, 28, 33, 38]
    assert text.rope_parameters["rope_type"] == "llama3" and text.rope_parameters["factor"] == 8.0
    assert vision.image_size == 560 and vision.patch_size == 14 and vision.vision_output_dim == 7680
    assert model.config.image_token_id == 128256
    assert model.model.vision_model.num_patches == 1601  # (560 / 14)² patches + the class token
    assert model.model.language_model.embed_tokens.num_embeddings == 128256 + 8  # <|image|> lies past the vocabulary


def test_the_head_reads_the_4096_wide_projected_features(model):
    head = model.classifier
    assert head.hidden[0].in_features == 4096 and head.hidden[0].out_features == 768
    assert head.hidden[4].in_features == 768 and head.hidden[4].out_features == 256
    assert isinstance(head.hidden[1], torch.nn.BatchNorm1d) and isinstance(head.hidden[3], torch.nn.Dropout)
    assert head.out_proj.out_features == 3
    projector = model.model.multi_modal_projector
    assert (projector.in_features, projector.out_features) == (7680, 4096)
    head_parameters = (4096 * 768 + 768) + 2 * 768 + (768 * 256 + 256) + 2 * 256 + (256 * 3 + 3)
    assert sum(p.numel() for p in head.parameters()) == head_parameters
    assert sum(p.numel() for p in model.parameters()) == MLLAMA_11B_PARAMETERS + head_parameters
    assert all(p.device.type == "meta" for p in model.parameters())


def test_the_vision_path_shapes_of_four_tiles(model):
    pixel_values = torch.zeros(2, 1, 4, 3, 560, 560, device="meta")
    aspect_ratio_ids = torch.tensor([[6], [1]], device="meta")
    aspect_ratio_mask = torch.ones(2, 1, 4, dtype=torch.long, device="meta")
    with torch.no_grad():
        vision = model.model.vision_model(
            pixel_values=pixel_values, aspect_ratio_ids=aspect_ratio_ids, aspect_ratio_mask=aspect_ratio_mask
        ).last_hidden_state
        features, valid = model.vision_features(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        logits = model.classifier.eval()(features.mean(dim=1))
    assert vision.shape == (2, 1, 4, 1601, 7680)  # before the projector
    assert features.shape == (2, 4 * 1601, 4096) and valid.shape == (2, 4 * 1601)
    assert logits.shape == (2, 3)


def test_lora_targets_only_the_decoder_attention():
    peft_model = get_peft_model(meta_model(), LoraConfig(r=8, **ReceiptVLClassifier.lora_config_kwargs()))
    adapted = [name for name, module in peft_model.named_modules() if hasattr(module, "lora_A")]
    assert len(adapted) == 80  # q and v in each of the 40 layers (32 self-attention, 8 cross-attention)
    assert all(".language_model.layers." in name for name in adapted)
    assert sum(".cross_attn." in name for name in adapted) == 16
