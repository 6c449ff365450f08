"""Where data and models come from: a local folder or file, or a Hub id, told apart with clear errors.

A name that exists on disk is local. A name shaped like a Hub id (`user/name`) is taken from the Hub, unless its
first part is a local folder: `outputs/orion_dmo` next to an `outputs/` folder is a mistyped path, and gets
"no such folder", not a failed download. Anything else that does not exist gets "no such folder". When the Hub
cannot be reached (offline, `HF_HUB_OFFLINE=1`) and the id is not cached, the error says so and how to fetch it.
"""

import re
from pathlib import Path

import datasets
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_FILE_SUFFIXES = (".parquet", ".arrow", ".json", ".jsonl", ".csv", ".txt", ".png", ".jpg", ".jpeg", ".mp4")


def is_hub_id(name: str) -> bool:
    """True when `name` does not exist on disk and reads as a Hub id, not as a mistyped local path."""
    path = Path(name)
    if path.exists() or not _HUB_ID.match(name) or path.suffix.lower() in _FILE_SUFFIXES:
        return False
    return not Path(name.split("/", 1)[0]).is_dir()


def local_or_hub(name: str | Path, what: str) -> Path | str:
    """`name` as a local `Path` when it exists, as a Hub id (str) when it reads as one; otherwise a
    `FileNotFoundError` "no such folder" naming `what` (e.g. "--data_dir") and the closest existing parent."""
    path = Path(name)
    if path.exists():
        return path
    if is_hub_id(str(name)):
        return str(name)
    parent = next((folder for folder in path.parents if folder.is_dir()), Path("."))
    near = sorted(entry.name for entry in parent.iterdir())[:12] if parent.is_dir() else []
    raise FileNotFoundError(
        f"{what}: no such folder or file: {name} (and it is not a Hub id such as 'user/name'). {parent} holds {near}."
    )


def _offline_error(repo_id: str, what: str, error: Exception) -> OSError:
    return OSError(
        f"{what}: {repo_id} is not a local folder, and as a Hub data set id it could not be fetched: the Hub is not "
        f"reachable (offline, or HF_HUB_OFFLINE=1) and it is not in the local cache ({error}). Download it where "
        f"there is network (`hf download {repo_id} --repo-type dataset`), or give a local folder."
    )


def hub_dataset_folder(repo_id: str, what: str) -> Path:
    """The local snapshot of a Hub data set repository (downloaded, or from the cache when offline)."""
    try:
        return Path(snapshot_download(repo_id, repo_type="dataset"))
    except (OfflineModeIsEnabled, LocalEntryNotFoundError, HfHubHTTPError, ConnectionError) as error:
        raise _offline_error(repo_id, what, error) from error


def load_hub_dataset(repo_id: str, what: str, split: str = "train") -> datasets.Dataset:
    """`datasets.load_dataset(repo_id, split=split)`, with a clear error when the Hub cannot be reached."""
    try:
        return datasets.load_dataset(repo_id, split=split)
    except (ConnectionError, OfflineModeIsEnabled, LocalEntryNotFoundError) as error:
        raise _offline_error(repo_id, what, error) from error
