"""Ovis2 configs: the AIMv2-style visual tokenizer, the Qwen2 text decoder and the top-level config.

Notable features:
- `Ovis2VisionConfig` = the AIMv2 tower's fields plus the visual tokenizer's: `hidden_stride` (s x s
  neighbouring patches become one visual token), the visual vocabulary size (`vocab_size`, its last
  `num_visual_indicator_tokens` rows embed the <IMG_START> / <IMG_GRID> / <IMG_COL> / <IMG_ROW> / <IMG_END>
  indicator tokens) and `tokenize_function` (softmax, gumbel_argmax or st_argmax);
- loads the transformers 5 layout and the hub's (`torch_dtype`, `rope_theta` in the text config);
- `image_token_id` is <IMG_ATOM>: Ovis2's `<image>` is plain text that the processor expands;
- defaults follow transformers' configuration_ovis2.py (Ovis2-1B/2B sizes and token ids).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...configuration_utils import BaseConfig
from ..text.qwen2 import Qwen2Config
from ..vision.aimv2 import AIMv2VisionConfig

TOKENIZE_FUNCTIONS = ("softmax", "gumbel_argmax", "st_argmax")
# A config built without text_config gets Ovis2-2B's decoder (Qwen2.5-1.5B), so the defaults fit together.
DEFAULT_TEXT = {
    "vocab_size": 151936,
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "tie_word_embeddings": True,
}


@dataclass
class Ovis2VisionConfig(AIMv2VisionConfig):
    model_type = "ovis2_vision"

    vocab_size: int = 16384  # visual words, the indicator slots included
    hidden_stride: int = 1  # hidden_stride x hidden_stride patches -> one visual token
    num_visual_indicator_tokens: int = 5  # last rows of the visual embedding table
    tokenize_function: str = "softmax"  # softmax | gumbel_argmax | st_argmax over the visual words
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_positive("vocab_size", "hidden_stride")
        self.check(
            0 <= self.num_visual_indicator_tokens < self.vocab_size,
            "num_visual_indicator_tokens",
            f"must be >= 0 and below vocab_size={self.vocab_size}.",
        )
        self.check(
            self.tokenize_function in TOKENIZE_FUNCTIONS,
            "tokenize_function",
            f"is not supported: use one of {TOKENIZE_FUNCTIONS}.",
        )

    @property
    def tokens_per_side(self) -> int:
        """Visual tokens per tile side: the patch grid padded up to a multiple of hidden_stride."""
        return -(-self.grid // self.hidden_stride)

    @property
    def tokens_per_tile(self) -> int:
        return self.tokens_per_side**2


@dataclass
class Ovis2Config(BaseConfig):
    model_type = "ovis2"

    text_config: Qwen2Config = field(default_factory=lambda: Qwen2Config(**DEFAULT_TEXT))
    vision_config: Ovis2VisionConfig = field(default_factory=Ovis2VisionConfig)
    image_token_id: int = 151665  # <IMG_ATOM>
    # <IMG_START>, <IMG_GRID>, <IMG_COL>, <IMG_ROW>, <IMG_END>: visual indicator rows 0..4, in this order
    visual_indicator_token_ids: list[int] = field(
        default_factory=lambda: [151666, 151667, 151668, 151669, 151670]
    )
    vocab_size: int = 151643  # lm_head rows (the text vocabulary)
    hidden_size: int = 1536  # width of the visual embedding table and lm_head (= the text hidden size)
    tie_word_embeddings: bool = True
    dtype: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Ovis2Config:
        data = cls._apply_renames(dict(data))
        text = Qwen2Config.coerce(data.pop("text_config", None))
        vision = Ovis2VisionConfig.coerce(data.pop("vision_config", None))
        if "visual_indicator_token_ids" in data:
            data["visual_indicator_token_ids"] = list(data["visual_indicator_token_ids"])
        return super().from_dict({**data, "text_config": text, "vision_config": vision})

    def __post_init__(self) -> None:
        text_hidden = self.text_config.hidden_size
        self.check(
            self.hidden_size == text_hidden,
            "hidden_size",
            f"must equal text_config.hidden_size={text_hidden} (the visual table feeds the decoder).",
        )
        count = self.vision_config.num_visual_indicator_tokens
        self.check(
            len(self.visual_indicator_token_ids) == count,
            "visual_indicator_token_ids",
            f"must list vision_config.num_visual_indicator_tokens={count} token ids.",
        )
