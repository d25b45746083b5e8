"""Qwen2-VL: native-resolution ViT with 2-D rotary, 2x2 patch merger, Qwen2 decoder with M-RoPE."""

from .config import Qwen2VLConfig, Qwen2VLTextConfig, Qwen2VLVisionConfig
from .modeling import Qwen2VLForConditionalGeneration, Qwen2VLModel
from .processing import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

__all__ = [
    "Qwen2VLConfig",
    "Qwen2VLForConditionalGeneration",
    "Qwen2VLImageProcessor",
    "Qwen2VLModel",
    "Qwen2VLProcessor",
    "Qwen2VLTextConfig",
    "Qwen2VLVideoProcessor",
    "Qwen2VLVisionConfig",
]
