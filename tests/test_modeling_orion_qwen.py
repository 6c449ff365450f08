import pytest
import torch
from orion_helpers import (
    NUM_HISTORY,
    NUM_SCENE,
    camera_image,
    driving_batch,
    driving_features,
    driving_prompt,
    real_vocab_model,
    small_config,
    small_model,
)
from torch.nn import functional as F


def test_forward_returns_trajectory_ego_features_logits_and_weighted_loss(family):
    model = small_model(family, waypoint_loss_weight=0.5, lm_loss_weight=2.0)
    batch = driving_batch(model.config)
    waypoints = torch.randn(2, 6, 2)
    out = model(**batch, ego_waypoints=waypoints, labels=batch["input_ids"])

    assert out.trajectory.shape == (2, 6, 2)
    assert out.trajectory_modes.shape == (2, 1, 6, 2)
    assert out.ego_features.shape == (2, model.config.text_config.hidden_size)
    assert out.logits.shape == (*batch["input_ids"].shape, model.config.text_config.vocab_size)
    torch.testing.assert_close(out.waypoint_loss, F.l1_loss(out.trajectory, waypoints))
    torch.testing.assert_close(out.loss, 0.5 * out.waypoint_loss + 2.0 * out.lm_loss)


def test_ego_features_are_the_last_hidden_state_at_the_ego_token(family):
    model = small_model(family)
    batch = driving_batch(model.config)
    out = model(**batch, output_hidden_states=True)
    ego_position = batch["input_ids"].shape[1] - 1
    torch.testing.assert_close(out.ego_features, out.hidden_states[-1][:, ego_position])
    torch.testing.assert_close(out.trajectory, model.trajectory_decoder(out.ego_features)[:, 0])


def test_projected_features_replace_their_placeholder_embeddings(family):
    model = small_model(family)
    batch = driving_batch(model.config, text_len=4)
    seen = {}
    model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True
    )
    model(**batch)

    embeds, ids, driving = seen["embeds"], batch["input_ids"], model.driving_embeddings
    torch.testing.assert_close(
        embeds[ids == 90].view(2, NUM_SCENE, -1), driving.scene_projector(batch["scene_queries"])
    )
    torch.testing.assert_close(
        embeds[ids == 91].view(2, NUM_HISTORY, -1), driving.history_projector(batch["history_queries"])
    )
    torch.testing.assert_close(embeds[ids == 92], driving.can_bus_projector(batch["can_bus"]))
    torch.testing.assert_close(embeds[ids == 93], driving.ego_embedding.weight.expand(2, -1))
    text = ids < 90
    torch.testing.assert_close(embeds[text], model.get_input_embeddings()(ids[text]))


@pytest.mark.parametrize("feature", ["scene_queries", "history_queries", "can_bus"])
def test_every_driving_feature_reaches_the_trajectory(family, feature):
    model = small_model(family)
    batch = driving_batch(model.config)
    before = model(**batch).trajectory
    batch[feature] = batch[feature] + 1.0
    assert not torch.allclose(model(**batch).trajectory, before)


def test_a_waypoint_only_batch_skips_the_vocabulary_projection(family):
    model = small_model(family)
    calls = []
    model.lm_head.register_forward_hook(lambda *args: calls.append(1))
    out = model(**driving_batch(model.config), ego_waypoints=torch.randn(2, 6, 2))
    assert out.logits is None and calls == []
    assert out.loss is not None and out.lm_loss is None


def test_backward_reaches_the_driving_modules(family):
    model = small_model(family).train()
    batch = driving_batch(model.config)
    model(**batch, ego_waypoints=torch.randn(2, 6, 2), labels=batch["input_ids"]).loss.backward()
    for name in ("scene_projector", "history_projector", "can_bus_projector", "ego_embedding"):
        grads = [p.grad for p in getattr(model.driving_embeddings, name).parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), name
    assert all(p.grad is not None for p in model.trajectory_decoder.parameters())


def test_command_selects_the_mode_and_the_loss_is_taken_on_it(family):
    model = small_model(family, num_modes=6)
    batch = driving_batch(model.config, batch_size=3)
    command = torch.tensor([0, 5, 2])
    waypoints = torch.randn(3, 6, 2)
    out = model(**batch, command=command, ego_waypoints=waypoints)

    assert out.trajectory_modes.shape == (3, 6, 6, 2)
    torch.testing.assert_close(out.trajectory, out.trajectory_modes[torch.arange(3), command])
    torch.testing.assert_close(out.waypoint_loss, F.l1_loss(out.trajectory, waypoints))
    assert model(**batch).trajectory is None


@pytest.mark.parametrize(
    ("kind", "loss_fn"), [("l1", F.l1_loss), ("smooth_l1", F.smooth_l1_loss), ("mse", F.mse_loss)]
)
def test_waypoint_loss_kind_follows_the_config(family, kind, loss_fn):
    model = small_model(family, waypoint_loss=kind)
    waypoints = torch.randn(2, 6, 2)
    out = model(**driving_batch(model.config), ego_waypoints=waypoints)
    torch.testing.assert_close(out.loss, loss_fn(out.trajectory, waypoints))


def test_without_driving_features_the_model_is_the_plain_backbone(family):
    model = small_model(family)
    plain = family.plain_model(family.plain_config(**family.tiny_kwargs(99))).eval()
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert missing == [] and all(key.startswith(("driving_embeddings.", "trajectory_decoder.")) for key in unexpected)
    ids = torch.randint(10, 80, (2, 9))
    out = model(input_ids=ids)
    assert out.trajectory is None and out.ego_features is None
    torch.testing.assert_close(out.logits, plain(input_ids=ids).logits)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batches_match_samples_run_alone(family, processor, side):
    model = real_vocab_model(family, processor)
    prompts = [
        driving_prompt(processor, "Plan the ego trajectory at the junction, please."),
        driving_prompt(processor),
    ]
    images = [camera_image(0), camera_image(1, width=84)]
    features = driving_features(2)

    alone = []
    for i in range(2):
        inputs = processor(
            images=[images[i]],
            text=[prompts[i]],
            **{name: value[i : i + 1] for name, value in features.items()},
            return_tensors="pt",
        )
        out = model(**inputs)
        alone.append((out.trajectory[0], out.logits[0, -1]))

    processor.tokenizer.padding_side = side
    try:
        inputs = processor(images=images, text=prompts, **features, padding=True, return_tensors="pt")
    finally:
        processor.tokenizer.padding_side = "right"
    assert (inputs["attention_mask"] == 0).any()
    out = model(**inputs)
    last = inputs["attention_mask"].sum(1) - 1 if side == "right" else [-1, -1]
    for i in range(2):
        torch.testing.assert_close(out.trajectory[i], alone[i][0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(out.logits[i, last[i]], alone[i][1], rtol=1e-4, atol=1e-5)


def test_camera_images_and_driving_features_are_used_together(family, processor):
    model = real_vocab_model(family, processor)
    prompt = driving_prompt(processor)
    features = driving_features(1)

    def plan(image):
        inputs = processor(images=[image], text=[prompt], **features, return_tensors="pt")
        assert inputs["mm_token_type_ids"].sum() > 0
        return model(**inputs).trajectory

    assert not torch.allclose(plan(camera_image(0)), plan(camera_image(1)))


def test_generate_splices_driving_features_at_prefill_then_uses_the_cache(family, processor):
    model = real_vocab_model(family, processor)
    inputs = processor(
        images=[camera_image(0)], text=[driving_prompt(processor)], **driving_features(1), return_tensors="pt"
    )
    calls = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(
            (kwargs["input_ids"].shape[1], kwargs.get("scene_queries") is not None, kwargs["cache"].get_seq_length())
        ),
        with_kwargs=True,
    )
    generated = model.generate(
        **inputs, max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True
    )

    prompt_length = inputs["input_ids"].shape[1]
    assert generated.sequences.shape == (1, prompt_length + 4)
    assert calls[0] == (prompt_length, True, 0)
    assert calls[1:] == [(1, False, prompt_length + step) for step in range(3)]

    changed = {**inputs, "scene_queries": inputs["scene_queries"] + 1.0}
    rerun = model.generate(
        **changed, max_new_tokens=1, do_sample=False, output_scores=True, return_dict_in_generate=True
    )
    assert not torch.allclose(rerun.scores[0], generated.scores[0])


def test_images_without_token_types_are_an_error(family, processor):
    model = real_vocab_model(family, processor)
    inputs = processor(
        images=[camera_image(0)], text=[driving_prompt(processor)], **driving_features(1), return_tensors="pt"
    )
    del inputs["mm_token_type_ids"]
    with pytest.raises(ValueError, match="mm_token_type_ids"):
        model(**inputs)


BAD_INPUTS = {
    "scene width": (lambda b: b.update(scene_queries=torch.randn(2, NUM_SCENE, 128)), r"scene_queries.*256.*128"),
    "scene rank": (
        lambda b: b.update(scene_queries=torch.randn(2, NUM_SCENE * 256)),
        r"scene_queries must have shape",
    ),
    "history width": (
        lambda b: b.update(history_queries=torch.randn(2, NUM_HISTORY, 7)),
        r"history_queries.*\(2, '\*', 256\).*\(2, 3, 7\)",
    ),
    "can bus width": (lambda b: b.update(can_bus=torch.randn(2, 88)), r"can_bus.*\(2, 89\).*\(2, 88\)"),
    "scene batch": (lambda b: b.update(scene_queries=torch.randn(3, NUM_SCENE, 256)), r"scene_queries.*\(3, 4, 256\)"),
    "can bus batch": (lambda b: b.update(can_bus=torch.randn(1, 89)), r"can_bus.*\(1, 89\)"),
    "scene rows": (
        lambda b: b.update(scene_queries=torch.randn(2, NUM_SCENE + 1, 256)),
        r"scene_queries has 5 rows per sample but input_ids hold \[4, 4\]",
    ),
    "scene missing": (lambda b: b.pop("scene_queries"), r"scene placeholder tokens.*scene_queries is None"),
    "nan scene": (lambda b: b["scene_queries"].__setitem__((0, 1, 2), float("nan")), r"scene_queries contains NaN"),
    "inf history": (lambda b: b["history_queries"].__setitem__((1, 0, 0), float("inf")), r"history_queries .*inf"),
    "nan can bus": (lambda b: b["can_bus"].__setitem__((0, 3), float("nan")), r"can_bus contains NaN"),
    "waypoint count": (
        lambda b: b.update(ego_waypoints=torch.randn(2, 5, 2)),
        r"ego_waypoints.*\(2, 6, 2\).*\(2, 5, 2\)",
    ),
    "waypoint nan": (lambda b: b.update(ego_waypoints=torch.full((2, 6, 2), float("nan"))), r"ego_waypoints .*NaN"),
    "missing ego token": (
        lambda b: b.update(
            ego_waypoints=torch.randn(2, 6, 2),
            input_ids=b["input_ids"][:, :-1],
            attention_mask=b["attention_mask"][:, :-1],
        ),
        r"no <ego_wp> token",
    ),
    "two ego tokens": (
        lambda b: b["input_ids"].__setitem__((1, 0), 93),
        r"exactly one <ego_wp> token; input_ids hold \[1, 2\]",
    ),
    "labels shape": (lambda b: b.update(labels=b["input_ids"][:, :-1]), r"labels must have the shape of input_ids"),
    "command without modes": (lambda b: b.update(command=torch.tensor([0, 1])), r"num_modes=1"),
    "features without ids": (lambda b: b.update(inputs_embeds=torch.randn(2, 20, 64), input_ids=None), r"input_ids"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_are_clear_errors(family, case):
    model = small_model(family)
    batch = driving_batch(model.config)
    if case == "features without ids":
        batch.pop("attention_mask")
    mutate, message = BAD_INPUTS[case]
    mutate(batch)
    with pytest.raises(ValueError, match=message):
        model(**batch)


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (None, r"command \(B,\) is required"),
        (torch.tensor([0, 6]), r"\[0, 6\)"),
        (torch.tensor([0.0, 1.0]), r"integer"),
    ],
)
def test_bad_commands_are_clear_errors(family, command, message):
    model = small_model(family, num_modes=6)
    with pytest.raises(ValueError, match=message):
        model(**driving_batch(model.config), command=command, ego_waypoints=torch.randn(2, 6, 2))


def test_placeholders_need_their_token_ids_in_the_config(family):
    model = small_model(family, scene_token_id=None)
    with pytest.raises(ValueError, match=r"config.scene_token_id is not set"):
        model(**driving_batch(small_config(family)))
