import pytest
from orion_helpers import SMALL_IDS, SMALL_VOCAB, small_config

from vlmheads.configuration.configuration_orion_qwen import OrionDrivingConfigMixin


def test_defaults_follow_the_migration_document(family):
    config = family.config(**family.tiny_kwargs(SMALL_VOCAB))
    assert (config.num_scene_queries, config.scene_query_dim) == (256, 256)
    assert (config.num_history_queries, config.history_query_dim) == (256, 256)
    assert (config.can_bus_dim, config.can_bus_hidden_dims) == (89, [])
    assert (config.num_waypoints, config.waypoint_dim, config.num_modes) == (6, 2, 1)
    assert config.trajectory_hidden_dims == [config.text_config.hidden_size // 2]


def test_the_trajectory_decoder_width_follows_the_text_config(family):
    kwargs = family.tiny_kwargs(SMALL_VOCAB, hidden_size=128)
    assert family.config(**kwargs).trajectory_hidden_dims == [64]


def test_save_and_reload_keep_every_driving_setting(family, tmp_path):
    config = small_config(family, num_modes=6, can_bus_hidden_dims=[32], waypoint_loss="mse", lm_loss_weight=0.1)
    config.save_pretrained(tmp_path)
    reloaded = family.config.from_pretrained(tmp_path)
    for name in OrionDrivingConfigMixin.__dataclass_fields__:
        assert getattr(reloaded, name) == getattr(config, name), name


INVALID = {
    "zero scene queries": ({"num_scene_queries": 0}, r"num_scene_queries must be a positive integer, got 0"),
    "negative history width": ({"history_query_dim": -3}, r"history_query_dim must be a positive integer, got -3"),
    "zero can bus width": ({"can_bus_dim": 0}, r"can_bus_dim"),
    "zero waypoints": ({"num_waypoints": 0}, r"num_waypoints"),
    "zero modes": ({"num_modes": 0}, r"num_modes"),
    "zero hidden width": ({"can_bus_hidden_dims": [1024, 0]}, r"can_bus_hidden_dims must hold positive widths"),
    "token outside vocabulary": (
        {"ego_token_id": SMALL_VOCAB},
        r"ego_token_id=99 is outside the vocabulary \[0, 99\)",
    ),
    "negative token id": ({"scene_token_id": -1}, r"scene_token_id=-1 is outside"),
    "shared placeholder id": ({"history_token_id": 90}, r"history_token_id and scene_token_id share the id 90"),
    "placeholder on image token": ({"can_bus_token_id": 5}, r"can_bus_token_id and image_token_id share the id 5"),
    "unknown loss": ({"waypoint_loss": "huber"}, r"waypoint_loss must be one of"),
    "negative loss weight": ({"lm_loss_weight": -1.0}, r"lm_loss_weight must be non-negative"),
    "empty activation": ({"trajectory_hidden_act": ""}, r"trajectory_hidden_act must name an activation"),
    "unknown trajectory head": ({"trajectory_head": "vae"}, r"trajectory_head must be one of \('mlp', 'flow'\)"),
    "zero flow steps": ({"flow_num_steps": 0}, r"flow_num_steps must be a positive integer, got 0"),
    "displacement stats of another width": (
        {"displacement_mean": [0.0, 0.0, 0.0]},
        r"displacement_mean needs one value per waypoint coordinate \(2\)",
    ),
    "zero displacement std": ({"displacement_std": [1.0, 0.0]}, r"displacement_std must hold positive values"),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_settings_raise_at_construction(family, case):
    overrides, message = INVALID[case]
    with pytest.raises(ValueError, match=message):
        small_config(family, **overrides)


def test_an_unknown_activation_is_refused_when_the_model_is_built(family):
    # Configurations import no torch; transformers' activation table does, so the model checks the name.
    config = small_config(family, projector_hidden_act="swishy")
    with pytest.raises(ValueError, match="projector_hidden_act must be one of transformers' activations"):
        family.model(config)


def test_from_pretrained_overrides_are_checked_when_the_model_is_built(family, tmp_path):
    family.plain_model(family.plain_config(**family.tiny_kwargs(SMALL_VOCAB))).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"scene_token_id=1000 is outside the vocabulary"):
        family.model.from_pretrained(tmp_path, **{**SMALL_IDS, "scene_token_id": 1000})
