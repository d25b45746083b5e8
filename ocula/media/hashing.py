"""Content hashes of decoded media, the keys of the processed-media and vision-embedding caches.

Notable features:
- blake2b over the pixel bytes, their shape and dtype, and the processing options, so the same
  pixels processed differently (another `max_pixels`, another frame rate) never share a key;
- works on what the processors hold: PIL images, numpy arrays, torch tensors, lists of those (videos),
  and already-computed hashes (a string is taken as a hash, not re-read);
- one pass over the bytes: cheap enough to run per request.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import PIL.Image
import torch

from ..errors import MediaError

DIGEST_SIZE = 16  # 128-bit keys: collisions are not a practical concern


def media_hash(data, **options) -> str:
    """Hex digest of `data`'s decoded content plus `options` (any JSON-able values; order ignored)."""
    hasher = hashlib.blake2b(digest_size=DIGEST_SIZE)
    _update(hasher, data)
    hasher.update(json.dumps(options, sort_keys=True, default=repr).encode())
    return hasher.hexdigest()


def _update(hasher, data) -> None:
    if isinstance(data, PIL.Image.Image):
        hasher.update(f"pil:{data.mode}:{data.size}".encode())
        hasher.update(data.tobytes())
    elif isinstance(data, torch.Tensor):
        _update_array(
            hasher,
            data.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy(),
            str(data.dtype),
            tuple(data.shape),
        )
    elif isinstance(data, np.ndarray):
        _update_array(hasher, np.ascontiguousarray(data), str(data.dtype), data.shape)
    elif isinstance(data, (list, tuple)):
        hasher.update(f"seq:{len(data)}".encode())
        for item in data:
            _update(hasher, item)
    elif isinstance(data, (bytes, str)):
        hasher.update(b"raw:" + (data.encode() if isinstance(data, str) else data))
    else:
        raise MediaError(f"Cannot hash {type(data).__name__}: pass decoded pixels (PIL, numpy, torch).")


def _update_array(hasher, array: np.ndarray, dtype: str, shape: tuple) -> None:
    hasher.update(f"arr:{dtype}:{tuple(shape)}".encode())
    hasher.update(memoryview(array.reshape(-1)).cast("B") if array.size else b"")
