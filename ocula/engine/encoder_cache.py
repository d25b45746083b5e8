"""Content-addressed LRU caches for media: vision embeddings and processed pixel tensors.

- `EncoderCache`: media hash -> vision features [n_tokens, hidden], bounded by the total number of
  feature rows (tokens), so the same image sent again (or a chunked prefill that spans steps) never runs
  the vision encoder twice.
- `ProcessedMediaCache`: media hash -> processed tensors (any nest of tensors / lists / dicts), bounded
  by bytes, so decoding and resizing an image is done once.
An entry larger than the whole budget is not stored (it would evict everything and still not fit).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch


class _LRU:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self.used = 0
        self.entries: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> Any | None:
        entry = self.entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self.entries.move_to_end(key)
        return entry[0]

    def _put(self, key: str, value: Any, size: int) -> None:
        if size > self.capacity:
            return
        if key in self.entries:
            self.used -= self.entries.pop(key)[1]
        while self.used + size > self.capacity:
            _, (_, old) = self.entries.popitem(last=False)
            self.used -= old
        self.entries[key] = (value, size)
        self.used += size

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)


class EncoderCache(_LRU):
    """Vision features by media hash; capacity in tokens (feature rows)."""

    def put(self, key: str, features: torch.Tensor) -> None:
        self._put(key, features, features.shape[0])


class ProcessedMediaCache(_LRU):
    """Processed media tensors by media hash; capacity in bytes."""

    def put(self, key: str, value: Any) -> None:
        self._put(key, value, nbytes(value))


def nbytes(value: Any) -> int:
    """Bytes held by tensors / arrays inside `value` (dicts, lists and tuples are walked)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v) for v in value)
    return int(getattr(value, "nbytes", 0))
