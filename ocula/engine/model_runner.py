"""The engine's view of a model: `ScheduledBatch` in, logits for the sampled positions out.

The engine knows no model family. A runner wraps a model through the model contract
(docs/architecture.md): `get_media_features` for `encode_media`, then `embed_inputs`, `forward_text` with
the batch's `PagedAttentionMetadata`, and `compute_logits` on the rows in `sample_indices`.

Notable features of the batch layout:
- all new tokens of all sequences flattened into one row of T tokens (no padding);
- positions per token: 1-D [T], or M-RoPE [3, T] taken from the positions each request computed once at
  admission (prompt tokens) or `index + position_delta` (generated tokens);
- media slices say which rows of which item's features fill which placeholder tokens of this step, so a
  placeholder range split across chunks still gets the right feature rows.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from ocula.engine.config import EngineConfig
from ocula.engine.paged_attention import PagedAttentionMetadata
from ocula.engine.request import MediaItem, Request, Sequence


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int     # tokens run this step, starting at seq.num_computed_tokens
    start: int              # seq.num_computed_tokens when scheduled
    sample: bool            # the chunk reaches the end of the sequence: its last logits are sampled


@dataclass
class MediaSlice:
    item: MediaItem
    row_start: int          # first feature row of the item used this step
    row_end: int            # one past the last row
    token_index: int        # index in the flattened batch of the first placeholder token it fills


@dataclass
class ScheduledBatch:
    seqs: list[ScheduledSeq]
    input_ids: torch.Tensor          # [T] long
    positions: torch.Tensor          # [T] long, or [3, T] for M-RoPE
    attn: PagedAttentionMetadata
    sample_indices: torch.Tensor     # [S] long: rows of T whose logits are returned, in `sampled` order
    media: list[MediaSlice]
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write before the forward
    media_features: dict[str, torch.Tensor] = field(default_factory=dict)  # item hash -> [length, hidden]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def sampled(self) -> list[ScheduledSeq]:
        return [s for s in self.seqs if s.sample]


class ModelRunner(ABC):
    """What the engine needs from a model. Implementations own the KV pool and the device."""

    @abstractmethod
    def init_kv_cache(self, config: EngineConfig) -> int:
        """Allocate the KV pool (`config.num_kv_blocks` or sized from memory) and return its block count."""

    @abstractmethod
    def encode_media(self, items: list[MediaItem]) -> list[torch.Tensor]:
        """Vision features per item, [item.length, hidden] each (batched across items where possible)."""

    @abstractmethod
    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        """Run one step; return float logits [len(batch.sample_indices), vocab]."""

    def init_positions(self, request: Request) -> tuple[torch.Tensor | None, int]:
        """Positions computed once at admission: ([3, P] M-RoPE positions or None for 1-D, delta)."""
        return None, 0


def build_batch(
    scheduled: list[ScheduledSeq], block_size: int, copies: list[tuple[int, int]]
) -> ScheduledBatch:
    """Flatten the scheduled chunks into the tensors a runner consumes."""
    ids, positions, slots, media = [], [], [], []
    qsl, sample_indices = [0], []
    use_mrope = any(s.seq.request.mrope_positions is not None for s in scheduled)
    for s in scheduled:
        lo, hi = s.start, s.start + s.num_new_tokens
        media += _media_slices(s.seq.request, lo, hi, qsl[-1])
        ids += s.seq.token_ids[lo:hi]
        positions.append(_positions(s.seq.request, lo, hi, use_mrope))
        slots += [s.seq.block_table[i // block_size] * block_size + i % block_size for i in range(lo, hi)]
        qsl.append(qsl[-1] + s.num_new_tokens)
        if s.sample:
            sample_indices.append(qsl[-1] - 1)
    attn = PagedAttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.long),
        block_tables=_pad_tables([s.seq.block_table for s in scheduled]),
        context_lens=torch.tensor([s.start + s.num_new_tokens for s in scheduled], dtype=torch.long),
        query_start_loc=torch.tensor(qsl, dtype=torch.long),
    )
    return ScheduledBatch(
        seqs=scheduled, input_ids=torch.tensor(ids, dtype=torch.long), positions=torch.cat(positions, -1),
        attn=attn, sample_indices=torch.tensor(sample_indices, dtype=torch.long), media=media,
        block_copies=copies,
    )


def _positions(request: Request, lo: int, hi: int, use_mrope: bool) -> torch.Tensor:
    """Positions of tokens [lo, hi): [hi - lo] or [3, hi - lo]."""
    idx = torch.arange(lo, hi, dtype=torch.long)
    if not use_mrope:
        return idx
    pos = (idx + request.position_delta).expand(3, -1).clone()
    pre = request.mrope_positions
    if pre is not None:
        n = max(0, min(hi, pre.shape[1]) - lo)  # prompt tokens take their precomputed positions
        pos[:, :n] = pre[:, lo:lo + n]
    return pos


def _media_slices(request: Request, lo: int, hi: int, base: int) -> list[MediaSlice]:
    out = []
    for item in request.media_in(lo, hi):
        start, end = max(lo, item.offset), min(hi, item.end)
        out.append(MediaSlice(item, start - item.offset, end - item.offset, base + start - lo))
    return out


def _pad_tables(tables: list[list[int]]) -> torch.Tensor:
    width = max((len(t) for t in tables), default=0)
    padded = [t + [0] * (width - len(t)) for t in tables]
    return torch.tensor(padded, dtype=torch.long).view(len(tables), width)


def gather_media_features(
    batch: ScheduledBatch, placeholder_ids: set[int] | None = None
) -> dict[int, torch.Tensor]:
    """Feature rows for this step's placeholder tokens, grouped by placeholder token id, in token order.

    This is the `media_features` argument of the model contract's `embed_inputs`: for each placeholder id,
    the rows that replace its occurrences in `batch.input_ids`, in the order they occur.
    """
    groups: dict[int, list[torch.Tensor]] = {}
    for sl in sorted(batch.media, key=lambda m: m.token_index):
        token_id = int(batch.input_ids[sl.token_index])
        if placeholder_ids is not None and token_id not in placeholder_ids:
            continue
        groups.setdefault(token_id, []).append(batch.media_features[sl.item.hash][sl.row_start:sl.row_end])
    return {tid: torch.cat(rows) for tid, rows in groups.items()}


def media_rows(batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(indices [N] into the flattened tokens, feature rows [N, hidden]) of this step's media tokens.

    The family-free alternative to `gather_media_features`: scatter the rows into the input embeddings at
    those indices (`embeds[indices] = rows`). None when the step has no media tokens.
    """
    if not batch.media:
        return None
    indices, rows = [], []
    for sl in batch.media:
        indices.append(torch.arange(sl.token_index, sl.token_index + sl.row_end - sl.row_start))
        rows.append(batch.media_features[sl.item.hash][sl.row_start:sl.row_end])
    return torch.cat(indices), torch.cat(rows)
