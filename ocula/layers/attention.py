"""Causal self-attention for every decoder layer: one function, two paths chosen by the metadata.

Notable features:
- dense path (library, `generate()`, training): a preallocated `StaticKVCache`; the S new keys / values
  are written into the cache slice [start, start + S) and attention runs over [0, start + S): nothing is
  concatenated per step;
- GQA through SDPA's `enable_gqa` (no repeated K/V copies), causal by cache index, a padding key mask,
  and an optional sliding window (a query at index q sees keys k with q - window < k <= q, as
  transformers' sliding masks);
- masks are built once per forward (one per distinct window) by `dense_masks`, not once per layer; a
  single new token with no padding and no window needs none (it sees the whole cache), so batch-1 decode
  steps build no mask at all;
- a query row with no visible key (a left-padding position) outputs zeros, as transformers gets from SDPA,
  so even padding positions give the same logits;
- `segment_attention`: bidirectional attention within segments of a packed sequence (the vision towers'
  per-image / per-frame attention), on 4-D views so PyTorch picks its flash kernel on CPU too;
- paged path (engine): metadata that is not `DenseAttentionMetadata` is handed to the engine's paged
  attention (`ocula/engine/paged_attention.py`), which writes into its block pool. Both paths give the same
  numbers.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# SDPA backends on CUDA, best first, without cuDNN's: it builds an execution plan for every new shape (tens
# of milliseconds per call, seen on an H200 with torch 2.11), and the engine's prefill chunks and masked
# steps change shape with every prompt.
CUDA_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **options) -> torch.Tensor:
    """`F.scaled_dot_product_attention`, on CUDA restricted to `CUDA_SDPA_BACKENDS`."""
    if q.is_cuda:
        with sdpa_kernel(CUDA_SDPA_BACKENDS):
            return F.scaled_dot_product_attention(q, k, v, **options)
    return F.scaled_dot_product_attention(q, k, v, **options)


class StaticKVCache:
    """k, v: [num_layers, B, num_kv_heads, max_len, head_dim], allocated once per generate() call."""

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def update(
        self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k / v [B, Hkv, S, D] at [start, start + S); return views of [0, start + S)."""
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


@dataclass
class DenseAttentionMetadata:
    cache: StaticKVCache | None = None  # None: no cache (plain forward / training)
    start: int = 0  # cache index where the S new tokens are written
    key_mask: torch.Tensor | None = None  # [B, start + S] bool, True = real token (padding mask)


# Mask per sliding window (None = full attention); None as a value means "plain causal, use is_causal".
DenseMasks = dict[int | None, torch.Tensor | None]


def dense_masks(
    attn: DenseAttentionMetadata, seq_len: int, windows: set[int | None], device: torch.device
) -> DenseMasks:
    """The boolean masks [B | 1, 1, S, start + S] the layers need, built once per forward."""
    return {window: _dense_mask(attn, seq_len, window, device) for window in windows}


def _dense_mask(
    attn: DenseAttentionMetadata, seq_len: int, window: int | None, device: torch.device
) -> torch.Tensor | None:
    total = attn.start + seq_len
    key_mask = attn.key_mask
    if key_mask is not None and bool(key_mask.all()):
        key_mask = None
    if key_mask is None and window is None and (attn.start == 0 or seq_len == 1):
        return None  # plain causal (SDPA's is_causal path), or one new token that sees the whole cache
    q_idx = torch.arange(attn.start, total, device=device)[:, None]  # [S, 1] cache index of each query
    k_idx = torch.arange(total, device=device)[None, :]  # [1, T]
    mask = k_idx <= q_idx  # [S, T]
    if window is not None:
        mask = mask & (k_idx > q_idx - window)
    mask = mask[None, None]  # [1, 1, S, T]
    if key_mask is not None:
        mask = mask & key_mask[:, None, None, :total].to(device=device, dtype=torch.bool)  # [B, 1, S, T]
    return mask


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer: int,
    attn: DenseAttentionMetadata | Any,
    *,
    scale: float,
    masks: DenseMasks | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """q [B, Hq, S, D], k / v [B, Hkv, S, D] (rotary applied) -> [B, S, Hq * D]."""
    if not isinstance(attn, DenseAttentionMetadata):
        return _paged(q, k, v, layer, attn, scale, sliding_window)
    if attn.cache is not None:
        k, v = attn.cache.update(layer, attn.start, k, v)  # [B, Hkv, start + S, D]
    if masks is None:
        masks = dense_masks(attn, q.shape[2], {sliding_window}, q.device)
    mask = masks[sliding_window]
    causal = mask is None and q.shape[2] > 1
    live = None if mask is None else mask.any(dim=-1, keepdim=True)  # [B | 1, 1, S, 1]
    out = sdpa(
        q, k.to(q.dtype), v.to(q.dtype), attn_mask=None if mask is None else mask | ~live, is_causal=causal,
        scale=scale, enable_gqa=q.shape[1] != k.shape[1],
    )  # [B, Hq, S, D]
    if live is not None:
        # A query that sees no key (a left-padding position) gets a zero output, as transformers gets from
        # SDPA's fully-masked rows; unmasking the row first keeps every backend free of NaNs.
        out = out * live
    return out.transpose(1, 2).flatten(2)


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: list[int]) -> torch.Tensor:
    """q, k, v [H, N, D] -> [H, N, D]: each segment [bounds[i], bounds[i + 1]) attends only within itself.

    SDPA gets 4-D views [1, H, n, D]: PyTorch's CPU flash kernel takes only 4-D inputs, and 3-D ones fall
    back to the math path, which materialises the [H, n, n] scores (about 4x slower for one 640x480 image
    in Qwen2-VL, and 7 GB of scores for a 1920x1080 one). The numbers agree to fp32 rounding. Segments of one
    length (a batch of same-size images) go through one batched call instead of one call each.
    """
    lengths = {b - a for a, b in itertools.pairwise(bounds)}
    if len(lengths) == 1:  # one segment, or equal ones (a batch of same-size images): one batched call
        n, (h, _, d) = lengths.pop(), q.shape
        q, k, v = (x.unflatten(1, (-1, n)).transpose(0, 1) for x in (q, k, v))  # [S, H, n, D]
        return sdpa(q, k, v).transpose(0, 1).reshape(h, -1, d)
    q, k, v = q[None], k[None], v[None]  # [1, H, N, D]
    out = [
        sdpa(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b])  # [1, H, n, D]
        for a, b in itertools.pairwise(bounds)
    ]
    return torch.cat(out, dim=2)[0]


def _packed(x: torch.Tensor) -> torch.Tensor:
    return x[0].transpose(0, 1)  # [1, H, T, D] -> [T, H, D]


def _paged(q, k, v, layer: int, attn, scale: float, sliding_window: int | None) -> torch.Tensor:
    """Engine path: the new tokens of all sequences are packed along S, with B == 1."""
    from ..engine.paged_attention import paged_attention  # the engine owns the block pool

    out = paged_attention(
        _packed(q), _packed(k), _packed(v), layer, attn, scale=scale, sliding_window=sliding_window
    )  # [T, Hq, D]
    return out.flatten(1)[None]  # [1, T, Hq * D]
