import json

import numpy as np
import pytest
import torch
from remote_code_checks import assert_flat_self_contained_code, run_without_vlmheads
from transformers import AutoConfig, AutoModel
from vla_helpers import ACTION_HEADS, FAST_FAMILY, VLA_FAMILIES, batch_for, make_model, processor_of, records

from vlmheads.configuration.configuration_vla import VLAConfig
from vlmheads.modeling.modeling_vla import ActionBinsLogitsProcessor, VLAForActionPrediction, VLAOutput
from vlmheads.registry.vlms import create_vlm, load_processor, tiny_vlm_config
from vlmheads.training.backbones import add_lora
from vlmheads.training.vla import make_room_for_action_bins, normalization_statistics

# The code files a saved VLA needs at least (the shared head file may bring its sibling heads' configurations).
CODE_FILES = {
    "configuration_vla.py",
    "configuration_vlm_heads.py",
    "modeling_vla.py",
    "modeling_vlm_heads.py",
    "heads.py",
    "families.py",
    "publishing.py",
}


def settings_for(action_head: str) -> dict:
    """Chunks of 2 actions of 2 dimensions (the synthetic set's); the regression and flow heads also read a state."""
    state = {} if action_head == "tokens" else {"state_dim": 2}
    return {"action_dim": 2, "chunk_size": 2, **state}


def sample_batch(model, family, num_samples=2):
    samples = records(num_samples, chunk_size=2, with_state=True)
    return batch_for(model, family, samples)


def check_shapes_and_training(family: str, action_head: str) -> None:
    model = make_model(family, action_head, **settings_for(action_head))
    batch = sample_batch(model, family)
    assert ("state" in batch) == (action_head != "tokens")
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    torch.manual_seed(0)
    noise = torch.randn(2, 2, 2)
    time = torch.full((2,), 0.5)
    losses = []
    for _ in range(6):
        if action_head == "flow":
            # Fixed noise and time: the loss of one draw, which training on it must lower.
            inputs = {name: value for name, value in batch.items() if name not in ("actions", "state")}
            _, condition = model._condition(inputs, batch["state"])
            loss = model.action_head.loss(condition, model.normalize_actions(batch["actions"]), noise, time)
        else:
            output = model(**batch)
            assert isinstance(output, VLAOutput) and output.loss.shape == ()
            loss = output.loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert np.isfinite(losses).all() and losses[-1] < losses[0], losses

    model.eval()
    output = model(**batch)
    assert output.actions.shape == (2, 2, 2)
    inputs = {name: value for name, value in batch.items() if name != "actions"}
    predicted = model.predict_actions(**inputs)
    assert predicted.shape == (2, 2, 2) and torch.isfinite(predicted).all()
    if action_head == "tokens":
        # Decoded actions are bin centres inside the bins' range [-1, 1].
        assert predicted.abs().max() < 1
        assert output.logits.shape[:2] == (2, 4)


@pytest.mark.parametrize("action_head", ACTION_HEADS)
def test_each_head_trains_and_predicts_on_the_fast_family(action_head):
    check_shapes_and_training(FAST_FAMILY, action_head)


@pytest.mark.slow
@pytest.mark.parametrize("action_head", ACTION_HEADS)
@pytest.mark.parametrize("family", [name for name in VLA_FAMILIES if name != FAST_FAMILY])
def test_each_head_trains_and_predicts_on_every_family(family, action_head):
    check_shapes_and_training(family, action_head)


def test_the_families_come_from_the_tiny_modules():
    assert FAST_FAMILY in VLA_FAMILIES and "pi0" not in VLA_FAMILIES
    assert {"smolvlm", "qwen2-vl", "florence-2", "mllama"} <= set(VLA_FAMILIES)


def test_the_issue_example_builds_a_flow_head_on_a_tiny_smolvlm():
    model = VLAForActionPrediction.from_backbone(create_vlm("smolvlm", tiny=True), action_head="flow")
    assert model.config.action_dim == 7 and model.config.chunk_size == 1
    assert model.head_modules == ("action_head",)
    assert model.config.head_hidden_dims == [128, 128]


def test_the_action_bins_round_trip_through_the_statistics():
    model = make_model(FAST_FAMILY, "tokens", action_dim=2, action_low=[-2.0, 0.0], action_high=[2.0, 1.0])
    actions = torch.tensor([[[-2.0, 0.0], [1.99, 0.5]], [[5.0, -3.0], [0.0, 1.0]]])
    bins = model.actions_to_bins(actions)
    assert bins.tolist() == [[[0, 0], [255, 128]], [[255, 0], [128, 255]]]
    decoded = model.bins_to_actions(bins)
    inside = actions.clamp(torch.tensor([-2.0, 0.0]), torch.tensor([2.0, 1.0]))
    assert (decoded - inside).abs().max() <= torch.tensor([4.0, 1.0]).max() / 256
    assert model.first_bin_id == model.vocab_size - 256


def test_tokens_decoding_is_restricted_to_the_bins():
    model = make_model(FAST_FAMILY, "tokens", action_dim=2, chunk_size=2).eval()
    batch = sample_batch(model, FAST_FAMILY)
    batch.pop("actions")
    generated = model.backbone.generate(
        **batch,
        max_new_tokens=4,
        do_sample=False,
        logits_processor=[ActionBinsLogitsProcessor(model.first_bin_id, 256)],
    )
    assert (generated[:, -4:] >= model.first_bin_id).all()


def test_normalization_statistics_set_the_config():
    actions = np.random.default_rng(0).normal([1.0, -2.0, 0.0], [0.5, 2.0, 1e-9], size=(500, 2, 3))
    states = np.random.default_rng(1).normal(3.0, 0.1, size=(500, 2))
    statistics = normalization_statistics(actions, states)
    assert statistics["action_mean"] == pytest.approx([1.0, -2.0, 0.0], abs=0.1)
    assert statistics["action_std"][:2] == pytest.approx([0.5, 2.0], rel=0.1) and statistics["action_std"][2] == 1.0
    assert statistics["action_low"][0] == pytest.approx(1.0 - 2.33 * 0.5, abs=0.15)
    assert statistics["action_high"][2] - statistics["action_low"][2] == pytest.approx(2.0, abs=1e-6)
    config = VLAConfig(backbone_config=tiny_vlm_config(FAST_FAMILY), action_dim=3, state_dim=2, **statistics)
    assert config.state_mean == pytest.approx([3.0, 3.0], abs=0.05)
    with pytest.raises(ValueError, match="actions contain NaN"):
        normalization_statistics(np.full((4, 1, 3), np.nan))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"action_head": "diffusion"}, "action_head must be one of"),
        ({"action_dim": 0}, "action_dim must be a positive integer"),
        ({"chunk_size": -1}, "chunk_size must be a positive integer"),
        ({"state_dim": -1}, "state_dim must be 0"),
        ({"num_action_bins": 1}, "num_action_bins must be at least 2"),
        ({"action_dim": 2, "action_mean": [0.0]}, r"action_mean must hold 2 values"),
        ({"action_dim": 1, "action_std": [0.0]}, "action_std must be positive"),
        ({"action_dim": 1, "action_low": [1.0], "action_high": [1.0]}, "action_high must exceed action_low"),
        ({"state_dim": 1, "state_std": [float("nan")]}, "state_std must be finite"),
        ({"head_hidden_act": ""}, "head_hidden_act must name an activation"),
    ],
)
def test_bad_settings_are_rejected_with_the_setting_named(settings, message):
    with pytest.raises(ValueError, match=message):
        VLAConfig(backbone_config=tiny_vlm_config(FAST_FAMILY), **settings)


def test_an_unknown_activation_is_refused_when_the_model_is_built():
    # Configurations import no torch; transformers' activation table does, so the model checks the name.
    config = VLAConfig(backbone_config=tiny_vlm_config(FAST_FAMILY), head_hidden_act="swishy")
    with pytest.raises(ValueError, match="head_hidden_act must be one of transformers' activations, got 'swishy'"):
        VLAForActionPrediction(config)


@pytest.fixture(scope="module")
def regression_model():
    return make_model(FAST_FAMILY, "regression", **settings_for("regression")).eval()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda batch: batch.update(actions=batch["actions"][..., :1]), r"actions must have shape \(B, chunk_size"),
        (lambda batch: batch.update(actions=batch["actions"][:, :1]), r"actions must have shape \(B, chunk_size"),
        (lambda batch: batch["actions"].__setitem__((0, 0, 0), float("nan")), "actions contains NaN"),
        (lambda batch: batch["state"].__setitem__((1, 0), float("nan")), "state contains NaN"),
        (lambda batch: batch.update(state=batch["state"][:, :1]), r"state must have shape \(B, state_dim\)"),
        (lambda batch: batch.pop("state"), r"state \(B, state_dim=2\) is required"),
        (lambda batch: batch.pop("input_ids"), "input_ids is required"),
    ],
)
def test_bad_inputs_are_rejected_with_the_input_named(regression_model, change, message):
    batch = sample_batch(regression_model, FAST_FAMILY)
    change(batch)
    with pytest.raises(ValueError, match=message):
        regression_model(**batch)


def test_a_state_for_a_model_without_state_is_rejected():
    model = make_model(FAST_FAMILY, "regression", action_dim=2, chunk_size=2).eval()
    batch = sample_batch(model, FAST_FAMILY)
    with pytest.raises(ValueError, match="state was given but this model has state_dim=0"):
        model(**batch, state=torch.zeros(2, 2))


def test_a_tokens_head_needs_room_for_its_bins():
    # The tiny SmolVLM tokenizer adds its special tokens after the BPE: <image> sits among the last 256 ids.
    with pytest.raises(ValueError, match=r"image_token_id.*lie among them.*make_room_for_action_bins"):
        VLAForActionPrediction.from_backbone(create_vlm("smolvlm", tiny=True), action_head="tokens")
    # A vocabulary smaller than the bins.
    with pytest.raises(ValueError, match="num_action_bins=600 bins onto the last ids"):
        VLAForActionPrediction.from_backbone(
            create_vlm("smolvlm", tiny=True), action_head="tokens", num_action_bins=600
        )
    # PaliGemma's processor adds 1,152 location and segmentation tokens at the end: only its tokenizer knows them.
    paligemma = VLAForActionPrediction.from_backbone(create_vlm(FAST_FAMILY, tiny=True), action_head="tokens")
    with pytest.raises(ValueError, match="the tokenizer's '<seg127>'"):
        paligemma.check_action_bins(processor_of(FAST_FAMILY).tokenizer)

    backbone = create_vlm("smolvlm", tiny=True)
    tokenizer = processor_of("smolvlm").tokenizer
    vocab_size = make_room_for_action_bins(backbone, tokenizer, 256)
    assert vocab_size == max(tokenizer.all_special_ids + list(tokenizer.added_tokens_decoder)) + 1 + 256
    model = VLAForActionPrediction.from_backbone(backbone, action_head="tokens")
    model.check_action_bins(tokenizer)
    assert make_room_for_action_bins(model.backbone, tokenizer, 256) == vocab_size
    # A token added to the tokenizer afterwards lands on bin 0: the check with the tokenizer catches it.
    grown = load_processor("smolvlm", tiny=True).tokenizer
    grown.add_special_tokens({"additional_special_tokens": ["<new_marker>"]})
    with pytest.raises(ValueError, match="the tokenizer's '<new_marker>'"):
        model.check_action_bins(grown)
    with pytest.raises(ValueError, match="state_dim must be 0 for action_head='tokens'"):
        VLAForActionPrediction.from_backbone(backbone, action_head="tokens", state_dim=2)


def test_the_tokens_head_needs_left_padded_prompts():
    model = make_model(FAST_FAMILY, "tokens", action_dim=2, chunk_size=2)
    samples = records(2, chunk_size=2)
    batch = batch_for(model, FAST_FAMILY, samples)
    processor = processor_of(FAST_FAMILY)
    right = processor(
        images=[list(record["images"]) for record in samples],
        text=["pick up the red cube", "go"],
        padding=True,
        padding_side="right",
        return_tensors="pt",
    )
    right.pop("labels", None)
    with pytest.raises(ValueError, match="pad the prompts on the left"):
        model(**right, actions=batch["actions"])


def test_a_policy_family_is_not_a_backbone():
    with pytest.raises(ValueError, match="'pi0' model, a complete robot policy"):
        VLAConfig(backbone_config=tiny_vlm_config("pi0"))


@pytest.mark.parametrize("action_head", ACTION_HEADS)
def test_save_and_reload_give_the_same_actions(action_head, tmp_path):
    model = make_model(FAST_FAMILY, action_head, **settings_for(action_head)).eval()
    batch = sample_batch(model, FAST_FAMILY)
    batch.pop("actions")
    model.save_pretrained(tmp_path)
    saved_code = {path.name for path in tmp_path.glob("*.py")}
    assert CODE_FILES <= saved_code
    assert_flat_self_contained_code(tmp_path, saved_code)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_vla.VLAConfig",
        "AutoModel": "modeling_vla.VLAForActionPrediction",
    }
    for loaded in (VLAForActionPrediction.from_pretrained(tmp_path), AutoModel.from_pretrained(tmp_path)):
        assert type(loaded) is VLAForActionPrediction
        for state, reloaded in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
            assert torch.equal(state, reloaded)
        torch.manual_seed(0)
        expected = model.predict_actions(**batch)
        torch.manual_seed(0)
        # Thread scheduling on a loaded CPU can move float32 sums by an ulp; the flow head's 10 steps carry it.
        torch.testing.assert_close(loaded.eval().predict_actions(**batch), expected, rtol=1e-4, atol=1e-4)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), VLAConfig)


@pytest.mark.slow
@pytest.mark.parametrize("action_head", ACTION_HEADS)
def test_a_fresh_interpreter_without_vlmheads_loads_the_folder_and_matches(action_head, tmp_path):
    model = make_model(FAST_FAMILY, action_head, **settings_for(action_head)).eval()
    batch = sample_batch(model, FAST_FAMILY)
    batch.pop("actions")
    model.save_pretrained(tmp_path / "model")
    remote = run_without_vlmheads("isolated_load_vla.py", tmp_path / "model", {"inputs": batch}, tmp_path)
    assert [name.rsplit(".", 1)[1] for name in remote["classes"]] == ["VLAConfig", "VLAForActionPrediction"]
    torch.manual_seed(0)
    torch.testing.assert_close(remote["actions"], model.predict_actions(**batch), rtol=1e-4, atol=1e-4)


def test_lora_trains_the_action_head_in_full():
    model = make_model(FAST_FAMILY, "flow", action_dim=3)
    peft_model = add_lora(model, r=4)
    trainable = {name for name, parameter in peft_model.named_parameters() if parameter.requires_grad}
    assert any("action_head" in name and "modules_to_save" in name for name in trainable)
    assert any("lora_A" in name and "language_model" in name for name in trainable)
    assert not any("vision_tower" in name for name in trainable)


def test_lora_on_a_tokens_head_trains_the_language_model_head_in_full():
    model = make_model(FAST_FAMILY, "tokens", action_dim=2)
    assert model.head_modules == ("backbone.lm_head",)
    trainable = {name for name, parameter in add_lora(model, r=4).named_parameters() if parameter.requires_grad}
    assert any("lm_head.modules_to_save" in name for name in trainable)
