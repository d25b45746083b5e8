"""ocula: open vision-language models with the transformers API, a fast engine and a server.

    from ocula import AutoProcessor, AutoModelForImageTextToText

Names are imported lazily: `import ocula` is cheap and never pulls in the engine or the server.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_FAMILY_NAMES = {
    "qwen2_vl": (
        "Qwen2VLConfig", "Qwen2VLTextConfig", "Qwen2VLVisionConfig", "Qwen2VLForConditionalGeneration",
        "Qwen2VLModel", "Qwen2VLProcessor", "Qwen2VLImageProcessor", "Qwen2VLVideoProcessor",
    ),
    "llava_onevision": (
        "LlavaOnevisionConfig", "LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel",
        "LlavaOnevisionProcessor", "LlavaOnevisionImageProcessor", "LlavaOnevisionVideoProcessor",
    ),
    "idefics2": (
        "Idefics2Config", "Idefics2ForConditionalGeneration", "Idefics2Model", "Idefics2Processor",
        "Idefics2ImageProcessor",
    ),
    "ovis2": (
        "Ovis2Config", "Ovis2VisionConfig", "Ovis2ForConditionalGeneration", "Ovis2Model", "Ovis2Processor",
        "Ovis2ImageProcessor", "Ovis2ImageProcessorPil", "Ovis2ImageProcessorFast",
    ),
}

_NAMES: dict[str, str] = {
    "AutoConfig": "ocula.auto",
    "AutoProcessor": "ocula.auto",
    "AutoTokenizer": "ocula.auto",
    "AutoImageProcessor": "ocula.auto",
    "AutoModelForImageTextToText": "ocula.auto",
    "AutoModelForVision2Seq": "ocula.auto",
    "BatchFeature": "ocula.batch",
    "GenerationConfig": "ocula.generation",
    "TextStreamer": "ocula.generation",
    "TextIteratorStreamer": "ocula.generation",
    "Tokenizer": "ocula.tokenization",
    "LLM": "ocula.engine.llm",
    "SamplingParams": "ocula.engine.sampling_params",
    "LLMEngine": "ocula.engine.engine",
    "AsyncLLMEngine": "ocula.engine.async_engine",
}


def _family_module(family: str, name: str) -> str:
    if "Processor" in name:
        return f"ocula.models.{family}.processing"
    if name.endswith("Config"):
        return f"ocula.models.{family}.config"
    return f"ocula.models.{family}.modeling"


for _family, _names in _FAMILY_NAMES.items():
    for _name in _names:
        _NAMES[_name] = _family_module(_family, _name)

__all__ = [*sorted(_NAMES), "__version__", "infer_device"]  # noqa: PLE0604 - built from the lazy-name table


def infer_device() -> str:
    """The device a model should run on: "cuda" when a GPU is visible, else "cpu" (as transformers')."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def __getattr__(name: str):
    module = _NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'ocula' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
