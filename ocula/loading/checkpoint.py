"""Lazy safetensors checkpoints: one file or shards named by `model.safetensors.index.json`.

Notable features:
- tensors are read on demand through `safetensors.safe_open` (memory-mapped), one at a time, so
  loading never holds the whole checkpoint in memory twice;
- a missing shard or a folder without weights raises a typed error naming the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import CheckpointNotFoundError, WeightsError
from .hub import read_json

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class SafetensorsCheckpoint:
    """Key -> tensor view over the safetensors files of a folder (keys in the checkpoint's order)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._key_file = self._index_keys(self.folder)
        self._handles: dict[Path, object] = {}

    @staticmethod
    def _index_keys(folder: Path) -> dict[str, Path]:
        index = read_json(folder, INDEX_NAME)
        if index is not None:
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict):
                raise WeightsError(f"{folder / INDEX_NAME} has no 'weight_map'; re-download the checkpoint.")
            return _check_shards(folder, {k: folder / v for k, v in weight_map.items()})
        files = (
            [folder / SINGLE_NAME]
            if (folder / SINGLE_NAME).is_file()
            else sorted(folder.glob("*.safetensors"))
        )
        if not files:
            raise CheckpointNotFoundError(
                f"No safetensors weights in {folder} (looked for {SINGLE_NAME}, {INDEX_NAME}, *.safetensors). "
                "ocula reads safetensors only: convert .bin weights or download the safetensors files."
            )
        return {key: file for file in files for key in _file_keys(file)}

    def _handle(self, file: Path):
        if file not in self._handles:
            self._handles[file] = _open(file)
        return self._handles[file]

    def keys(self) -> list[str]:
        return list(self._key_file)

    def __iter__(self):
        return iter(self._key_file)

    def __contains__(self, key: str) -> bool:
        return key in self._key_file

    def __len__(self) -> int:
        return len(self._key_file)

    def _file_of(self, key: str) -> Path:
        if key not in self._key_file:
            raise KeyError(f"{key!r} is not in the checkpoint at {self.folder}")
        return self._key_file[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(self._file_of(key)).get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        """The tensor, as stored (dtype unchanged), backed by the memory map until copied."""
        return self._handle(self._file_of(key)).get_tensor(key)

    def close(self) -> None:
        self._handles.clear()


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
        raise WeightsError(
            f"Cannot read {file}: {error}. The file is corrupt or truncated; re-download it."
        ) from None


def _file_keys(file: Path) -> list[str]:
    return list(_open(file).keys())


def _check_shards(folder: Path, key_file: dict[str, Path]) -> dict[str, Path]:
    missing = sorted({f.name for f in key_file.values() if not f.is_file()})
    if missing:
        raise WeightsError(
            f"{folder / INDEX_NAME} names shards that are not in the folder: {', '.join(missing)}. "
            "The download is incomplete; download the missing files."
        )
    return key_file
