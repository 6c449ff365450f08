"""Real-size architectures from their public configs, built on the meta device: shapes without memory."""

import pytest
import torch
from orion_helpers import FAMILIES, make_processor

from vlmheads.offline import public_config

REAL_SIZES = {
    "Qwen/Qwen2-VL-2B-Instruct": ("qwen2_vl", 1536),
    "Qwen/Qwen2-VL-7B-Instruct": ("qwen2_vl", 3584),
    "Qwen/Qwen2.5-VL-3B-Instruct": ("qwen2_5_vl", 2048),
    "Qwen/Qwen2.5-VL-7B-Instruct": ("qwen2_5_vl", 3584),
}
PLACEHOLDER_IDS = {
    "scene_token_id": 151657,
    "history_token_id": 151658,
    "can_bus_token_id": 151659,
    "ego_token_id": 151660,
}


def meta_model(repo_id: str, **overrides):
    family = FAMILIES[REAL_SIZES[repo_id][0]]
    config = family.config(**public_config(repo_id), **PLACEHOLDER_IDS, **overrides)
    with torch.device("meta"):
        return family.model(config)


@pytest.mark.parametrize("repo_id", sorted(REAL_SIZES))
def test_projectors_and_trajectory_decoder_follow_the_hidden_size(repo_id):
    hidden_size = REAL_SIZES[repo_id][1]
    model = meta_model(repo_id)
    assert model.config.text_config.hidden_size == hidden_size
    driving = model.driving_embeddings
    assert driving.scene_projector.in_features == 256 and driving.scene_projector.out_features == hidden_size
    assert driving.history_projector.out_features == hidden_size
    assert driving.can_bus_projector[0].in_features == 89 and driving.can_bus_projector[-1].out_features == hidden_size
    assert driving.ego_embedding.embedding_dim == hidden_size
    assert model.trajectory_decoder.mlp[0].in_features == hidden_size
    assert model.trajectory_decoder.mlp[-1].out_features == 6 * 2
    assert model.lm_head.in_features == hidden_size
    assert all(p.device.type == "meta" for p in model.parameters())


def test_the_released_orion_model_is_a_configuration():
    """ORION as released: 512 scene (256 detection + 256 map) and 16 history queries, an 89 → 1024 → H CAN-bus
    MLP, the planning token `<waypoint_ego>` and six trajectory modes, one per navigation command."""
    processor = make_processor(
        FAMILIES["qwen2_vl"], num_scene_queries=512, num_history_queries=16, ego_token="<waypoint_ego>"
    )
    config = FAMILIES["qwen2_vl"].config(
        **public_config("Qwen/Qwen2-VL-7B-Instruct"),
        **processor.model_config_kwargs(),
        can_bus_hidden_dims=[1024],
        num_modes=6,
    )
    with torch.device("meta"):
        model = FAMILIES["qwen2_vl"].model(config)

    can_bus = model.driving_embeddings.can_bus_projector
    assert [(layer.in_features, layer.out_features) for layer in (can_bus[0], can_bus[2])] == [
        (89, 1024),
        (1024, 3584),
    ]
    assert type(can_bus[1]).__name__ == "ReLU"
    assert model.trajectory_decoder.trajectory_shape == (6, 6, 2)
    assert model.trajectory_decoder.mlp[-1].out_features == 6 * 6 * 2

    content = [{"type": "scene"}, {"type": "history"}, {"type": "can_bus"}, {"type": "ego"}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}])
    features = {
        "scene_queries": torch.zeros(1, 512, 256),
        "history_queries": torch.zeros(1, 16, 256),
        "can_bus": torch.zeros(1, 89),
    }
    ids = processor(text=[prompt], **features)["input_ids"][0]
    assert ids.count(config.scene_token_id) == 512 and ids.count(config.history_token_id) == 16
    assert ids.count(config.ego_token_id) == 1
    assert processor.tokenizer.convert_tokens_to_ids("<waypoint_ego>") == config.ego_token_id
