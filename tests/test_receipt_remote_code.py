import json
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard
from receipt_helpers import make_model, make_processor, photo_file, question_prompt
from remote_code_checks import assert_flat_self_contained_code, run_without_vlmheads

CODE_FILES = {
    "configuration_classifier.py",
    "configuration_receipt_vl.py",
    "constants.py",
    "remote_code.py",
    "modeling_base.py",
    "modeling_classifier.py",
    "modeling_receipt_vl.py",
    "processing_receipt_vl.py",
    "image_inputs.py",
    "heads.py",
    "families.py",
    "publishing.py",
}
ROOT = Path(__file__).resolve().parents[1]


def saved_model(folder: Path, **overrides):
    processor = make_processor()
    model = make_model(processor, **overrides)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor


def test_the_saved_folder_carries_flat_self_contained_code(tmp_path):
    saved_model(tmp_path)
    assert_flat_self_contained_code(tmp_path, CODE_FILES)

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_receipt_vl.ReceiptVLConfig",
        "AutoModel": "modeling_receipt_vl.ReceiptVLClassifier",
        "AutoModelForImageClassification": "modeling_receipt_vl.ReceiptVLClassifier",
    }
    assert config["model_type"] == "receipt_vl" and config["architectures"] == ["ReceiptVLClassifier"]
    processor_config = json.loads((tmp_path / "processor_config.json").read_text())
    assert processor_config["auto_map"] == {"AutoProcessor": "processing_receipt_vl.ReceiptVLProcessor"}
    assert processor_config["id2label"] == {"0": "0", "1": "1", "2": "2 or more"}


@pytest.mark.slow
@pytest.mark.parametrize("pooling", ["vision", "multimodal"])
def test_a_fresh_interpreter_without_vlmheads_loads_the_folder_and_matches(pooling, tmp_path):
    model, processor = saved_model(tmp_path / "model", pooling=pooling)
    paths = [photo_file(tmp_path, 1, 48, 40), photo_file(tmp_path, 2, 90, 30)]
    question = question_prompt(processor, "What is the total?")
    request = {"image_paths": paths, "question": question}
    remote = run_without_vlmheads("isolated_load_receipt.py", tmp_path / "model", request, tmp_path)
    assert [name.rsplit(".", 1)[1] for name in remote["classes"]] == [
        "ReceiptVLConfig",
        "ReceiptVLClassifier",
        "ReceiptVLClassifier",
        "ReceiptVLProcessor",
    ]
    prompts = None if pooling == "vision" else [processor.classification_prompt()] * 2
    inputs = processor(images=paths, text=prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        local = model(**inputs).logits
    torch.testing.assert_close(remote["logits"], local)
    torch.testing.assert_close(remote["classifier_logits"], local)
    answer_inputs = processor(images=paths[:1], text=[question], return_tensors="pt")
    assert torch.equal(remote["generated"], model.generate(**answer_inputs, max_new_tokens=4, do_sample=False))

    if pooling == "vision":
        # transformers.pipeline("image-classification") classifies an image file with the folder's own code.
        assert remote["pipeline_model"].startswith("transformers_modules.")
        expected = processor.post_process_classification(local[:1])[0]
        assert [entry["label"] for entry in remote["pipeline"]] == [entry["label"] for entry in expected]
        for got, want in zip(remote["pipeline"], expected, strict=True):
            assert got["score"] == pytest.approx(want["score"], abs=1e-5)


def test_push_to_hub_uploads_the_code_and_the_rendered_card(tmp_path, monkeypatch):
    uploads = {}

    def create_repo(self, repo_id, **kwargs):
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        uploads.update(repo_id=repo_id, files={p.name: p.read_bytes() for p in Path(folder_path).iterdir()})
        return "committed"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    model = make_model(make_processor(), base_model="meta-llama/Llama-3.2-11B-Vision")

    assert model.push_to_hub("team/receipts", tags=["documents"]) == "committed"
    assert uploads["repo_id"] == "team/receipts"
    assert CODE_FILES - {"processing_receipt_vl.py", "image_inputs.py"} <= set(uploads["files"])
    card = ModelCard(uploads["files"]["README.md"].decode())
    assert card.data.base_model == "meta-llama/Llama-3.2-11B-Vision"
    assert card.data.pipeline_tag == "image-classification"
    assert {"vlmheads", "mllama", "receipts", "documents"} <= set(card.data.tags)
    assert "# ReceiptVLClassifier" in card.text and "| 2 | 2 or more |" in card.text
    assert 'pipeline("image-classification"' in card.text


def test_the_card_reports_metrics_the_confusion_matrix_and_the_memory_table(tmp_path):
    model = make_model(make_processor(), pooling="multimodal", classifier_hidden_dims=[64, 16])
    metrics = {"fine-tuned": {"accuracy": 0.9, "macro_f1": 0.875}, "majority class": {"accuracy": 1 / 3}}
    text = model.write_model_card(tmp_path, metrics=metrics, images=["confusion_matrix.png"]).read_text()
    assert "| | accuracy | macro_f1 |" in text
    assert "| fine-tuned | 0.900 | 0.875 |" in text and "| majority class | 0.333 |  |" in text
    assert "![confusion_matrix.png](confusion_matrix.png)" in text
    assert "Linear → 64, batch norm, gelu, dropout 0.2; Linear → 16, batch norm, gelu, dropout 0.1; Linear → 3" in text
    assert "cross-attention layers [1]" in text and "classification_prompt()" in text
    assert 'pipeline("image-classification"' not in text  # multimodal pooling needs a prompt
    assert "## Memory on Llama-3.2-11B-Vision" in text and "| QLoRA r=8, NF4 base |" in text
    assert "| forward | ms (median of 20) | ratio to bare Mllama |" in text
