"""Checkpoint folders: resolve a local path or a hub id to a folder, read its JSON files.

Notable features:
- a local folder is used as is; anything else that looks like `org/name` goes to huggingface_hub
  (optional dependency), local cache first, then the network unless offline;
- only the files ocula reads are downloaded (configs, tokenizer, templates, safetensors);
- every failure is a `CheckpointNotFoundError` saying what to do, never a raw traceback.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..errors import CheckpointNotFoundError, ConfigError

# Files ocula reads from a checkpoint; weights in other formats (.bin, .pth, .gguf) are never fetched.
ALLOW_PATTERNS = ["*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken", "*.safetensors", "*.py"]
_HUB_ID = re.compile(r"^[\w.\-]+/[\w.\-]+$")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_checkpoint(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Return the local folder of a checkpoint given as a folder path or a hub id `org/name`."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists():
        raise CheckpointNotFoundError(f"{name!r} is a file; pass the folder that holds config.json instead.")
    if not _HUB_ID.match(name):
        raise CheckpointNotFoundError(
            f"Checkpoint {name!r} not found: no such folder, and it is not a hub id of the form 'org/name'. "
            "Check the path for typos."
        )
    return _from_hub(name, revision, local_files_only or _offline(), token, cache_dir)


def _from_hub(repo_id: str, revision, offline: bool, token, cache_dir) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointNotFoundError(
            f"{repo_id!r} is not a local folder and huggingface_hub is not installed: "
            "`pip install huggingface_hub` to download it, or pass a local folder."
        ) from None
    kwargs = {
        "repo_id": repo_id,
        "revision": revision,
        "token": token,
        "cache_dir": cache_dir,
        "allow_patterns": ALLOW_PATTERNS,
    }
    try:  # the local cache first: no network round trip for a model already downloaded
        return Path(snapshot_download(local_files_only=True, **kwargs))
    except Exception as cached_error:  # huggingface_hub raises several types
        if offline:
            raise CheckpointNotFoundError(
                f"{repo_id!r} is not in the local hub cache and downloads are off (HF_HUB_OFFLINE or "
                "local_files_only). Download it once while online, or pass a local folder."
            ) from cached_error
    try:
        return Path(snapshot_download(**kwargs))
    except Exception as error:
        reason = " ".join(str(error).split()).rstrip(".")  # huggingface_hub's messages span lines
        raise CheckpointNotFoundError(
            f"Could not download {repo_id!r} (revision {revision or 'main'}): {reason}. Check the id, the "
            "revision, your network and, for gated or private models, the token."
        ) from error


def read_json(folder: str | os.PathLike, name: str) -> dict | None:
    """Read `folder/name` as a JSON object; None when the file does not exist."""
    path = Path(folder) / name
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path} is not valid JSON ({error}). Fix or re-download the file.") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(data).__name__}.")
    return data


def write_json(path: str | os.PathLike, data: dict, sort_keys: bool = False) -> None:
    """Write `data` to `path` as the checkpoint files are written: indented UTF-8 JSON ending in a newline."""
    Path(path).write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=sort_keys) + "\n",
                          encoding="utf-8")
