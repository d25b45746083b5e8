"""Fill a model built on the meta device with checkpoint tensors, strictly.

Notable features:
- each checkpoint key goes through the regex rename rules in order, then replaces the matching meta
  parameter / buffer with a real tensor on the target device (one tensor in flight at a time, so peak
  memory stays near the size of the weights);
- floating tensors are cast to `dtype`; integer buffers keep their dtype;
- tied weights share one Parameter (also weights tied at construction, which share one meta tensor);
- buffers a module computes itself (rotary `inv_freq`, non-persistent tables) are rebuilt by the
  module's `_init_non_persistent(device)` hook, called on every submodule that defines it;
- anything left on meta is missing: one `WeightsError` names missing, unexpected and misshapen tensors.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import WeightsError
from .checkpoint import SafetensorsCheckpoint

INIT_HOOK = "_init_non_persistent"
_MAX_LISTED = 12


@dataclass
class Slot:
    """Where a named tensor lives: `owner._parameters[attr]` or `owner._buffers[attr]`."""

    owner: nn.Module
    attr: str
    is_param: bool

    @property
    def tensor(self) -> torch.Tensor:
        return (self.owner._parameters if self.is_param else self.owner._buffers)[self.attr]

    def set(self, value: torch.Tensor) -> None:
        (self.owner._parameters if self.is_param else self.owner._buffers)[self.attr] = value


@dataclass
class LoadReport:
    """What `load_weights` did (all names are the model's, after renaming)."""

    loaded: list[str] = field(default_factory=list)
    tied: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # checkpoint keys dropped by `ignore`
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # "name: checkpoint (a, b) vs model (c, d)"


def _slots(module: nn.Module) -> dict[str, Slot]:
    slots = {}
    for prefix, sub in module.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        slots.update({dot + n: Slot(sub, n, True) for n, p in sub._parameters.items() if p is not None})
        slots.update({dot + n: Slot(sub, n, False) for n, b in sub._buffers.items() if b is not None})
    return slots


def _aliases(slots: dict[str, Slot]) -> dict[str, list[str]]:
    """name -> every name sharing its tensor object (weights tied when the module was built)."""
    by_id: dict[int, list[str]] = {}
    for name, slot in slots.items():
        by_id.setdefault(id(slot.tensor), []).append(name)
    return {name: group for group in by_id.values() for name in group}


def rename_key(key: str, rename: Iterable[tuple[str, str]]) -> str:
    """Apply every (regex, replacement) rule in order, each with `re.sub`."""
    for pattern, repl in rename:
        key = re.sub(pattern, repl, key)
    return key


def _materialise(value: torch.Tensor, dtype, device) -> torch.Tensor:
    target = dtype if (dtype is not None and value.is_floating_point()) else value.dtype
    return value.to(device=device, dtype=target)


def _place(slots, aliases, name: str, value: torch.Tensor) -> None:
    old = slots[name].tensor
    new = nn.Parameter(value, requires_grad=old.requires_grad) if slots[name].is_param else value
    for alias in aliases[name]:
        slots[alias].set(new)


def load_weights(
    module: nn.Module,
    ckpt: SafetensorsCheckpoint | Mapping[str, torch.Tensor],
    *,
    rename: Iterable[tuple[str, str]] = (),
    tied: Mapping[str, str] | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    ignore: Iterable[str] = (),
    strict: bool = True,
) -> LoadReport:
    """Materialise `module` (built under `torch.device("meta")`) from `ckpt`.

    `dtype=None` keeps the checkpoint's dtypes. With `strict=False` the problems are only reported.
    """
    device = torch.device(device or "cpu")
    rename, ignore = list(rename), [re.compile(p) for p in ignore]
    slots = _slots(module)
    aliases = _aliases(slots)
    report = LoadReport()
    for key in list(ckpt):
        _load_one(key, ckpt, rename, ignore, slots, aliases, dtype, device, report)
    _tie(slots, aliases, tied or {}, report)
    _run_init_hooks(module, device)
    report.missing = [n for n, slot in _slots(module).items() if slot.tensor.is_meta]
    if strict and (report.missing or report.unexpected or report.mismatched):
        raise _weights_error(report, type(module).__name__)
    return report


def _load_one(key, ckpt, rename, ignore, slots, aliases, dtype, device, report: LoadReport) -> None:
    if any(p.search(key) for p in ignore):
        report.ignored.append(key)
        return
    name = rename_key(key, rename)
    if name not in slots:
        report.unexpected.append(name if name == key else f"{name} (checkpoint key {key})")
        return
    want = tuple(slots[name].tensor.shape)
    have = tuple(ckpt.shape(key)) if hasattr(ckpt, "shape") else tuple(ckpt[key].shape)
    if want != have:
        report.mismatched.append(f"{name}: checkpoint {have} vs model {want}")
        return
    value = ckpt.get(key) if hasattr(ckpt, "get") else ckpt[key]
    _place(slots, aliases, name, _materialise(value, dtype, device))
    report.loaded.append(name)


def _tie(slots, aliases, tied: Mapping[str, str], report: LoadReport) -> None:
    for dst, src in tied.items():
        if dst not in slots or src not in slots:
            raise WeightsError(f"Tied weights {dst!r} <- {src!r}: no such parameter in the model.")
        if slots[dst].tensor.is_meta and not slots[src].tensor.is_meta:
            for alias in aliases[dst]:
                slots[alias].set(slots[src].tensor)
            report.tied.append(dst)


def _run_init_hooks(module: nn.Module, device: torch.device) -> None:
    for sub in module.modules():
        hook = getattr(sub, INIT_HOOK, None)
        if callable(hook):
            hook(device)


def _listing(title: str, names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    more = f" ... and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return f"\n  {title} ({len(names)}): {shown}{more}"


def _weights_error(report: LoadReport, model_name: str) -> WeightsError:
    parts = [
        _listing(t, n)
        for t, n in (
            ("missing", report.missing),
            ("unexpected", report.unexpected),
            ("misshapen", report.mismatched),
        )
        if n
    ]
    message = (
        f"The checkpoint does not match {model_name}:{''.join(parts)}\n"
        "Check that the checkpoint is for this architecture and config (hidden sizes, layer counts)."
    )
    return WeightsError(message, report.missing, report.unexpected, report.mismatched)
