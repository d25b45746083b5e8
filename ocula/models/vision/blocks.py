"""Blocks the vision towers share by import.

Notable features:
- `ViTConfig`: the fields every ViT-style tower has (SigLIP's defaults) with their checks and `grid`;
- `ViTAttention`: bidirectional multi-head self-attention with separate `q_proj` / `k_proj` / `v_proj` /
  `out_proj` (the checkpoint names of SigLIP and AIMv2), optional biases, an optional boolean key mask for
  padded patches (Idefics2), one SDPA call with transformers' scale head_dim ** -0.5;
- `ViTMLP`: fc1 -> activation -> fc2 (SigLIP, Qwen2-VL's vision blocks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...configuration_utils import BaseConfig
from ...layers.mlp import activation


@dataclass
class ViTConfig(BaseConfig):
    """Fields shared by the vision towers' configs; each tower restates only the defaults it changes."""

    hidden_size: int = 768
    intermediate_size: int = 3072  # MLP width
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224  # the (tile) side the position embeddings were trained for
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    attention_dropout: float = 0.0  # training only; inference ignores it

    def __post_init__(self) -> None:
        self.check_positive("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        self.check_positive("num_channels", "image_size", "patch_size")
        self.check(
            self.hidden_size % self.num_attention_heads == 0,
            "hidden_size",
            f"must be divisible by num_attention_heads={self.num_attention_heads}.",
        )
        activation(self.hidden_act)

    @property
    def grid(self) -> int:
        """Patches per side of an `image_size` square input."""
        return self.image_size // self.patch_size


class ViTAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, bias: bool = True):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, hidden_size // num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.out_proj = nn.Linear(hidden_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, N, hidden]; mask [B, 1, 1, N] bool (True = attend) or None (every patch sees all)."""
        batch, seq, _ = x.shape
        heads = (batch, seq, self.num_heads, self.head_dim)
        q, k, v = (proj(x).view(heads).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.head_dim**-0.5)  # [B, H, N, D]
        return self.out_proj(out.transpose(1, 2).flatten(2))  # [B, N, hidden]


class ViTMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.act = activation(hidden_act)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))
