"""BatchFeature: the dict that processors and tokenizers return (same behaviour as transformers')."""

from __future__ import annotations

from collections import UserDict
from typing import Any

import numpy as np
import torch


def _to_tensor(value: Any, tensor_type: str) -> Any:
    if tensor_type == "pt":
        if isinstance(value, torch.Tensor):
            return value
        if isinstance(value, np.ndarray):
            return torch.from_numpy(value)
        if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
            return torch.stack(list(value))
        return torch.tensor(value)
    if tensor_type == "np":
        if isinstance(value, torch.Tensor):
            return value.numpy()
        return np.asarray(value)
    raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {tensor_type!r}")


class BatchFeature(UserDict):
    """A dict with attribute access and `.to(device | dtype)`; keys are processor outputs."""

    def __init__(self, data: dict | None = None, tensor_type: str | None = None, skip_tensor_conversion=None):
        super().__init__(data or {})
        if tensor_type is not None:
            skip = set(skip_tensor_conversion or ())
            for key, value in list(self.data.items()):
                if key not in skip and value is not None:
                    self.data[key] = _to_tensor(value, str(getattr(tensor_type, "value", tensor_type)))

    def __getattr__(self, name: str) -> Any:
        try:
            return self.data[name]
        except KeyError:
            raise AttributeError(name) from None

    def __getstate__(self):
        return {"data": self.data}

    def __setstate__(self, state):
        self.data = state["data"]

    def to(self, *args, **kwargs) -> BatchFeature:
        """Move tensors to a device; a dtype argument casts only floating-point tensors (like transformers)."""
        dtype = kwargs.get("dtype")
        device = kwargs.get("device")
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            else:
                device = arg
        out = {}
        for key, value in self.data.items():
            if isinstance(value, torch.Tensor):
                if dtype is not None and value.is_floating_point():
                    value = value.to(device=device, dtype=dtype)
                elif device is not None:
                    value = value.to(device=device)
            out[key] = value
        self.data = out
        return self


BatchEncoding = BatchFeature
