"""Typed dataclass configs built from `config.json`.

Notable features:
- one `from_dict` per family; every renamed key is named in the class's `renames` table
  (`torch_dtype` -> `dtype`, hub spellings such as `in_chans` -> `in_channels`);
- keys ocula does not use are kept in `extra` (visible in `repr`, written back by `to_dict`, readable as
  attributes), never silently dropped;
- `__post_init__` checks raise `ConfigError` naming the offending key and saying what to do.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .errors import ConfigError

HUB_OPTIONS = ("revision", "local_files_only", "token", "cache_dir")


@dataclass
class BaseConfig:
    """Base of every ocula config: known fields are typed, the rest lives in `extra`."""

    model_type: ClassVar[str] = ""
    # checkpoint key -> field name, for keys transformers or the hub spell differently
    renames: ClassVar[dict[str, str]] = {"torch_dtype": "dtype"}

    extra: dict[str, Any] = field(default_factory=dict)  # keys of config.json ocula does not use

    @classmethod
    def field_names(cls) -> frozenset[str]:
        return frozenset(f.name for f in dataclasses.fields(cls)) - {"extra"}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BaseConfig:
        """Build from a config.json dict: renamed keys mapped, unknown keys kept in `extra`."""
        data = cls._apply_renames(dict(data))
        names = cls.field_names()
        known = {key: value for key, value in data.items() if key in names}
        extra = {key: value for key, value in data.items() if key not in names and key != "model_type"}
        return cls(**known, extra=extra)

    @classmethod
    def coerce(cls, value: Any) -> BaseConfig:
        """A nested config (`text_config`, ...): an instance as it is, a dict parsed, None the defaults.

        A `model_type` inside is ignored (hub remote-code configs put the parent's there)."""
        return value if isinstance(value, cls) else cls.from_dict(dict(value or {}))

    @classmethod
    def _apply_renames(cls, data: dict[str, Any]) -> dict[str, Any]:
        for old, new in cls.renames.items():
            if old in data:
                value = data.pop(old)
                data.setdefault(new, value)  # the current spelling wins when both are present
        return data

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, **overrides: Any) -> BaseConfig:
        """Read `config.json` of a checkpoint folder or hub id; `overrides` replace its top-level keys."""
        from .loading.hub import read_json, resolve_checkpoint

        hub = {key: overrides.pop(key) for key in HUB_OPTIONS if key in overrides}
        folder = resolve_checkpoint(name_or_path, **hub)
        data = read_json(folder, "config.json")
        if data is None:
            raise ConfigError(f"No config.json in {folder}: pass the folder of a checkpoint saved by transformers.")
        cls._check_family(data.get("model_type"), folder)
        return cls.from_dict({**data, **overrides})

    @classmethod
    def _check_family(cls, found: Any, folder: Path) -> None:
        """A family class given another family's checkpoint fails here, not later on a derived value."""
        from .registry import FAMILIES

        if cls.model_type in FAMILIES and found in FAMILIES and found != cls.model_type:
            raise ConfigError(
                f"{folder} holds a model_type={found!r} checkpoint but {cls.__name__} reads "
                f"{cls.model_type!r}: load it with AutoModelForImageTextToText / AutoProcessor, or the matching "
                "family class."
            )

    def with_overrides(self, **overrides: Any) -> BaseConfig:
        """A copy with top-level keys replaced, checked again by `__post_init__`."""
        return type(self).from_dict({**self.to_dict(), **overrides}) if overrides else self

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict (extra keys included, nested configs as dicts)."""
        data: dict[str, Any] = dict(self.extra)
        if self.model_type:
            data["model_type"] = self.model_type
        for name in sorted(self.field_names()):
            value = getattr(self, name)
            data[name] = value.to_dict() if isinstance(value, BaseConfig) else value
        return data

    def __getattr__(self, name: str) -> Any:
        # only called when normal lookup fails: expose the keys kept in `extra`
        extra = self.__dict__.get("extra", {})
        if name in extra:
            return extra[name]
        raise AttributeError(f"{type(self).__name__} has no field or config.json key {name!r}")

    def check(self, ok: bool, key: str, message: str) -> None:
        """Raise ConfigError naming `key` when `ok` is false."""
        if not ok:
            raise ConfigError(f"{type(self).__name__}: {key}={getattr(self, key, None)!r} {message}")

    def check_positive(self, *keys: str) -> None:
        for key in keys:
            value = getattr(self, key)
            self.check(isinstance(value, int) and value > 0, key, "must be a positive integer.")


def dtype_name(value: Any) -> str | None:
    """Normalise a dtype given as `torch.float16`, "torch.float16" or "float16" to "float16"."""
    if value is None:
        return None
    return str(value).removeprefix("torch.")
