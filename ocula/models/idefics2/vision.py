"""Idefics2's vision tower: SigLIP over images of any size (NaViT-style "Patch n' Pack" embeddings).

Notable features:
- images arrive padded to the batch's largest height / width; `patch_mask_from_pixels` turns the processor's
  `pixel_attention_mask` [N, H, W] into a patch mask [N, H/p, W/p] (a patch is real only when all its pixels
  are), and the padding patches are masked out as keys in every encoder layer;
- bucketed position ids: the real patch grid of each image (h x w patches) is stretched over the trained
  grid of `image_size / patch_size` buckets per side (row i -> bucket of i / h), so any resolution reuses the
  learned position table; padding patches read position 0. The float32 arithmetic and `bucketize(right=True)`
  are those of transformers, so the ids are identical;
- the encoder layers, attention, MLP and post LayerNorm are `models/vision/siglip.py`'s (same parameter
  names: `embeddings.patch_embedding`, `encoder.layers.N.self_attn.q_proj`, `post_layernorm`, ...).
Checked against transformers 5.23 `Idefics2VisionTransformer` (tests/test_idefics2_model.py).
"""

from __future__ import annotations

import torch

from ..vision.siglip import SiglipVisionTransformer
from .config import Idefics2VisionConfig


def patch_mask_from_pixels(pixel_mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """pixel_mask [N, H, W] (1 = real pixel) -> [N, H // p, W // p] bool: patches whose pixels are all real."""
    # [N, H, W] -> [N, h, w, p, p]: the pixels of each patch
    windows = pixel_mask.unfold(1, patch_size, patch_size).unfold(2, patch_size, patch_size)
    return windows.sum(dim=(-1, -2)) == patch_size * patch_size


def bucketed_position_ids(patch_mask: torch.Tensor, grid: int) -> torch.Tensor:
    """patch_mask [N, h, w] bool -> position ids [N, h * w] into a `grid` x `grid` position table."""
    batch, max_h, max_w = patch_mask.shape
    device = patch_mask.device
    boundaries = torch.arange(1 / grid, 1.0, 1 / grid, device=device)  # [grid - 1] bucket edges
    rows, cols = patch_mask[:, :, 0].sum(dim=1), patch_mask[:, 0, :].sum(dim=1)  # [N] real patches per side
    # fraction of the image height / width at each patch row / column: [N, h] and [N, w]
    frac_h = torch.arange(max_h, device=device, dtype=torch.float32)[None, :] * (1.0 / rows)[:, None]
    frac_w = torch.arange(max_w, device=device, dtype=torch.float32)[None, :] * (1.0 / cols)[:, None]
    bucket_h = torch.bucketize(frac_h.clamp(max=1.0 - 1e-6), boundaries, right=True)
    bucket_w = torch.bucketize(frac_w.clamp(max=1.0 - 1e-6), boundaries, right=True)
    ids = (bucket_h[:, :, None] * grid + bucket_w[:, None, :]).reshape(batch, -1)  # [N, h * w]
    return torch.where(patch_mask.reshape(batch, -1), ids, torch.zeros_like(ids))


class Idefics2VisionTransformer(SiglipVisionTransformer):
    """SigLIP whose position embeddings follow each image's own patch grid (see the module docstring)."""

    config: Idefics2VisionConfig

    def forward(  # type: ignore[override]
        self, pixel_values: torch.Tensor, patch_attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """pixel_values [N, C, H, W], patch_attention_mask [N, H/p, W/p] bool -> [N, H/p * W/p, hidden]."""
        patch = self.config.patch_size
        if patch_attention_mask is None:
            batch, _, height, width = pixel_values.shape
            patch_attention_mask = torch.ones(
                batch, height // patch, width // patch, dtype=torch.bool, device=pixel_values.device
            )
        position_ids = bucketed_position_ids(patch_attention_mask, self.config.grid)
        return super().forward(pixel_values, patch_attention_mask.flatten(1), position_ids)
