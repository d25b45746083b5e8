"""Rotary position embeddings: 1-D RoPE, Qwen2-VL's M-RoPE and its 2-D vision rotary.

Notable features:
- no buffers: the inverse frequencies are recomputed (in float32) on first use per device, so a model
  built on the meta device needs nothing special at load time;
- `RotaryEmbedding` takes positions [B, S] (1-D RoPE) or [3, B, S] (M-RoPE: temporal / height / width
  rows; frequency band i of `mrope_section` reads row i % 3, as in Qwen2-VL). [B, S] positions on an
  M-RoPE model are the same as three equal rows;
- cos / sin are computed in float32 and cast to the activation dtype, and `apply_rotary` multiplies in
  that dtype, as transformers does; the vision variant rotates in float32 (also as transformers does).
"""

from __future__ import annotations

import torch
from torch import nn


def inverse_frequencies(dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """1 / theta^(2i / dim) for i < dim / 2, float32 [dim // 2]."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] over the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, D] rotated by cos / sin [B, S, D]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, S, D]
    return x * cos + rotate_half(x) * sin


class _CachedFrequencies(nn.Module):
    """Holds `inv_freq` outside the state dict, one float32 copy per device."""

    def __init__(self, dim: int, theta: float):
        super().__init__()
        self.dim, self.theta = dim, theta
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq:
            self._inv_freq[device] = inverse_frequencies(self.dim, self.theta, device)
        return self._inv_freq[device]


class RotaryEmbedding(_CachedFrequencies):
    """cos / sin tables [B, S, head_dim] for 1-D RoPE or M-RoPE positions."""

    def __init__(self, head_dim: int, theta: float, mrope_section: list[int] | None = None):
        super().__init__(head_dim, theta)
        self.mrope_section = list(mrope_section) if mrope_section else None

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq(positions.device)  # [(3,) B, S, D/2]
        if positions.dim() == 3:
            freqs = self._interleave_sections(freqs)  # [3, B, S, D/2] -> [B, S, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, S, D]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def _interleave_sections(self, freqs: torch.Tensor) -> torch.Tensor:
        if self.mrope_section is None:
            return freqs[0]  # three equal rows on a 1-D RoPE model
        chunks = freqs.split(self.mrope_section, dim=-1)
        return torch.cat([chunk[i % 3] for i, chunk in enumerate(chunks)], dim=-1)


class VisionRotaryEmbedding(_CachedFrequencies):
    """Qwen2-VL's 2-D rotary: half the head dim rotates with the patch row, half with the column."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__(head_dim // 2, theta)

    def forward(self, rows_cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """rows_cols [N, 2] long -> cos, sin float32 [N, head_dim]."""
        freqs = rows_cols[..., None].float() * self.inv_freq(rows_cols.device)  # [N, 2, D/4]
        freqs = freqs.flatten(1)  # [N, D/2]: row frequencies, then column frequencies
        emb = torch.cat((freqs, freqs), dim=-1)  # [N, D]
        return emb.cos(), emb.sin()


def apply_vision_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, H, D] rotated in float32 by cos / sin [N, D], returned in x's dtype."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # [N, 1, D]
    out = x.float() * cos + rotate_half(x.float()) * sin
    return out.to(x.dtype)


def vision_rows_cols(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """Patch (row, col) [N, 2] for every patch of every item, in the processor's merge-window order.

    The processor emits patches window by window (merge x merge patches each), frames one after another.
    """
    parts = []
    for t, h, w in grid_thw.tolist():
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")  # [h, w] each
        window = (h // merge, merge, w // merge, merge)
        rows = rows.reshape(window).transpose(1, 2).flatten()  # window-major order
        cols = cols.reshape(window).transpose(1, 2).flatten()
        parts.append(torch.stack((rows, cols), dim=-1).repeat(t, 1))  # [t * h * w, 2]
    return torch.cat(parts).to(grid_thw.device)
