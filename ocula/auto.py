"""Auto classes: a path or hub id -> config.json -> registry -> the family's classes.

The same entry points as transformers (`AutoProcessor`, `AutoModelForImageTextToText`, and the older
`AutoModelForVision2Seq` spelling), so user code changes only its import line.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigError
from .loading import read_json, resolve_checkpoint
from .registry import Family, family_for, load_symbol

_HUB_KWARGS = ("revision", "local_files_only", "token", "cache_dir")


def _resolve(name_or_path, kwargs: dict) -> tuple[Path, Family]:
    hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
    folder = resolve_checkpoint(name_or_path, **hub)
    config = read_json(folder, "config.json")
    if config is None:
        config = _config_from_processor_files(folder)
    return folder, family_for(config, source=str(folder / "config.json"))


def _config_from_processor_files(folder: Path) -> dict:
    """A processor-only folder has no config.json: infer the family from the processor class name."""
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        data = read_json(folder, name) or {}
        cls = data.get("processor_class") or data.get("image_processor_type") or ""
        for prefix, model_type in (
            ("Qwen2VL", "qwen2_vl"),
            ("LlavaOnevision", "llava_onevision"),
            ("Idefics2", "idefics2"),
            ("Ovis2", "ovis2"),
        ):
            if cls.startswith(prefix):
                return {"model_type": model_type}
    raise ConfigError(f"{folder}: no config.json, and no processor file names a supported processor class.")


class AutoConfig:
    @staticmethod
    def from_pretrained(name_or_path, **kwargs):
        folder, family = _resolve(name_or_path, kwargs)
        return load_symbol(family.config).from_pretrained(folder, **_without_hub(kwargs))


class AutoProcessor:
    @staticmethod
    def from_pretrained(name_or_path, **kwargs):
        folder, family = _resolve(name_or_path, kwargs)
        return load_symbol(family.processor).from_pretrained(folder, **_without_hub(kwargs))


class AutoTokenizer:
    @staticmethod
    def from_pretrained(name_or_path, **kwargs):
        from .tokenization import Tokenizer

        folder = resolve_checkpoint(name_or_path, **{k: kwargs[k] for k in _HUB_KWARGS if k in kwargs})
        return Tokenizer.from_pretrained(folder, **_without_hub(kwargs))


class AutoImageProcessor:
    @staticmethod
    def from_pretrained(name_or_path, **kwargs):
        return AutoProcessor.from_pretrained(name_or_path, **kwargs).image_processor


class AutoModelForImageTextToText:
    @staticmethod
    def from_pretrained(name_or_path, **kwargs):
        folder, family = _resolve(name_or_path, kwargs)
        return load_symbol(family.model).from_pretrained(folder, **_without_hub(kwargs))

    @staticmethod
    def from_config(config, **kwargs):
        family = family_for({"model_type": getattr(config, "model_type", None)})
        return load_symbol(family.model)(config, **kwargs)


# transformers 4.x name for the same thing (the older documentation pages use it).
AutoModelForVision2Seq = AutoModelForImageTextToText


def _without_hub(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k not in _HUB_KWARGS}
