"""The JSON manifest of an ONNX export: its graphs, their inputs and outputs, token ids and the M-RoPE rule.

Read by the ONNX Runtime host without torch; a manifest written by another format version is refused.
"""

import json
from pathlib import Path
from typing import Any

import onnxruntime as ort

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
# How the host computes the decoder's 3-D position ids: `vlmheads.onnx.mrope.rope_positions`.
MROPE_RULE = (
    "Qwen2-VL M-RoPE: text tokens count up by one on the (temporal, height, width) rows; an image of (t, h, w) "
    "patches takes t*(h/m)*(w/m) tokens at (start + t_index, start + row, start + column), m = spatial_merge_size, "
    "and the following text continues at start + max(h, w)/m; padding is skipped (position 0); each decoded token "
    "is one past the previous position on every row."
)


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> Path:
    """Writes `manifest` (with the format version) to `out_dir/manifest.json`; returns the path."""
    path = Path(out_dir) / MANIFEST_NAME
    path.write_text(json.dumps({"format_version": FORMAT_VERSION, **manifest}, indent=2))
    return path


def read_manifest(out_dir: Path) -> dict[str, Any]:
    """The manifest of the export in `out_dir`; checks its format version and that every graph file is there."""
    out_dir = Path(out_dir)
    path = out_dir / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"No {MANIFEST_NAME} in {out_dir}: export the model with vlmheads.onnx.export_onnx.")
    manifest = json.loads(path.read_text())
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {version!r}; this vlmheads reads format_version {FORMAT_VERSION}: "
            "export the model again with this version."
        )
    for name, entry in manifest["graphs"].items():
        graph_file = out_dir / entry["file"]
        if not graph_file.is_file():
            raise FileNotFoundError(f"The {name} graph {graph_file} named in {path} is missing.")
    return manifest


def open_graph(
    out_dir: Path, entry: dict[str, Any], providers: list[str], session_options: ort.SessionOptions | None = None
) -> ort.InferenceSession:
    """An ONNX Runtime session of the manifest graph `entry` in `out_dir`."""
    return ort.InferenceSession(str(Path(out_dir) / entry["file"]), sess_options=session_options, providers=providers)
