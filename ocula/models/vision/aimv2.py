"""AIMv2-style vision tower: the image encoder of Ovis2.

Notable features (in data-flow order):
- patch embedding: a stride-`patch_size` Conv2d ("valid"), RMSNorm over the patch vectors, then learned
  absolute position embeddings (one per patch of an `image_size` square tile: the tower sees fixed-size
  tiles, never native resolutions);
- pre-norm encoder layers: RMSNorm -> q / k / v (optional `qkv_bias`, also on out_proj) -> bidirectional
  SDPA -> out_proj (`vision/blocks.py`'s `ViTAttention`, as SigLIP's); RMSNorm -> SwiGLU MLP (`gate_proj` / `up_proj` / `down_proj`, optional `mlp_bias`);
- a final RMSNorm over the last hidden states;
- parameter names as transformers 5 saves them (`embeddings.patch_embedding`, `embeddings.rms_norm`,
  `encoder.layers.N.attention.{q,k,v,out}_proj`, `ffn.*`, `rms_norm1` / `rms_norm2`, `rms_norm`), so the
  Ovis2 visual tokenizer loads `vision_tower.transformer.*` by copying;
- RMSNorm statistics in float32, cast back before the weight (layers/norm.py), as transformers does.
Checked against transformers 5.23 `Ovis2VisionTransformer` (tests/test_ovis2_model.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...layers.mlp import SwiGLUMLP
from ...layers.norm import RMSNorm
from .blocks import ViTAttention, ViTConfig


@dataclass
class AIMv2VisionConfig(ViTConfig):
    """The tower's own fields (Ovis2VisionConfig adds the visual tokenizer's)."""

    model_type = "aimv2_vision"

    hidden_size: int = 1024
    intermediate_size: int = 2816  # SwiGLU width
    num_hidden_layers: int = 24
    num_attention_heads: int = 8
    patch_size: int = 14
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    qkv_bias: bool = False  # bias on q / k / v and out_proj
    mlp_bias: bool = False  # bias on the SwiGLU projections

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check(
            self.image_size >= self.patch_size,
            "image_size",
            f"must be at least patch_size={self.patch_size}.",
        )


class AIMv2Embeddings(nn.Module):
    def __init__(self, config: AIMv2VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.rms_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.position_embedding = nn.Embedding(config.grid**2, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, C, S, S] -> patch vectors [N, grid * grid, hidden] (row-major patches)."""
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(weight.dtype))  # [N, hidden, grid, grid]
        patches = self.rms_norm(patches.flatten(2).transpose(1, 2))  # [N, grid * grid, hidden]
        return patches + self.position_embedding.weight


class AIMv2EncoderLayer(nn.Module):
    def __init__(self, config: AIMv2VisionConfig):
        super().__init__()
        self.attention = ViTAttention(config.hidden_size, config.num_attention_heads, bias=config.qkv_bias)
        self.ffn = SwiGLUMLP(config.hidden_size, config.intermediate_size, config.hidden_act, config.mlp_bias)
        self.rms_norm1 = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rms_norm2 = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.rms_norm1(x))
        return x + self.ffn(self.rms_norm2(x))


class AIMv2Encoder(nn.Module):
    def __init__(self, config: AIMv2VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(AIMv2EncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class AIMv2VisionTransformer(nn.Module):
    """embeddings -> encoder layers -> final RMSNorm: tiles [N, C, S, S] -> [N, grid * grid, hidden]."""

    def __init__(self, config: AIMv2VisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = AIMv2Embeddings(config)
        self.encoder = AIMv2Encoder(config)
        self.rms_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.rms_norm(self.encoder(self.embeddings(pixel_values)))
