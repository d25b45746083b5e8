"""Reference paged attention in plain torch: a KV block pool, slot mapping and per-sequence block tables.

The model's attention layers dispatch here when they receive a `PagedAttentionMetadata` (the engine path)
instead of a `DenseAttentionMetadata` (the library path); both must give the same numbers.

Notable features:
- one call covers a mixed batch: prefill chunks on top of cached context and one-token decodes;
- GQA (query heads grouped over KV heads), causal masking by absolute position, optional sliding window
  (a query at position q sees keys k with q - window < k <= q, as transformers' sliding masks);
- optional logit soft-capping (tanh), scale given by the caller.
A loop over sequences keeps it obviously correct; fused kernels can replace it behind the same metadata.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


class PagedKVCache:
    """K and V pools: [num_layers, num_blocks, block_size, num_kv_heads, head_dim], preallocated."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size

    @property
    def num_blocks(self) -> int:
        return self.k.shape[1]

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write for forked sequences: block dst gets block src's K and V in every layer."""
        if not pairs:
            return
        src = torch.tensor([p[0] for p in pairs], device=self.k.device)
        dst = torch.tensor([p[1] for p in pairs], device=self.k.device)
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]


@dataclass
class PagedAttentionMetadata:
    slot_mapping: torch.Tensor      # [T] long: block_id * block_size + offset where each new token's KV goes
    block_tables: torch.Tensor      # [B, max_blocks] long, padded with 0 past each sequence's blocks
    context_lens: torch.Tensor      # [B] long: tokens with KV after this step (cached + new)
    query_start_loc: torch.Tensor   # [B + 1] long: sequence b's new tokens are rows [qsl[b], qsl[b + 1])
    cache: PagedKVCache | None = None  # set by the model runner that owns the pool

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]


def write_kv(cache: PagedKVCache, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Scatter the new tokens' K/V ([T, Hkv, D]) into their slots of layer `layer`."""
    num_blocks, bs = cache.k.shape[1], cache.k.shape[2]
    cache.k[layer].view(num_blocks * bs, *k.shape[1:])[slots] = k.to(cache.k.dtype)
    cache.v[layer].view(num_blocks * bs, *v.shape[1:])[slots] = v.to(cache.v.dtype)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer: int,
    meta: PagedAttentionMetadata,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Write k/v ([T, Hkv, D]) to the pool, then attend q ([T, Hq, D]) over each sequence's context.

    Returns [T, Hq, D].
    """
    cache = meta.cache
    write_kv(cache, layer, k, v, meta.slot_mapping)
    out = torch.empty_like(q)
    qsl = meta.query_start_loc.tolist()
    for b, ctx in enumerate(meta.context_lens.tolist()):
        lo, hi = qsl[b], qsl[b + 1]
        if hi == lo:
            continue
        keys, values = _gather(cache, layer, meta.block_tables[b], ctx)  # [ctx, Hkv, D]
        mask = _mask(hi - lo, ctx, sliding_window, q.device)
        out[lo:hi] = _attend(q[lo:hi], keys, values, mask, scale, softcap)
    return out


def _gather(cache: PagedKVCache, layer: int, table: torch.Tensor, ctx: int) -> tuple[torch.Tensor, ...]:
    n_blocks = -(-ctx // cache.block_size)
    blocks = table[:n_blocks]
    keys = cache.k[layer, blocks].flatten(0, 1)[:ctx]  # [n_blocks, bs, Hkv, D] -> [ctx, Hkv, D]
    values = cache.v[layer, blocks].flatten(0, 1)[:ctx]
    return keys, values


def _mask(num_q: int, ctx: int, window: int | None, device) -> torch.Tensor:
    """[num_q, ctx] bool, True = attend. The new tokens are the last num_q of the context."""
    q_pos = torch.arange(ctx - num_q, ctx, device=device)[:, None]
    k_pos = torch.arange(ctx, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


def _attend(q, keys, values, mask, scale: float, softcap: float | None) -> torch.Tensor:
    groups = q.shape[1] // keys.shape[1]
    q = q.transpose(0, 1)                                          # [Hq, n, D]
    keys = keys.transpose(0, 1).repeat_interleave(groups, dim=0)   # [Hkv, ctx, D] -> [Hq, ctx, D]
    values = values.transpose(0, 1).repeat_interleave(groups, dim=0)
    if softcap is None:
        out = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask,
                                             scale=scale)
        return out.transpose(0, 1)
    scores = (q @ keys.to(q.dtype).transpose(1, 2)) * scale        # [Hq, n, ctx]
    scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask, float("-inf"))
    out = scores.softmax(-1, dtype=torch.float32).to(q.dtype) @ values.to(q.dtype)
    return out.transpose(0, 1)
