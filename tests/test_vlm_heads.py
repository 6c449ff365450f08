"""The classification and trajectory heads on every family with a tiny offline configuration: shapes, training,
generation, save and reload (also as remote code without vlmheads), and bad input."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from remote_code_checks import assert_flat_self_contained_code, run_without_vlmheads
from vlm_helpers import (
    DRIVING_SIZES,
    FAMILY_NAMES,
    driving_batch,
    driving_processor,
    family_batch,
    tiny_backbone,
    tiny_image,
    tiny_processor,
    trajectory_backbone,
)

from vlmheads import (
    VLMClassificationConfig,
    VLMForImageClassification,
    VLMForTrajectory,
    encode_images,
    tiny_vlm_config,
)

LABELS = torch.tensor([0, 1, 2, 1])
# What a saved multimodal classifier holds: its own head's code, the shared base, the family table and its pipeline,
# and nothing of the trajectory head (each head ships only its own task's code).
CODE_FILES = {
    "configuration_classifier.py",
    "configuration_vlm_classification.py",
    "configuration_vlm_heads.py",
    "constants.py",
    "remote_code.py",
    "modeling_base.py",
    "modeling_classifier.py",
    "modeling_vlm_classification.py",
    "modeling_vlm_heads.py",
    "positions.py",
    "heads.py",
    "families.py",
    "publishing.py",
    # The classifier's pipeline and what it imports.
    "pipeline_vlm_classification.py",
    "pipeline_inputs.py",
    "image_inputs.py",
}


def classifier(name: str, pooling: str) -> VLMForImageClassification:
    return VLMForImageClassification.from_backbone(
        tiny_backbone(name),
        num_labels=3,
        pooling=pooling,
        classifier_hidden_dims=[32],
        classifier_dropout_rates=[0.0],
    )


def trajectory_model(name: str, head: str) -> VLMForTrajectory:
    placeholders = driving_processor(name).model_config_kwargs()
    return VLMForTrajectory.from_backbone(
        trajectory_backbone(name), trajectory_head=head, **DRIVING_SIZES, **placeholders
    )


def _train(model, batch: dict, steps: int = 3) -> tuple[float, float]:
    """The eval loss on `batch` before and after `steps` Adam steps; every call draws the same flow times and noise."""

    def eval_loss() -> float:
        model.eval()
        torch.manual_seed(0)
        with torch.no_grad():
            return model(**batch).loss.item()

    before = eval_loss()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    model.train()
    for _ in range(steps):
        torch.manual_seed(0)
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return before, eval_loss()


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_classification_shapes_training_and_generation(name):
    batch = {**family_batch(name, ["What is it?"] * 4, seeds=[0, 1, 2, 3]), "labels": LABELS}
    for pooling in ("vision", "multimodal"):
        model = classifier(name, pooling)
        with torch.no_grad():
            output = model.eval()(**batch)
        assert output.logits.shape == (4, 3) and output.pooled_features.shape == (4, model.config.hidden_size)
        before, after = _train(model, batch)
        assert after < before, pooling
    question = family_batch(name, ["What is it?"], seeds=[0])
    generated = model.generate(**question, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert torch.equal(generated, model.backbone.generate(**question, max_new_tokens=2, min_new_tokens=2))


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_trajectory_shapes_training_and_generation(name):
    batch = driving_batch(name, batch_size=2)
    for head in ("mlp", "flow"):
        model = trajectory_model(name, head)
        torch.manual_seed(0)
        with torch.no_grad():
            output = model.eval()(**batch)
        assert output.trajectory.shape == (2, DRIVING_SIZES["num_waypoints"], 2)
        assert output.ego_features.shape == (2, model.config.hidden_size)
        before, after = _train(model, batch)
        assert after < before, head
    question = family_batch(name, ["Where to?"], seeds=[0], processor=driving_processor(name).processor)
    assert model.generate(**question, max_new_tokens=2, min_new_tokens=2, do_sample=False).shape[0] == 1


def test_trajectory_without_images_and_with_modes():
    model = VLMForTrajectory.from_backbone(
        trajectory_backbone("llava"), num_modes=3, **DRIVING_SIZES, **driving_processor("llava").model_config_kwargs()
    )
    batch = driving_batch("llava", images=False)
    output = model.eval()(**batch, command=torch.tensor([2, 0]))
    torch.testing.assert_close(output.trajectory, output.trajectory_modes[[0, 1], [2, 0]])
    with pytest.raises(ValueError, match="command .* is required to train a model with num_modes=3"):
        model(**batch)


@dataclass
class SavedHead:
    folder: Path
    auto_class: str
    inputs: dict
    seed: int
    output: torch.Tensor
    generate_inputs: dict
    generated: torch.Tensor


@pytest.fixture(scope="session")
def saved_heads(tmp_path_factory):
    """Each family's classifier (pooling "multimodal") and flow trajectory head, saved once: `get(name, kind)`."""
    saved = {}

    def get(name: str, kind: str) -> SavedHead:
        if (name, kind) not in saved:
            if kind == "classification":
                model, auto_class = classifier(name, "multimodal"), "AutoModelForImageClassification"
                inputs = family_batch(name, ["Hi", "What is it?"], seeds=[0, 1])
            else:
                model, auto_class, inputs = trajectory_model(name, "flow"), "AutoModel", driving_batch(name)
            folder = tmp_path_factory.mktemp(f"{name}-{kind}")
            model.eval().save_pretrained(folder)
            torch.manual_seed(1)
            with torch.no_grad():
                output = model(**inputs)
            question = family_batch(name, ["What is it?"], seeds=[0])
            generated = model.generate(**question, max_new_tokens=2, do_sample=False)
            value = output.logits if kind == "classification" else output.trajectory
            saved[name, kind] = SavedHead(folder, auto_class, inputs, 1, value, question, generated)
        return saved[name, kind]

    return get


@pytest.mark.parametrize("kind", ["classification", "trajectory"])
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_save_and_reload_through_the_auto_classes(name, kind, saved_heads):
    head = saved_heads(name, kind)
    reloaded = getattr(transformers, head.auto_class).from_pretrained(head.folder).eval()
    assert type(reloaded) is (VLMForImageClassification if kind == "classification" else VLMForTrajectory)
    torch.manual_seed(head.seed)
    with torch.no_grad():
        output = reloaded(**head.inputs)
    torch.testing.assert_close(output.logits if kind == "classification" else output.trajectory, head.output)


@pytest.mark.slow
def test_every_family_loads_as_remote_code_without_vlmheads(saved_heads, tmp_path):
    """Both heads of every family, loaded and run in ONE interpreter where vlmheads cannot be imported."""
    heads = [saved_heads(name, kind) for name in FAMILY_NAMES for kind in ("classification", "trajectory")]
    assert_flat_self_contained_code(heads[0].folder, CODE_FILES)
    request = {
        "models": [
            {
                "folder": str(head.folder),
                "auto_class": head.auto_class,
                "inputs": head.inputs,
                "seed": head.seed,
                "generate_inputs": head.generate_inputs,
            }
            for head in heads
        ]
    }
    remote = run_without_vlmheads("isolated_load_vlm_heads.py", tmp_path, request, tmp_path)
    assert [name.rsplit(".", 1)[1] for name in remote["classes"]] == [
        "VLMClassificationConfig",
        "VLMForImageClassification",
        "VLMTrajectoryConfig",
        "VLMForTrajectory",
    ] * len(FAMILY_NAMES)
    for head, output, generated in zip(heads, remote["outputs"], remote["generated"], strict=True):
        torch.testing.assert_close(output, head.output)
        assert torch.equal(generated, head.generated)


# Bad input: each a clear ValueError naming the input.


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_images_and_image_tokens_must_agree(name):
    model = classifier(name, "multimodal").eval()
    with_images = family_batch(name, ["What is it?"] * 2, seeds=[0, 1])
    # Token ids alone: PaliGemma's and Florence-2's processors would insert the image tokens.
    text_only = tiny_processor(name).tokenizer(["What is it?"] * 2, return_tensors="pt")
    images = {key: value for key, value in with_images.items() if key not in ("input_ids", "attention_mask")}
    with pytest.raises(ValueError, match="input_ids of sample 0 hold no image token"):
        model(**text_only, **images)
    trajectory = trajectory_model(name, "mlp").eval()
    batch = driving_batch(name)
    batch.pop("pixel_values")
    with pytest.raises(ValueError, match="input_ids hold image tokens .* but no pixel_values were given"):
        trajectory(**batch)


def test_unknown_backbone_names_are_clear_errors():
    with pytest.raises(ValueError, match="backbone 'no-such-vlm' is neither a registry name.*known names: .*qwen2-vl"):
        VLMForImageClassification.from_backbone("no-such-vlm", num_labels=2)
    with pytest.raises(ValueError, match="backbone must be a model, a registry name or a checkpoint"):
        VLMForImageClassification.from_backbone(42, num_labels=2)


def test_a_config_of_another_family_is_a_clear_error():
    config = VLMClassificationConfig(backbone_config=tiny_vlm_config("llava"), num_labels=2)
    with pytest.raises(ValueError, match="backbone is a 'gemma3' model but the config's backbone is 'llava'"):
        VLMForImageClassification(config, backbone=tiny_backbone("gemma3"))


def test_bad_images_are_clear_errors():
    model, processor = tiny_backbone("llava"), tiny_processor("llava")
    with pytest.raises(ValueError, match="images is empty"):
        encode_images(model, processor, [])
    with pytest.raises(ValueError, match=r"images\[1\] must be a PIL image"):
        encode_images(model, processor, [tiny_image(0), 42])
    with pytest.raises(ValueError, match=r"images\[0\]: no such file: no-such-file.png"):
        encode_images(model, processor, ["no-such-file.png"])
    with pytest.raises(ValueError, match=r"images\[0\] has 4 channel\(s\)"):
        encode_images(model, processor, [np.zeros((32, 32, 4), dtype=np.uint8)])
    with pytest.raises(ValueError, match=r"images\[0\] has 1 channel\(s\)"):
        encode_images(model, processor, [np.zeros((32, 32), dtype=np.uint8)])
    with pytest.raises(ValueError, match="images of one size"):
        encode_images(model, processor, [tiny_image(0, size=32), tiny_image(1, size=48)])
    with pytest.raises(ValueError, match="images must be a list of images"):
        encode_images(model, processor, tiny_image(0))


def test_bad_head_inputs_are_clear_errors():
    model = classifier("qwen2-vl", "vision").eval()
    batch = family_batch("qwen2-vl", ["What is it?"] * 2, seeds=[0, 1])
    with pytest.raises(ValueError, match=r"\['image_grid_thw'\] missing: qwen2-vl images come as"):
        model(pixel_values=batch["pixel_values"])
    with pytest.raises(ValueError, match=r"labels must be class ids in \[0, 3\)"):
        model(**batch, labels=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="pixel_values are required"):
        model(input_ids=batch["input_ids"])
    trajectory = trajectory_model("llava", "mlp").eval()
    driving = driving_batch("llava")
    with pytest.raises(ValueError, match=r"scene_queries must have shape \(B, Ns, scene_query_dim\)"):
        trajectory(**{**driving, "scene_queries": driving["scene_queries"][..., :4]})
    with pytest.raises(ValueError, match="can_bus contains NaN"):
        trajectory(**{**driving, "can_bus": torch.full_like(driving["can_bus"], float("nan"))})
    with pytest.raises(ValueError, match="Prompt 0 holds 0 <scene> placeholders; expected exactly one"):
        driving_processor("llava")(text="<ego_wp>", scene_queries=torch.zeros(1, 3, 8))
