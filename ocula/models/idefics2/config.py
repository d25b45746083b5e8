"""Idefics2 configs: the variable-resolution SigLIP tower, the perceiver resampler and the top-level config.

Notable features:
- the text config is a Mistral decoder (`models/text/mistral.py`) with Idefics2's own defaults for a missing
  `text_config` (max_position_embeddings 32768, rms_norm_eps 1e-5, pad_token_id 0), as transformers sets them;
- loads the transformers 5 layout and the hub's (`torch_dtype`, `rope_theta`, sub-configs whose
  `model_type` is "idefics2" from the original remote-code format);
- like transformers, a perceiver whose hidden_size differs from the text model's is given the text
  model's hidden_size and rms_norm_eps (the hub configs leave them out and rely on this);
- defaults follow transformers' configuration_idefics2.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...configuration_utils import BaseConfig
from ...layers.mlp import activation
from ..text.mistral import MistralConfig
from ..vision.siglip import SiglipVisionConfig

# transformers' Idefics2Config fills a missing text_config with these on top of MistralConfig's defaults.
TEXT_DEFAULTS = {"max_position_embeddings": 4096 * 8, "rms_norm_eps": 1e-5, "pad_token_id": 0}


@dataclass
class Idefics2VisionConfig(SiglipVisionConfig):
    """SigLIP with NaViT-style variable resolution; `image_size` sets the position-embedding grid."""

    model_type = "idefics2_vision"

    image_size: int = 224  # position embeddings cover (image_size / patch_size)^2 buckets
    patch_size: int = 32
    vision_use_head: bool = False  # Idefics2 has no pooling head


@dataclass
class Idefics2PerceiverConfig(BaseConfig):
    model_type = "idefics2_perceiver"

    hidden_act: str = "silu"  # activation of the perceiver MLPs
    hidden_size: int = 4096  # latent width (= the text model's hidden size)
    rms_norm_eps: float = 1e-6
    resampler_n_latents: int = 64  # tokens per image (crop) handed to the text model
    resampler_depth: int = 3  # cross-attention blocks
    resampler_n_heads: int = 16
    resampler_head_dim: int = 96
    num_key_value_heads: int = 4  # grouped key / value heads of the cross-attention
    attention_dropout: float = 0.0

    def __post_init__(self) -> None:
        self.check_positive("hidden_size", "resampler_n_latents", "resampler_depth", "resampler_n_heads")
        self.check_positive("resampler_head_dim", "num_key_value_heads")
        self.check(
            self.resampler_n_heads % self.num_key_value_heads == 0,
            "num_key_value_heads",
            f"must divide resampler_n_heads={self.resampler_n_heads}.",
        )
        activation(self.hidden_act)


@dataclass
class Idefics2Config(BaseConfig):
    model_type = "idefics2"

    text_config: MistralConfig = field(default_factory=lambda: MistralConfig(**TEXT_DEFAULTS))
    vision_config: Idefics2VisionConfig = field(default_factory=Idefics2VisionConfig)
    perceiver_config: Idefics2PerceiverConfig = field(default_factory=Idefics2PerceiverConfig)
    image_token_id: int = 32001  # <image>
    tie_word_embeddings: bool = False
    use_cache: bool = True
    dtype: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Idefics2Config:
        data = cls._apply_renames(dict(data))
        text = data.pop("text_config", None)
        if not isinstance(text, MistralConfig):
            text = MistralConfig.from_dict({**TEXT_DEFAULTS, **(text or {})})
        vision = Idefics2VisionConfig.coerce(data.pop("vision_config", None))
        perceiver = Idefics2PerceiverConfig.coerce(data.pop("perceiver_config", None))
        # pre-v5 saves may carry tie_word_embeddings in the text config only
        data["tie_word_embeddings"] = bool(data.get("tie_word_embeddings") or text.tie_word_embeddings)
        return super().from_dict(
            {**data, "text_config": text, "vision_config": vision, "perceiver_config": perceiver}
        )

    def __post_init__(self) -> None:
        text, perceiver = self.text_config, self.perceiver_config
        if perceiver.hidden_size != text.hidden_size:  # transformers' fix-up for hub configs
            perceiver.hidden_size, perceiver.rms_norm_eps = text.hidden_size, text.rms_norm_eps
