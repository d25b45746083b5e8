"""One explicit table: which model_type / architecture is served by which family module."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from .errors import UnknownModelTypeError


@dataclass(frozen=True)
class Family:
    name: str  # the model_type in config.json
    config: str  # "module:Class" of the config dataclass
    model: str  # "module:Class" of the *ForConditionalGeneration model
    processor: str  # "module:Class" of the processor
    architectures: tuple[str, ...]  # names transformers writes under "architectures"


def _family(name: str, config: str, model: str, processor: str) -> Family:
    base = f"ocula.models.{name}"
    return Family(
        name=name,
        config=f"{base}.config:{config}",
        model=f"{base}.modeling:{model}",
        processor=f"{base}.processing:{processor}",
        architectures=(model,),
    )


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        _family("qwen2_vl", "Qwen2VLConfig", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"),
        _family(
            "llava_onevision",
            "LlavaOnevisionConfig",
            "LlavaOnevisionForConditionalGeneration",
            "LlavaOnevisionProcessor",
        ),
        _family("idefics2", "Idefics2Config", "Idefics2ForConditionalGeneration", "Idefics2Processor"),
        _family("ovis2", "Ovis2Config", "Ovis2ForConditionalGeneration", "Ovis2Processor"),
    )
}

_BY_ARCHITECTURE = {arch: f for f in FAMILIES.values() for arch in f.architectures}


def family_for(config_dict: dict, source: str = "config.json") -> Family:
    """Find the family of a config.json dict by `model_type`, else by `architectures`."""
    model_type = config_dict.get("model_type")
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    for arch in config_dict.get("architectures") or ():
        if arch in _BY_ARCHITECTURE:
            return _BY_ARCHITECTURE[arch]
    supported = ", ".join(sorted(FAMILIES))
    raise UnknownModelTypeError(
        f"{source}: model_type {model_type!r} (architectures {config_dict.get('architectures')}) is not "
        f"supported by ocula. Supported model types: {supported}."
    )


def load_symbol(ref: str):
    """Import "package.module:Name" lazily, so importing ocula stays cheap."""
    module_name, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module_name), attr)
