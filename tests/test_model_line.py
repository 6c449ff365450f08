"""One model line: the named models and the generic heads share their head logic, configurations import no torch,
saved folders ship only their own task's code, and labels behave as in transformers."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from orion_helpers import FAMILIES, driving_batch, small_model
from remote_code_checks import run_without_vlmheads
from transformers import AutoConfig

from vlmheads import (
    VLMClassificationConfig,
    VLMForImageClassification,
    VLMForTrajectory,
    create_vlm,
    load_processor,
    tiny_vlm_config,
)
from vlmheads.modeling.modeling_classifier import ClassifierMixin, VLMClassifierOutput
from vlmheads.modeling.modeling_driving import DrivingHeadMixin
from vlmheads.modeling.modeling_receipt_vl import ReceiptVLClassifier, ReceiptVLClassifierOutput

PACKAGE = Path(__file__).resolve().parents[1]
CONFIGURATION_MODULES = sorted(path.stem for path in (PACKAGE / "configuration").glob("*.py"))


def test_configuration_modules_import_without_torch():
    imports = "; ".join(f"import vlmheads.configuration.{module}" for module in CONFIGURATION_MODULES)
    code = f"import sys; sys.modules['torch'] = None; {imports}; print(sorted(sys.modules).count('torch'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(CONFIGURATION_MODULES) >= 9


def test_a_backbone_of_no_registered_family_is_refused_when_the_model_is_built():
    from transformers import BertConfig

    config = VLMClassificationConfig(backbone_config=BertConfig(), classifier_hidden_dims=[8])
    with pytest.raises(ValueError, match=r"BertConfig \(model_type 'bert'\) is not a registered VLM family"):
        VLMForImageClassification(config)


def test_the_named_models_and_the_generic_heads_share_one_head_each():
    assert issubclass(ReceiptVLClassifier, ClassifierMixin) and issubclass(VLMForImageClassification, ClassifierMixin)
    assert ReceiptVLClassifierOutput is VLMClassifierOutput
    for orion in (family.model for family in FAMILIES.values()):
        assert issubclass(orion, DrivingHeadMixin)
    assert issubclass(VLMForTrajectory, DrivingHeadMixin)


def _llava_trajectory(num_modes: int) -> tuple[VLMForTrajectory, dict]:
    backbone = create_vlm("llava", tiny=True, seed=0)
    vocab = backbone.config.get_text_config().vocab_size
    ids = dict(
        zip(
            ("scene_token_id", "history_token_id", "can_bus_token_id", "ego_token_id"),
            range(vocab, vocab + 4),
            strict=True,
        )
    )
    settings = {"num_scene_queries": 2, "num_history_queries": 1, "scene_query_dim": 4, "history_query_dim": 4}
    model = VLMForTrajectory.from_backbone(backbone, **settings, can_bus_dim=3, num_modes=num_modes, **ids).eval()
    ids_row = [5, ids["scene_token_id"], ids["scene_token_id"], ids["history_token_id"], ids["can_bus_token_id"], 6]
    input_ids = torch.tensor([[*ids_row, ids["ego_token_id"]]])
    batch = {
        "input_ids": input_ids,
        "scene_queries": torch.randn(1, 2, 4),
        "history_queries": torch.randn(1, 1, 4),
        "can_bus": torch.randn(1, 3),
    }
    return model, batch


def test_from_backbone_grows_the_vocabulary_for_placeholder_ids_beyond_it():
    model, batch = _llava_trajectory(num_modes=1)
    vocab = model.backbone.get_input_embeddings().num_embeddings
    assert vocab == model.config.ego_token_id + 1
    assert model.config.backbone_config.get_text_config().vocab_size == vocab
    assert model(**batch).trajectory.shape == (1, 6, 2)


def test_orion_and_vlm_trajectory_refuse_a_command_on_a_one_mode_model_alike():
    orion = small_model(FAMILIES["qwen2_vl"])
    orion_batch = driving_batch(orion.config, batch_size=1)
    model, batch = _llava_trajectory(num_modes=1)
    for head, inputs in ((orion, orion_batch), (model, batch)):
        with pytest.raises(ValueError, match="command selects a trajectory mode, but this model has num_modes=1"):
            head(**inputs, command=torch.tensor([0]))
        assert head(**inputs).trajectory is not None


def test_orion_and_vlm_trajectory_check_the_command_range_alike():
    orion = small_model(FAMILIES["qwen2_vl"], num_modes=3)
    model, batch = _llava_trajectory(num_modes=3)
    for head, inputs in ((orion, driving_batch(orion.config, batch_size=1)), (model, batch)):
        with pytest.raises(ValueError, match=r"command must hold integer mode indices in \[0, 3\), got \[3\]"):
            head(**inputs, command=torch.tensor([3]))
        assert head(**inputs, command=torch.tensor([2])).trajectory.shape[0] == 1


def _saved_files(model, folder: Path) -> set[str]:
    model.save_pretrained(folder)
    return {path.name for path in folder.glob("*.py")}


def test_a_saved_image_classifier_ships_only_its_own_task_code(tmp_path):
    backbone = create_vlm("llava", tiny=True)
    vision = _saved_files(VLMForImageClassification.from_backbone(backbone, num_labels=2), tmp_path / "vision")
    assert "modeling_vlm_classification.py" in vision and "configuration_vlm_classification.py" in vision
    driving = {"configuration_orion_qwen.py", "configuration_driving.py", "modeling_driving.py"}
    pipelines = {"pipeline_orion_trajectory.py", "pipeline_vla_actions.py", "pipeline_vlm_classification.py"}
    assert not vision & (driving | pipelines | {"modeling_vlm_trajectory.py", "modeling_vla.py"})
    multimodal = VLMForImageClassification.from_backbone(backbone, num_labels=2, pooling="multimodal")
    files = _saved_files(multimodal, tmp_path / "multimodal")
    assert "pipeline_vlm_classification.py" in files
    assert not files & (driving | {"pipeline_orion_trajectory.py", "pipeline_vla_actions.py"})


def test_a_saved_driving_model_ships_its_pipeline_and_no_other_head(tmp_path):
    files = _saved_files(small_model(FAMILIES["qwen2_vl"]), tmp_path)
    assert {"modeling_orion_qwen.py", "modeling_driving.py", "pipeline_orion_trajectory.py"} <= files
    assert not files & {"modeling_classifier.py", "pipeline_vla_actions.py", "pipeline_vlm_classification.py"}
    assert not files & {"configuration_classifier.py", "modeling_vla.py", "modeling_vlm_classification.py"}


def _classifier_config(**labels) -> VLMClassificationConfig:
    return VLMClassificationConfig(backbone_config=tiny_vlm_config("llava"), classifier_hidden_dims=[8], **labels)


def test_id2label_alone_or_label2id_alone_is_completed_like_transformers():
    by_id = _classifier_config(id2label={0: "cat", 1: "dog", 2: "bird"})
    assert by_id.label2id == {"cat": 0, "dog": 1, "bird": 2} and by_id.num_labels == 3
    by_label = _classifier_config(label2id={"cat": 0, "dog": 1})
    assert by_label.id2label == {0: "cat", 1: "dog"} and by_label.num_labels == 2


def test_labels_assigned_after_construction_keep_the_pair_consistent_through_save_and_load(tmp_path):
    config = _classifier_config(num_labels=2)
    config.id2label = {"0": "no", "1": "yes", "2": "maybe"}
    assert config.label2id == {"no": 0, "yes": 1, "maybe": 2}
    config.save_pretrained(tmp_path)
    reloaded = AutoConfig.from_pretrained(tmp_path)
    assert reloaded.id2label == {0: "no", 1: "yes", 2: "maybe"} and reloaded.label2id == config.label2id
    config.label2id = {"off": 0, "on": 1}
    assert config.id2label == {0: "off", 1: "on"}


def test_a_mismatched_pair_is_refused_at_construction_and_at_save(tmp_path):
    with pytest.raises(ValueError, match="is not the inverse of id2label"):
        _classifier_config(id2label={0: "a", 1: "b"}, label2id={"a": 1, "b": 0})
    config = _classifier_config(id2label={0: "a", 1: "b"})
    config.label2id["a"] = 1
    with pytest.raises(ValueError, match="is not the inverse of id2label"):
        config.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_from_backbone_takes_id2label_without_label2id():
    model = VLMForImageClassification.from_backbone(create_vlm("llava", tiny=True), id2label={0: "a", 1: "b", 2: "c"})
    assert model.config.label2id == {"a": 0, "b": 1, "c": 2}
    assert model.classifier.out_proj.out_features == 3


@pytest.mark.slow
def test_a_model_loaded_as_remote_code_saves_its_pipeline_again(tmp_path):
    # Loading the model does not import its pipeline (named by string): saving it again fetches the pipeline's file
    # from the folder it came from.
    small_model(FAMILIES["qwen2_vl"]).save_pretrained(tmp_path / "saved")
    target = tmp_path / "resaved"
    results = run_without_vlmheads("isolated_resave.py", tmp_path / "saved", {"target": str(target)}, tmp_path)
    assert "pipeline_orion_trajectory.py" in results["files"] and "trajectory_request.py" in results["files"]
    assert results["custom_pipelines"]["trajectory-prediction"]["impl"] == (
        "pipeline_orion_trajectory.OrionTrajectoryPipeline"
    )
    assert results["files"] == sorted(path.name for path in (tmp_path / "saved").glob("*.py"))
    AutoConfig.from_pretrained(target)  # its references name code the folder holds


def test_model_side_code_imports_no_test_fixture_and_no_runtime():
    # configuration ← modeling/processing ← everything else: the model side ships as remote code.
    below = ("offline", "serve", "parallel", "onnx_export", "training", "data", "registry", "closed_loop")
    for folder in ("configuration", "modeling", "processing"):
        for path in sorted((PACKAGE / folder).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and node.level > 0 and node.module:
                    target = node.module.split(".")[0] if node.level > 1 else folder
                    assert target not in below, f"{path.relative_to(PACKAGE)} imports ..{node.module}"
                    if folder == "configuration":
                        assert target == "configuration", f"{path.relative_to(PACKAGE)} imports ..{node.module}"


RUNTIME_MODULES = (
    "vlmheads.serve.app",
    "vlmheads.serve.__main__",
    "vlmheads.parallel.__main__",
    "vlmheads.onnx_export",
    "vlmheads.closed_loop.driving",
    "vlmheads.closed_loop.manipulation",
    "vlmheads.cli",
)


def test_runtimes_serving_a_saved_folder_never_import_the_test_fixtures(tmp_path):
    # `offline/` builds tiny test models; only the server's embedded demo model (no `--model`) may reach for it.
    folder = tmp_path / "classifier"
    VLMForImageClassification.from_backbone(create_vlm("paligemma", tiny=True), num_labels=2).save_pretrained(folder)
    load_processor("paligemma", tiny=True).save_pretrained(folder)
    imports = "; ".join(f"import {module}" for module in RUNTIME_MODULES)
    code = (
        f"import sys; {imports}; from vlmheads.serve.models import load_model_folder; "
        f"load_model_folder({str(folder)!r}); "
        "print(sorted(name for name in sys.modules if name.startswith('vlmheads.offline')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_one_quantized_loading_keeps_the_family_skip_list_and_the_head_in_full_precision(tmp_path):
    from transformers import BitsAndBytesConfig

    from vlmheads.modeling.families import vlm_family

    model = VLMForImageClassification.from_backbone(create_vlm("llava", tiny=True), num_labels=2)
    model.save_pretrained(tmp_path)
    requested = BitsAndBytesConfig(load_in_8bit=True)
    loaded = VLMForImageClassification.from_pretrained(
        pretrained_model_name_or_path=tmp_path, quantization_config=requested
    )
    expected = [f"backbone.{name}" for name in vlm_family("llava").quantization_skip_modules] + ["classifier"]
    assert loaded.config.quantization_config.llm_int8_skip_modules == expected
    assert requested.llm_int8_skip_modules is None  # the caller's config is left as it was
    assert type(loaded.classifier.out_proj) is torch.nn.Linear
    assert any(type(module).__name__ == "Linear8bitLt" for module in loaded.backbone.modules())
