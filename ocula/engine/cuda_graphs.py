"""Decode steps replayed from CUDA graphs.

A decode step runs a few hundred small kernels (28 layers x norms, projections, rotary, attention) for a
handful of tokens; on a GPU the time goes to launching them from Python, not to the arithmetic. A pure
decode step (every scheduled sequence adds one token, no media rows) has a shape fixed by two numbers, the
batch size and the longest context, so padding both to a few buckets gives a few shapes, each captured once
into a CUDA graph and replayed with new contents in its static input buffers.

Notable features:
- batch buckets 1, 2, 4, 8, then multiples of 8 up to `max_num_seqs`; key-length buckets powers of two
  from 256 tokens up to `max_model_len` (rounded up to whole blocks); a graph per pair, captured lazily the
  first time its shape occurs, all sharing one memory pool (they never run at the same time);
- the graph's inputs are five small tensors (token ids, positions, KV slots, block tables, context
  lengths); the key slots and the attention masks are computed inside the graph from them, so a replay
  costs one host-to-device copy per buffer;
- padding rows write their K/V into a scratch block the block manager never hands out (the runner's pool
  has one block more than it reports) and attend to that one slot: they touch no real sequence and give no
  NaNs;
- everything else (prefill chunks, media rows, mixed steps, batches past the largest bucket) runs eagerly;
- `capture=False` calls the same static-shape step eagerly: the buffer logic runs and is tested on a CPU,
  where it gives the same tokens as the plain paged path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ocula.engine.paged_attention import PagedAttentionMetadata, PagedKVCache, _Group

MIN_KEYS = 256  # smallest key-length bucket


def batch_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, 32, ... up to max_num_seqs (the last bucket is max_num_seqs itself)."""
    sizes = [b for b in (1, 2, 4) if b < max_num_seqs] + list(range(8, max_num_seqs, 8))
    return sizes + [max_num_seqs]


def key_buckets(max_model_len: int, block_size: int, min_keys: int = MIN_KEYS) -> list[int]:
    """Powers of two from `min_keys`, each a whole number of blocks, up to max_model_len in whole blocks."""
    top = -(-max_model_len // block_size) * block_size
    sizes, size = [], min_keys
    while size < top:
        sizes.append(-(-size // block_size) * block_size)
        size *= 2
    return sorted(set(sizes + [top]))


@dataclass
class _Static:
    """One captured shape: its input buffers, its output, and the graph (None when run eagerly)."""

    ids: torch.Tensor            # [B] long
    positions: torch.Tensor      # [B] or [3, B] long
    slots: torch.Tensor          # [B] long: where each new token's K/V goes
    tables: torch.Tensor         # [B, L / block_size] long
    lens: torch.Tensor           # [B] long: keys per row after this step
    logits: torch.Tensor | None = None   # [B, V] float, written by the step
    graph: Any = None


class DecodeGraphs:
    """Runs pure decode batches of a `TorchModelRunner` through captured (or eagerly replayed) steps."""

    def __init__(self, model: Any, cache: PagedKVCache, scratch_block: int, max_num_seqs: int,
                 max_model_len: int, capture: bool = True, min_keys: int = MIN_KEYS):
        self.model, self.cache = model, cache
        self.block_size = cache.block_size
        self.scratch_slot = scratch_block * self.block_size
        self.scratch_block = scratch_block
        self.batch_sizes = batch_buckets(max_num_seqs)
        self.key_lengths = key_buckets(max_model_len, self.block_size, min_keys)
        self.capture = capture
        self.device = cache.k.device
        self.shapes: dict[tuple[int, int, int], _Static] = {}
        self.pool = None  # the graphs' shared memory pool, from the first capture

    def accepts(self, batch: Any) -> bool:
        """A pure decode step that fits the largest shape."""
        if batch.media or not batch.seqs or len(batch.seqs) > self.batch_sizes[-1]:
            return False
        if any(s.num_new_tokens != 1 for s in batch.seqs):
            return False
        return int(batch.attn.context_lens.max()) <= self.key_lengths[-1]

    @torch.inference_mode()
    def run(self, batch: Any) -> torch.Tensor:
        """float logits [len(batch.sample_indices), V] for the batch, as `TorchModelRunner.execute` returns."""
        n = len(batch.seqs)
        size = next(b for b in self.batch_sizes if b >= n)
        keys = next(k for k in self.key_lengths if k >= int(batch.attn.context_lens.max()))
        static = self._shape(size, keys, batch.positions.dim())
        self._fill(static, batch, n)
        if static.graph is not None:
            static.graph.replay()
        else:
            static.logits = self._step(static)
        return static.logits[batch.sample_indices.to(self.device)].clone()

    # ---- buffers ---------------------------------------------------------------------------------

    def _fill(self, static: _Static, batch: Any, n: int) -> None:
        """Copy the batch into the static buffers; rows past n become padding (scratch slot, one key)."""
        size, width = static.tables.shape
        ids = torch.zeros(size, dtype=torch.long)
        ids[:n] = batch.input_ids
        positions = torch.zeros(static.positions.shape, dtype=torch.long)
        positions[..., :n] = batch.positions
        slots = torch.full((size,), self.scratch_slot, dtype=torch.long)
        slots[:n] = batch.attn.slot_mapping
        tables = torch.full((size, width), self.scratch_block, dtype=torch.long)
        used = batch.attn.block_tables[:, :width]
        tables[:n, : used.shape[1]] = used
        lens = torch.ones(size, dtype=torch.long)
        lens[:n] = batch.attn.context_lens
        for buffer, values in ((static.ids, ids), (static.positions, positions), (static.slots, slots),
                               (static.tables, tables), (static.lens, lens)):
            buffer.copy_(values, non_blocking=True)

    def _shape(self, size: int, keys: int, position_dims: int) -> _Static:
        key = (size, keys, position_dims)
        if key not in self.shapes:
            self.shapes[key] = self._new_shape(size, keys, position_dims)
        return self.shapes[key]

    def _new_shape(self, size: int, keys: int, position_dims: int) -> _Static:
        dev = self.device
        pos_shape = (size,) if position_dims == 1 else (3, size)
        static = _Static(
            ids=torch.zeros(size, dtype=torch.long, device=dev),
            positions=torch.zeros(pos_shape, dtype=torch.long, device=dev),
            slots=torch.full((size,), self.scratch_slot, dtype=torch.long, device=dev),
            tables=torch.full((size, keys // self.block_size), self.scratch_block, dtype=torch.long, device=dev),
            lens=torch.ones(size, dtype=torch.long, device=dev),
        )
        if self.capture:
            self._capture(static)
        return static

    def _capture(self, static: _Static) -> None:
        """Warm up on a side stream (kernel selection, lazily built tables), then record one step."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step(static)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static.logits = self._step(static)
        self.pool = graph.pool()
        static.graph = graph

    # ---- the step --------------------------------------------------------------------------------

    def _step(self, static: _Static) -> torch.Tensor:
        """One decode step over the static buffers: logits [B, V] float. Only device tensor operations."""
        size, width = static.tables.shape
        bs = self.block_size
        keys = torch.arange(width * bs, device=self.device)  # [L]
        key_slots = static.tables[:, keys // bs] * bs + keys % bs  # [B, L]
        rows = torch.arange(size + 1, device=self.device)
        group = _Group(rows=rows[:size], num_seqs=size, num_q=1, key_slots=key_slots, context_lens=None,
                       lens=static.lens)
        attn = PagedAttentionMetadata(slot_mapping=static.slots, block_tables=static.tables,
                                      context_lens=static.lens, query_start_loc=rows,
                                      cache=self.cache, _groups=[group])
        embeds = self.model.embed_inputs(static.ids[None], None)  # [1, B, hidden]
        positions = static.positions[None] if static.positions.dim() == 1 else static.positions[:, None]
        hidden = self.model.forward_text(embeds, positions, attn)  # [1, B, hidden]
        return self.model.compute_logits(hidden[0]).float()  # [B, V]
