"""Qwen2-VL configs: vision tower, Qwen2 text decoder with M-RoPE, and the top-level config.

Notable features:
- loads both the transformers 5 layout (nested `text_config` with `rope_parameters`) and the hub's flat
  layout (text fields at top level, `rope_scaling: {"type": "mrope", "mrope_section": [...]}`,
  `rope_theta`, `torch_dtype`, vision `in_chans`);
- `tie_word_embeddings` read from the top level or, for pre-v5 saves, from the text config;
- defaults follow transformers' configuration_qwen2_vl.py (Qwen2-VL-7B sizes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ...configuration_utils import BaseConfig
from ...layers.mlp import activation
from ..text.qwen2 import Qwen2Config


@dataclass
class Qwen2VLVisionConfig(BaseConfig):
    model_type = "qwen2_vl_vision"
    renames: ClassVar[dict[str, str]] = {"in_chans": "in_channels", "num_attention_heads": "num_heads", "num_hidden_layers": "depth"}

    depth: int = 32  # vision blocks
    embed_dim: int = 1280  # width of the vision blocks
    hidden_size: int = 3584  # output width of the patch merger (= the text model's hidden size)
    hidden_act: str = "quick_gelu"  # activation of the block MLPs (the merger always uses exact GELU)
    mlp_ratio: float = 4  # block MLP width = int(embed_dim * mlp_ratio)
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2  # merge x merge patches become one text token
    temporal_patch_size: int = 2  # frames per patch (an image is repeated to fill it)
    rope_theta: float = 10000.0  # base of the 2-D vision rotary

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Qwen2VLVisionConfig:
        data = dict(data)
        rope = data.pop("rope_parameters", None) or {}
        if "rope_theta" in rope:
            data["rope_theta"] = rope["rope_theta"]
        return super().from_dict(data)

    def __post_init__(self) -> None:
        self.check_positive("depth", "embed_dim", "hidden_size", "num_heads", "in_channels", "patch_size")
        self.check_positive("spatial_merge_size", "temporal_patch_size")
        self.check(self.embed_dim % self.num_heads == 0, "embed_dim",
                   f"must be divisible by num_heads={self.num_heads}.")
        self.check((self.embed_dim // self.num_heads) % 4 == 0, "embed_dim",
                   "/ num_heads (the head dim) must be a multiple of 4 for the 2-D rotary.")
        activation(self.hidden_act)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads


@dataclass
class Qwen2VLTextConfig(Qwen2Config):
    """Qwen2 decoder with M-RoPE; transformers' Qwen2VLTextConfig defaults (Qwen2-VL-7B)."""

    model_type = "qwen2_vl_text"

    vocab_size: int = 152064
    hidden_size: int = 8192
    intermediate_size: int = 29568
    num_hidden_layers: int = 80
    num_attention_heads: int = 64
    num_key_value_heads: int | None = 8
    rms_norm_eps: float = 1e-5
    max_window_layers: int = 80
    mrope_section: list[int] | None = field(default_factory=lambda: [16, 24, 24])
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151645


@dataclass
class Qwen2VLConfig(BaseConfig):
    model_type = "qwen2_vl"

    text_config: Qwen2VLTextConfig = field(default_factory=Qwen2VLTextConfig)
    vision_config: Qwen2VLVisionConfig = field(default_factory=Qwen2VLVisionConfig)
    image_token_id: int = 151655  # <|image_pad|>
    video_token_id: int = 151656  # <|video_pad|>
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False
    dtype: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Qwen2VLConfig:
        data = cls._apply_renames(dict(data))
        text = data.pop("text_config", None)
        if text is None:  # hub layout: the text fields sit at the top level
            text = cls._pop_flat_text_fields(data)
        text = Qwen2VLTextConfig.coerce(text)
        vision = Qwen2VLVisionConfig.coerce(data.pop("vision_config", None))
        # pre-v5 saves may carry tie_word_embeddings in the text config only
        data["tie_word_embeddings"] = bool(data.get("tie_word_embeddings") or text.tie_word_embeddings)
        return super().from_dict({**data, "text_config": text, "vision_config": vision})

    @staticmethod
    def _pop_flat_text_fields(data: dict[str, Any]) -> dict[str, Any]:
        names = Qwen2VLTextConfig.field_names() | {"rope_parameters", "rope_scaling", "rope_theta"}
        shared = ("tie_word_embeddings", "dtype")  # read at the top level too: copied, not moved
        text = {key: data.pop(key) for key in list(data) if key in names and key not in shared}
        return {**text, **{key: data[key] for key in shared if key in data}}

    def __post_init__(self) -> None:
        text_hidden = self.text_config.hidden_size
        self.check(self.vision_config.hidden_size == text_hidden, "vision_config",
                   f"hidden_size={self.vision_config.hidden_size} must equal the text hidden_size={text_hidden}.")
        self.check(self.text_config.mrope_section is not None, "text_config",
                   "needs rope_parameters.mrope_section (Qwen2-VL uses M-RoPE).")
