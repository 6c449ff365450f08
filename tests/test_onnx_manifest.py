"""Manifests are validated on load (version, keys, types, paths confined to the export folder, SHA-256 of every graph
file) and exports are written whole or not at all."""

import json
import shutil

import onnx
import pytest
from onnx import numpy_helper
from onnx_helpers import tiny_export, tiny_model_and_processor

from vlmheads.onnx_export import OnnxVLM, export_onnx
from vlmheads.onnx_export import export as export_module
from vlmheads.onnx_export.manifest import MANIFEST_NAME, ManifestError, read_manifest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def export_copy(tmp_path_factory):
    """A copy of the shared tiny Qwen2-VL export that each test copies again and edits."""
    out_dir = tmp_path_factory.mktemp("manifest") / "export"
    shutil.copytree(tiny_export("qwen2_vl"), out_dir)
    return out_dir


def edited(source, target, edit):
    """A copy of the export `source` in `target` whose manifest `edit(manifest)` changed."""
    shutil.copytree(source, target)
    manifest = json.loads((target / MANIFEST_NAME).read_text())
    edit(manifest)
    (target / MANIFEST_NAME).write_text(json.dumps(manifest))
    return target


def _set_file(name):
    def edit(manifest):
        manifest["graphs"]["decoder"]["file"] = name

    return edit


@pytest.mark.parametrize(
    ("edit", "error", "message"),
    [
        (_set_file("/etc/passwd"), ManifestError, r"graphs\['decoder'\]\['file'\] is '/etc/passwd'; graph paths must"),
        (_set_file("../outside.onnx"), ManifestError, r"graphs\['decoder'\]\['file'\] is '../outside.onnx'"),
        (_set_file("sub/../../x.onnx"), ManifestError, "must be relative and stay inside the export folder"),
        (_set_file(7), ManifestError, r"graphs\['decoder'\]\['file'\] must be a str, got int"),
        (lambda m: m["graphs"]["vision"]["external_data"].append("../weights.bin"), ManifestError, "external_data"),
        (lambda m: m.pop("graphs"), ManifestError, "the manifest has no 'graphs' key"),
        (lambda m: m.update(graphs=[]), ManifestError, r"\['graphs'\] must be a dict, got list"),
        (lambda m: m.update(kind="detector"), ManifestError, "'kind' must be one of"),
        (lambda m: m.pop("token_ids"), ManifestError, "the manifest has no 'token_ids' key"),
        (lambda m: m["graphs"]["embedding"].pop("file"), ManifestError, r"graphs\['embedding'\] has no 'file' key"),
        (lambda m: m.update(format_version=1), ManifestError, "format_version 1; this vlmheads reads format_version"),
        (lambda m: m["sha256"].pop("decoder.onnx"), ManifestError, "'sha256' has no checksum of 'decoder.onnx'"),
        (_set_file("gone.onnx"), FileNotFoundError, r"decoder graph .*gone.onnx named in .*manifest.json is missing"),
    ],
)
def test_bad_manifests_are_refused_naming_file_and_key(export_copy, tmp_path, edit, error, message):
    out_dir = edited(export_copy, tmp_path / "edited", edit)
    with pytest.raises(error, match=message) as raised:
        OnnxVLM(out_dir)
    if error is ManifestError:
        assert str(out_dir / MANIFEST_NAME) in str(raised.value)


def test_manifest_that_is_not_json_is_refused(export_copy, tmp_path):
    out_dir = tmp_path / "garbled"
    shutil.copytree(export_copy, out_dir)
    (out_dir / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ManifestError, match="manifest.json is not valid JSON"):
        read_manifest(out_dir)


def test_a_changed_graph_file_fails_its_checksum_unless_opted_out(export_copy, tmp_path):
    out_dir = tmp_path / "flipped"
    shutil.copytree(export_copy, out_dir)
    manifest = read_manifest(out_dir)
    assert set(manifest["sha256"]) == {entry["file"] for entry in manifest["graphs"].values()}
    # One weight changed by a little: a valid graph that loads, but not the exported one.
    embedding = out_dir / manifest["graphs"]["embedding"]["file"]
    graph = onnx.load(str(embedding))
    tensor = graph.graph.initializer[0]
    weights = numpy_helper.to_array(tensor).copy()
    weights.flat[0] += 1e-3
    tensor.CopyFrom(numpy_helper.from_array(weights, tensor.name))
    onnx.save(graph, str(embedding))
    with pytest.raises(ManifestError, match=r"embedding.onnx does not match its SHA-256 .*verify_checksums=False"):
        OnnxVLM(out_dir)
    assert OnnxVLM(out_dir, verify_checksums=False).kind == "vlm"


def test_failed_export_leaves_nothing_and_keeps_the_previous_export(export_copy, tmp_path, monkeypatch):
    model, processor = tiny_model_and_processor("qwen2_vl")

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export_module, "export_decoder", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export_onnx(model, processor, tmp_path / "new", include_vision=False)
    assert list(tmp_path.iterdir()) == []
    previous = tmp_path / "previous"
    shutil.copytree(export_copy, previous)
    before = sorted(path.name for path in previous.iterdir())
    with pytest.raises(RuntimeError, match="disk full"):
        export_onnx(model, processor, previous, include_vision=False)
    assert sorted(path.name for path in previous.iterdir()) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["previous"]
    read_manifest(previous)


def test_export_refuses_a_folder_holding_other_files(tmp_path):
    model, processor = tiny_model_and_processor("qwen2_vl")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds files but no manifest.json"):
        export_onnx(model, processor, tmp_path, include_vision=False)
    assert [path.name for path in tmp_path.iterdir()] == ["notes.txt"]
