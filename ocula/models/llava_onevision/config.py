"""LLaVA-OneVision config: a SigLIP vision tower, a 2-layer GELU projector and a Qwen2 decoder.

Notable features:
- loads transformers 5 saves (`dtype`, `rope_parameters`) and the hub's pre-v5 files (`torch_dtype`,
  `rope_theta` in the text config) alike;
- `image_token_id` / `video_token_id` are also read under their config.json names `image_token_index` /
  `video_token_index` (transformers' `attribute_map`);
- the default `image_grid_pinpoints` are the hub's 6x6 anyres grid (384 * {1..6} on each side);
- a missing `vision_config` gets the SigLIP-so400m tower of the real checkpoints, as transformers does;
- `tie_word_embeddings` is read from the top level or, for older saves, from the text config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ...configuration_utils import BaseConfig
from ...layers.mlp import activation
from ..text.qwen2 import Qwen2Config
from ..vision.siglip import SiglipVisionConfig

DEFAULT_PINPOINTS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
# transformers' LlavaOnevisionConfig sub-config defaults when config.json has no vision_config
SO400M = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "patch_size": 14,
    "image_size": 384,
    "num_hidden_layers": 26,
    "num_attention_heads": 16,
    "vision_use_head": False,
}


@dataclass
class LlavaOnevisionConfig(BaseConfig):
    model_type = "llava_onevision"
    renames: ClassVar[dict[str, str]] = {
        "torch_dtype": "dtype",
        "image_token_index": "image_token_id",
        "video_token_index": "video_token_id",
    }

    text_config: Qwen2Config = field(default_factory=Qwen2Config)
    vision_config: SiglipVisionConfig = field(default_factory=lambda: SiglipVisionConfig(**SO400M))
    image_token_id: int = 151646  # <image>
    video_token_id: int = 151647  # <video>
    projector_hidden_act: str = "gelu"  # activation between the projector's two linears
    multimodal_projector_bias: bool = True
    vision_feature_select_strategy: str = "full"  # "default" drops the first (CLS) vision token
    vision_feature_layer: int | list[int] = -1  # hidden state(s) of the tower fed to the projector
    image_grid_pinpoints: list[list[int]] = field(
        default_factory=lambda: [list(p) for p in DEFAULT_PINPOINTS]
    )
    vision_aspect_ratio: str = "anyres_max_9"  # grids above 9 tiles' worth of patches are downsampled
    tie_word_embeddings: bool = False
    dtype: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LlavaOnevisionConfig:
        data = cls._apply_renames(dict(data))
        text = Qwen2Config.coerce(data.pop("text_config", None))
        vision = data.pop("vision_config", None)
        vision = SiglipVisionConfig.coerce(vision) if vision is not None else SiglipVisionConfig(**SO400M)
        # pre-v5 saves may carry tie_word_embeddings in the text config only
        data["tie_word_embeddings"] = bool(data.get("tie_word_embeddings") or text.tie_word_embeddings)
        return super().from_dict({**data, "text_config": text, "vision_config": vision})

    def __post_init__(self) -> None:
        self.check(
            self.vision_feature_select_strategy in ("default", "full"),
            "vision_feature_select_strategy",
            "must be 'default' (drop the first vision token) or 'full'.",
        )
        layers = self.feature_layers
        depth = self.vision_config.num_hidden_layers
        self.check(
            bool(layers) and all(-depth - 1 <= i <= depth for i in layers),
            "vision_feature_layer",
            f"must index the {depth + 1} hidden states of the vision tower (embeddings + {depth} layers).",
        )
        self.check(
            self.vision_aspect_ratio.startswith("anyres_max_")
            and self.vision_aspect_ratio.removeprefix("anyres_max_").isdigit(),
            "vision_aspect_ratio",
            "must look like 'anyres_max_9'.",
        )
        self.check(
            all(len(p) == 2 for p in self.image_grid_pinpoints),
            "image_grid_pinpoints",
            "must be a list of [height, width] pairs.",
        )
        activation(self.projector_hidden_act)

    @property
    def feature_layers(self) -> list[int]:
        """`vision_feature_layer` as a list (one entry for an int)."""
        layer = self.vision_feature_layer
        return [layer] if isinstance(layer, int) else list(layer)

    @property
    def max_num_patches(self) -> int:
        """The N of `anyres_max_N`: tiles' worth of patches above which the grid is downsampled."""
        return int(self.vision_aspect_ratio.removeprefix("anyres_max_"))

    @property
    def image_token_index(self) -> int:
        return self.image_token_id

    @property
    def video_token_index(self) -> int:
        return self.video_token_id
