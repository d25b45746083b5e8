"""Paged attention in plain torch: a KV block pool, slot mapping and per-sequence block tables.

The model's attention layers dispatch here when they receive a `PagedAttentionMetadata` (the engine path)
instead of a `DenseAttentionMetadata` (the library path); both give the same numbers.

Notable features:
- one call covers a mixed batch: prefill chunks on top of cached context and one-token decodes;
- all one-token decodes of a step run as ONE batched SDPA call per layer (keys gathered through the block
  tables into [B, L], a key-length mask), and each prefill chunk as one call on its own: the Python work
  per layer does not grow with the number of decoding sequences;
- the gather indices and masks are planned once per step (cached on the metadata), not once per layer;
- a step replayed from a CUDA graph (`ocula/engine/cuda_graphs.py`) hands in its one decode group ready
  made, with the context lengths as a device tensor: its masks are computed on the device each replay;
- GQA (query heads grouped over KV heads), causal masking by absolute position, optional sliding window
  (a query at position q sees keys k with q - window < k <= q, as transformers' sliding masks);
- optional logit soft-capping (tanh), scale given by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ocula.layers.attention import sdpa


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
class _Group:
    """Sequences attended in one SDPA call: all one-token decodes together, or one prefill chunk."""

    rows: torch.Tensor          # [G * Q] long: rows of the flattened batch, sequence-major
    num_seqs: int               # G
    num_q: int                  # Q new tokens per sequence (1 for the decode group)
    key_slots: torch.Tensor     # [G, L] long: pool slot of each key (padding points at slot 0, masked)
    context_lens: list[int] | None  # [G] keys per sequence; None when only `lens` (on the device) has them
    masks: dict[int | None, torch.Tensor | None] = field(default_factory=dict)  # window -> [G, 1, Q, L]
    lens: torch.Tensor | None = None  # [G] long on the device: set for captured steps, whose masks are
                                      # computed from tensors (no Python-side shortcut, no host sync)


@dataclass
class PagedAttentionMetadata:
    slot_mapping: torch.Tensor      # [T] long: block_id * block_size + offset where each new token's KV goes
    block_tables: torch.Tensor      # [B, max_blocks] long, padded with 0 past each sequence's blocks
    context_lens: torch.Tensor      # [B] long: tokens with KV after this step (cached + new)
    query_start_loc: torch.Tensor   # [B + 1] long: sequence b's new tokens are rows [qsl[b], qsl[b + 1])
    cache: PagedKVCache | None = None  # set by the model runner that owns the pool
    _groups: list[_Group] | None = field(default=None, repr=False)  # planned once per step

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]

    def groups(self, block_size: int) -> list[_Group]:
        if self._groups is None:
            self._groups = _plan(self, block_size)
        return self._groups


def _plan(meta: PagedAttentionMetadata, block_size: int) -> list[_Group]:
    qsl, ctxs = meta.query_start_loc.tolist(), meta.context_lens.tolist()
    device = meta.slot_mapping.device
    decodes = [b for b in range(len(ctxs)) if qsl[b + 1] - qsl[b] == 1]
    prefills = [b for b in range(len(ctxs)) if qsl[b + 1] - qsl[b] > 1]
    groups = [_group(meta, [b], qsl[b + 1] - qsl[b], block_size, device) for b in prefills]
    if decodes:
        groups.append(_group(meta, decodes, 1, block_size, device))
    return groups


def _group(meta: PagedAttentionMetadata, seqs: list[int], num_q: int, block_size: int, device) -> _Group:
    qsl = meta.query_start_loc.tolist()
    ctxs = [int(meta.context_lens[b]) for b in seqs]
    keys = torch.arange(max(ctxs), device=device)  # [L]
    tables = meta.block_tables[seqs].to(device)  # [G, max_blocks]
    slots = tables[:, keys // block_size] * block_size + keys % block_size  # [G, L]
    rows = torch.cat([torch.arange(qsl[b], qsl[b] + num_q) for b in seqs]).to(device)
    return _Group(rows, len(seqs), num_q, slots, ctxs)


def _group_mask(group: _Group, window: int | None) -> torch.Tensor | None:
    """[G, 1, Q, L] bool, True = attend; None when plain causal attention over equal lengths is exact."""
    if window not in group.masks:
        group.masks[window] = _build_mask(group, window)
    return group.masks[window]


def _build_mask(group: _Group, window: int | None) -> torch.Tensor | None:
    device = group.key_slots.device
    longest = group.key_slots.shape[1]
    if group.lens is None:
        same_len = all(c == longest for c in group.context_lens)
        if same_len and window is None and (group.num_q == 1 or group.num_q == longest):
            return None  # decode over full contexts, or a whole prompt (is_causal)
        ctx = torch.tensor(group.context_lens, device=device)[:, None, None]  # [G, 1, 1]
    else:
        ctx = group.lens[:, None, None]
    q_pos = ctx - group.num_q + torch.arange(group.num_q, device=device)[None, :, None]  # [G, Q, 1]
    k_pos = torch.arange(longest, device=device)[None, None, :]  # [1, 1, L]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask[:, None]  # [G, 1, Q, L]


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
    pool_k = cache.k[layer].flatten(0, 1)  # [num_blocks * bs, Hkv, D]
    pool_v = cache.v[layer].flatten(0, 1)
    groups = meta.groups(cache.block_size)
    if len(groups) == 1 and groups[0].rows.shape[0] == q.shape[0]:
        return _attend_group(q, pool_k, pool_v, groups[0], scale, sliding_window, softcap)  # rows in order
    out = torch.empty_like(q)
    for group in groups:
        out[group.rows] = _attend_group(q[group.rows], pool_k, pool_v, group, scale, sliding_window, softcap)
    return out


def _attend_group(q, pool_k, pool_v, group: _Group, scale: float, window: int | None, softcap: float | None):
    """q [G * Q, Hq, D] -> [G * Q, Hq, D] over the group's gathered keys."""
    g, nq = group.num_seqs, group.num_q
    qh = q.view(g, nq, *q.shape[1:]).transpose(1, 2)  # [G, Hq, Q, D]
    keys = pool_k[group.key_slots].transpose(1, 2).to(q.dtype)  # [G, L, Hkv, D] -> [G, Hkv, L, D]
    values = pool_v[group.key_slots].transpose(1, 2).to(q.dtype)
    mask = _group_mask(group, window)
    if softcap is None:
        causal = mask is None and nq > 1
        out = sdpa(qh, keys, values, attn_mask=mask, is_causal=causal, scale=scale,
                   enable_gqa=qh.shape[1] != keys.shape[1])  # [G, Hq, Q, D]
    else:
        out = _softcapped(qh, keys, values, mask, scale, softcap)
    return out.transpose(1, 2).reshape(q.shape)


def _softcapped(q, keys, values, mask, scale: float, softcap: float) -> torch.Tensor:
    groups = q.shape[1] // keys.shape[1]
    keys = keys.repeat_interleave(groups, dim=1)  # [G, Hq, L, D]
    values = values.repeat_interleave(groups, dim=1)
    scores = (q @ keys.transpose(-1, -2)) * scale  # [G, Hq, Q, L]
    scores = softcap * torch.tanh(scores / softcap)
    if mask is None:
        nq, length = scores.shape[-2:]
        mask = torch.ones(nq, length, dtype=torch.bool, device=q.device).tril(length - nq)
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1, dtype=torch.float32).to(q.dtype) @ values
