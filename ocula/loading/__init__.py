"""Checkpoint loading: hub ids / folders, config JSON, lazy safetensors, strict weight filling."""

from .checkpoint import SafetensorsCheckpoint
from .hub import read_json, resolve_checkpoint, write_json
from .weights import LoadReport, load_weights, rename_key

__all__ = [
    "LoadReport",
    "SafetensorsCheckpoint",
    "load_weights",
    "read_json",
    "rename_key",
    "resolve_checkpoint",
    "write_json",
]
