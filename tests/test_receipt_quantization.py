"""8-bit and 4-bit loading and QLoRA, on the CPU (bitsandbytes 0.50 runs both there)."""

import bitsandbytes as bnb
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from receipt_helpers import batch, make_model, make_processor, photo, question_prompt
from safetensors import safe_open
from torch import nn
from transformers import BitsAndBytesConfig, Trainer, TrainingArguments

from vlmheads import ReceiptVLClassifier
from vlmheads.data.receipts import synthetic_receipts

QUANTIZED_TYPES = {"8bit": bnb.nn.Linear8bitLt, "4bit": bnb.nn.Linear4bit}
FULL_PRECISION_PREFIXES = ("model.vision_model.", "model.multi_modal_projector", "lm_head", "classifier.")


def quantization(mode: str) -> BitsAndBytesConfig:
    if mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny multimodal-pooling classifier saved in full precision, with its processor."""
    folder = tmp_path_factory.mktemp("receipt-classifier")
    processor = make_processor()
    model = make_model(processor, pooling="multimodal")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, model, processor


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}


@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_quantized_loading_quantizes_the_text_decoder_only(saved, mode):
    folder, reference, processor = saved
    config = quantization(mode)
    model = ReceiptVLClassifier.from_pretrained(folder, quantization_config=config).eval()
    assert config.llm_int8_skip_modules is None  # the caller's config is left as it was
    skip_list = model.config.quantization_config.llm_int8_skip_modules
    assert skip_list == list(ReceiptVLClassifier.quantization_skip_modules)

    layers = linear_layers(model)
    decoder = {name: layer for name, layer in layers.items() if name.startswith("model.language_model.")}
    assert len(decoder) == 14 and all(isinstance(layer, QUANTIZED_TYPES[mode]) for layer in decoder.values())
    kept = {name: layer for name, layer in layers.items() if name not in decoder}
    assert {"model.multi_modal_projector", "lm_head", "classifier.hidden.0", "classifier.out_proj"} <= set(kept)
    vision = model.config.vision_config
    vision_linears = 6 * (vision.num_hidden_layers + vision.num_global_layers)  # q, k, v, o, fc1, fc2
    assert sum(name.startswith("model.vision_model.") for name in kept) == vision_linears
    for name, layer in kept.items():
        assert name.startswith(FULL_PRECISION_PREFIXES), name
        assert type(layer) is nn.Linear and layer.weight.dtype == torch.float32, name
    if mode == "4bit":
        assert all(layer.weight.quant_state.quant_type == "nf4" for layer in decoder.values())

    inputs = batch(processor, multimodal=True)
    with torch.no_grad():
        logits = model(**inputs).logits
    torch.testing.assert_close(logits, reference(**inputs).logits, rtol=0.05, atol=0.05)
    prompt = question_prompt(processor, "What is the total?")
    answer_inputs = processor(images=[photo(0)], text=[prompt], return_tensors="pt")
    generated = model.generate(**answer_inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == answer_inputs["input_ids"].shape[1] + 3


def test_a_skip_list_of_your_own_replaces_the_default(saved):
    folder, _, _ = saved
    # What the seed wrote: "vision_model" alone matches no module below `model.vision_model`, and the list
    # replaces transformers' default one, which held lm_head.
    seed_list = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["vision_model"])
    model = ReceiptVLClassifier.from_pretrained(folder, quantization_config=seed_list)
    assert isinstance(model.model.vision_model.transformer.layers[0].self_attn.q_proj, bnb.nn.Linear8bitLt)
    assert isinstance(model.model.multi_modal_projector, bnb.nn.Linear8bitLt)
    assert isinstance(model.lm_head, bnb.nn.Linear8bitLt)


@pytest.mark.slow
def test_qlora_adapts_the_decoder_trains_with_the_trainer_saves_and_reloads(saved, tmp_path):
    folder, _, processor = saved
    base = ReceiptVLClassifier.from_pretrained(folder, quantization_config=quantization("4bit"))
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, **ReceiptVLClassifier.lora_config_kwargs())
    model = get_peft_model(base, lora)

    adapted = {name for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert len(adapted) == 4  # q and v of the self- and the cross-attention layer
    assert all(".language_model.layers." in name for name in adapted)
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable and all("lora_" in name or ".classifier.modules_to_save." in name for name in trainable)
    assert any(".classifier.modules_to_save." in name for name in trainable)

    # Plain q_proj/v_proj targets would also adapt the vision tower.
    plain_targets = get_peft_model(make_model(processor), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert any("vision_model" in name for name, module in plain_targets.named_modules() if hasattr(module, "lora_A"))

    photos = synthetic_receipts(12, seed=1)
    prompt = processor.classification_prompt()

    def collate(rows):
        return processor(
            images=[row["image"] for row in rows],
            text=[prompt] * len(rows),
            labels=[row["label"] for row in rows],
            padding=True,
            return_tensors="pt",
        )

    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters() if name in trainable}
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        remove_unused_columns=False,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=photos, data_collator=collate).train()
    changed = {name for name, parameter in model.named_parameters() if name in before}
    changed = {name for name in changed if not torch.equal(model.get_parameter(name), before[name])}
    assert any("lora_B" in name for name in changed) and any("classifier" in name for name in changed)

    model.save_pretrained(tmp_path / "adapter")
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as adapter:
        keys = set(adapter.keys())
    assert any("lora_A" in key for key in keys) and any("classifier" in key for key in keys)
    assert not any("vision_model" in key for key in keys)

    model.eval()
    inputs = collate([photos[0], photos[1]])
    inputs.pop("labels")
    with torch.no_grad():
        trained = model(**inputs).logits
    fresh_base = ReceiptVLClassifier.from_pretrained(folder, quantization_config=quantization("4bit"))
    reloaded = PeftModel.from_pretrained(fresh_base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, trained, rtol=1e-4, atol=1e-4)
