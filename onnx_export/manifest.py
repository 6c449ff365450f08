"""The JSON manifest of an ONNX export: its graphs, their inputs and outputs, token ids, positions and checksums.

Read by the ONNX Runtime host without torch. `read_manifest` validates what it reads: the format version, the
required keys and their types, every file path confined to the export folder (no absolute path, no `..`), every
graph file present and, unless told not to, the SHA-256 of every graph and weight file. Anything else is a
`ManifestError` naming the file and the key. Exports are written whole or not at all (`staged_export`).
"""

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import onnxruntime as ort

FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
KINDS = ("vlm", "orion", "classifier")
# The manifest's `positions` value of 3-D M-RoPE decoders: `modeling.families.POSITIONS_MROPE`, restated here because
# the torch-free host cannot import the family table (which imports transformers); a test pins the two equal.
MROPE_POSITIONS = "mrope"
# How the host computes the decoder's 3-D position ids: `vlmheads.onnx_export.mrope.rope_positions`.
MROPE_RULE = (
    "Qwen2-VL M-RoPE: text tokens count up by one on the (temporal, height, width) rows; an image of (t, h, w) "
    "patches takes t*(h/m)*(w/m) tokens at (start + t_index, start + row, start + column), m = spatial_merge_size, "
    "and the following text continues at start + max(h, w)/m; padding is skipped (position 0); each decoded token "
    "is one past the previous position on every row."
)
# Keys every manifest has, and those of the generating kinds ("vlm", "orion"), with their JSON types.
REQUIRED_KEYS = {"format_version": int, "kind": str, "dtype": str, "graphs": dict, "sha256": dict}
GENERATION_KEYS = {"token_ids": dict, "decoder": dict, "positions": str}
GRAPH_KEYS = {"file": str, "external_data": list}
CHUNK_BYTES = 1 << 22
# NumPy dtypes of the ONNX Runtime input types the graphs take.
ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(bool)": np.bool_,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


class ManifestError(ValueError):
    """A manifest that cannot be trusted: a wrong version, a missing or mistyped key, a path outside the folder or
    a file whose checksum disagrees. The message names the manifest file and the key."""


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of the file at `path`, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def graph_files(manifest: dict[str, Any]) -> list[str]:
    """Every file the manifest's graphs name: each graph file and its external data files, in order, once."""
    names = []
    for entry in manifest["graphs"].values():
        names.extend([entry["file"], *entry["external_data"]])
    return list(dict.fromkeys(names))


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> Path:
    """Writes `manifest` (with the format version and the SHA-256 of every graph file) to `out_dir/manifest.json`
    through a temporary file and a rename, so a reader never sees half a manifest; returns the path."""
    out_dir = Path(out_dir)
    checksums = {name: file_sha256(out_dir / name) for name in graph_files(manifest)}
    content = {"format_version": FORMAT_VERSION, **manifest, "sha256": checksums}
    path = out_dir / MANIFEST_NAME
    scratch = path.with_name(f".{MANIFEST_NAME}.partial")
    scratch.write_text(json.dumps(content, indent=2))
    os.replace(scratch, path)
    return path


def _check_types(path: Path, where: str, mapping: dict[str, Any], keys: dict[str, type]) -> None:
    for key, kind in keys.items():
        if key not in mapping:
            raise ManifestError(f"{path}: {where} has no {key!r} key; export the model again.")
        value = mapping[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ManifestError(f"{path}: {where}[{key!r}] must be a {kind.__name__}, got {type(value).__name__}.")


def confined_path(out_dir: Path, name: Any, path: Path, key: str) -> Path:
    """`out_dir / name` for a relative `name` that stays inside `out_dir`; a `ManifestError` naming the manifest
    `path` and `key` for anything else (not a string, absolute, or with a `..` part)."""
    if not isinstance(name, str) or not name:
        raise ManifestError(f"{path}: {key} must be a file name inside the export folder, got {name!r}.")
    parts = PurePosixPath(name.replace("\\", "/"))
    if parts.is_absolute() or Path(name).is_absolute() or ".." in parts.parts:
        raise ManifestError(
            f"{path}: {key} is {name!r}; graph paths must be relative and stay inside the export folder {out_dir}."
        )
    return out_dir / name


def read_manifest(out_dir: Path, verify_checksums: bool = True) -> dict[str, Any]:
    """The validated manifest of the export in `out_dir` (see the module docstring).

    `verify_checksums=False` skips the SHA-256 of the graph files (large exports load faster; a flipped bit then
    loads silently).
    """
    out_dir = Path(out_dir)
    path = out_dir / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"No {MANIFEST_NAME} in {out_dir}: export the model with vlmheads.onnx_export.export_onnx."
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ManifestError(f"{path} is not valid JSON ({error}); export the model again.") from error
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path} must hold a JSON object, got {type(manifest).__name__}.")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ManifestError(
            f"{path} has format_version {version!r}; this vlmheads reads format_version {FORMAT_VERSION}: "
            "export the model again with this version."
        )
    _check_types(path, "the manifest", manifest, REQUIRED_KEYS)
    if manifest["kind"] not in KINDS:
        raise ManifestError(f"{path}: 'kind' must be one of {KINDS}, got {manifest['kind']!r}.")
    if manifest["kind"] != "classifier":
        _check_types(path, "the manifest", manifest, GENERATION_KEYS)
    for name, entry in manifest["graphs"].items():
        where = f"graphs[{name!r}]"
        if not isinstance(entry, dict):
            raise ManifestError(f"{path}: {where} must be an object, got {type(entry).__name__}.")
        _check_types(path, where, entry, GRAPH_KEYS)
        graph_file = confined_path(out_dir, entry["file"], path, f"{where}['file']")
        for index, data_file in enumerate(entry["external_data"]):
            confined_path(out_dir, data_file, path, f"{where}['external_data'][{index}]")
        if not graph_file.is_file():
            raise FileNotFoundError(f"The {name} graph {graph_file} named in {path} is missing.")
    if verify_checksums:
        for name in graph_files(manifest):
            expected = manifest["sha256"].get(name)
            if not isinstance(expected, str):
                raise ManifestError(f"{path}: 'sha256' has no checksum of {name!r}; export the model again.")
            file = out_dir / name
            if not file.is_file():
                raise FileNotFoundError(f"{file}, named in {path}, is missing.")
            if file_sha256(file) != expected:
                raise ManifestError(
                    f"{file} does not match its SHA-256 in {path} ('sha256'[{name!r}]): the file is corrupt or was "
                    "changed after the export. Export again, or load with verify_checksums=False to accept it."
                )
    return manifest


def open_graph(
    out_dir: Path, entry: dict[str, Any], providers: list[str], session_options: ort.SessionOptions | None = None
) -> ort.InferenceSession:
    """An ONNX Runtime session of the manifest graph `entry` in `out_dir`."""
    return ort.InferenceSession(str(Path(out_dir) / entry["file"]), sess_options=session_options, providers=providers)


class GraphRunner:
    """One manifest graph of an export as an ONNX Runtime session: `entry` (its manifest entry), `session`, and the
    NumPy dtype of each input (`input_types`)."""

    def __init__(
        self,
        out_dir: Path,
        entry: dict[str, Any],
        providers: list[str],
        session_options: ort.SessionOptions | None = None,
    ):
        self.entry = entry
        self.session = open_graph(out_dir, entry, providers, session_options)
        self.input_types = {value.name: ORT_TYPES[value.type] for value in self.session.get_inputs()}


@contextlib.contextmanager
def staged_export(out_dir: Path) -> Iterator[Path]:
    """A scratch folder beside `out_dir` to export into; on success it replaces `out_dir`, on any error it is
    removed and `out_dir` stays as it was. So nothing is ever half-written.

    `out_dir` may be missing, empty, or an earlier export (it has a manifest); any other folder is refused, so
    that an export never deletes files it did not write.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ValueError(f"{out_dir} exists and is not a folder: give a new or empty folder to export into.")
        if any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).is_file():
            raise ValueError(
                f"{out_dir} holds files but no {MANIFEST_NAME}: give a new or empty folder (or an earlier export, "
                "which is replaced)."
            )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    previous = None
    if out_dir.exists():
        previous = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, previous / "export")
    os.replace(staging, out_dir)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
