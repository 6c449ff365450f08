import torch
from orion_helpers import SMALL_IDS, SMALL_VOCAB, driving_batch, small_model
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModel

DRIVING_KEYS = {
    "driving_embeddings.scene_projector.weight",
    "driving_embeddings.scene_projector.bias",
    "driving_embeddings.history_projector.weight",
    "driving_embeddings.history_projector.bias",
    "driving_embeddings.can_bus_projector.0.weight",
    "driving_embeddings.can_bus_projector.0.bias",
    "driving_embeddings.ego_embedding.weight",
    "trajectory_decoder.mlp.0.weight",
    "trajectory_decoder.mlp.0.bias",
    "trajectory_decoder.mlp.2.weight",
    "trajectory_decoder.mlp.2.bias",
}


def test_a_plain_qwen_checkpoint_loads_every_backbone_weight(family, tmp_path):
    torch.manual_seed(0)
    plain = family.plain_model(family.plain_config(**family.tiny_kwargs(SMALL_VOCAB))).eval()
    plain.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as checkpoint:
        assert any(key.startswith("model.layers.") for key in checkpoint.keys())  # the legacy Hub layout

    model, info = family.model.from_pretrained(
        tmp_path, output_loading_info=True, num_scene_queries=4, num_history_queries=3, **SMALL_IDS
    )
    assert set(info["missing_keys"]) == DRIVING_KEYS
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    plain_state = plain.state_dict()
    model_state = model.state_dict()
    assert set(model_state) - set(plain_state) == DRIVING_KEYS
    for key, value in plain_state.items():
        assert torch.equal(model_state[key], value), key

    ids = torch.randint(10, 80, (2, 11))
    torch.testing.assert_close(model.eval()(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=0, atol=0)


def test_save_and_reload_keep_every_weight_and_prediction(family, tmp_path):
    model = small_model(family, num_modes=3)
    model.save_pretrained(tmp_path)
    reloaded, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert type(reloaded) is family.model
    assert not any(info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    batch = driving_batch(model.config)
    command = torch.tensor([2, 0])
    torch.testing.assert_close(
        reloaded.eval()(**batch, command=command).trajectory, model(**batch, command=command).trajectory
    )


def test_saved_weights_reload_with_a_plain_load_state_dict_as_the_trainer_resumes(family, tmp_path):
    """Saved in transformers' own key layout: the Trainer resumes with `load_state_dict`, which skips renamed keys."""
    model = small_model(family)
    model.save_pretrained(tmp_path)
    fresh = small_model(family, seed=1)
    result = fresh.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= {"lm_head.weight"}  # tied to the embeddings
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
