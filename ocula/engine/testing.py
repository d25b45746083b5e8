"""Deterministic fakes for engine tests (and server tests): a byte-level tokenizer and a model runner.

`FakeModelRunner` keeps a real paged pool of per-token values: each step writes one value per new token
(a mix of its id, its position and, for placeholder tokens, its media feature row) at the token's slot,
then reads each sampled sequence's whole context back through its block table. The next token is a
function of that context, so a wrong block table, slot, copy-on-write, prefix-cache hit or media slice
changes the output, and `reference_next` gives the answer without any paging to compare against.
"""

from __future__ import annotations

import hashlib

import torch

from ocula.engine.config import EngineConfig
from ocula.engine.model_runner import ModelRunner, ScheduledBatch
from ocula.engine.request import MediaItem

_M = 1_000_003


class ByteTokenizer:
    """Ids 0-255 are bytes; 256 is BOS "<s>", 257 is EOS "</s>"."""

    bos_token_id = 256
    eos_token_id = 257
    vocab_size = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        out, pending = [], bytearray()
        for i in ids:
            if i < 256:
                pending.append(i)
                continue
            out.append(pending.decode("utf-8", errors="replace"))
            pending = bytearray()
            if not skip_special_tokens:
                out.append("<s>" if i == self.bos_token_id else "</s>")
        out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)


def media_value(media_hash: str, row: int) -> int:
    return (int(hashlib.sha256(media_hash.encode()).hexdigest()[:8], 16) + 131 * row) % _M


def token_value(token_id: int, position: int, feature: int) -> int:
    return ((token_id + 1) * 7919 + (position + 1) * 104729 + feature * 31337) % _M


def next_from_context(acc: int, eos_every: int) -> int:
    mixed = (acc * 2654435761) % _M
    if eos_every and mixed % eos_every == 0:
        return ByteTokenizer.eos_token_id
    return 32 + mixed % 95  # printable ASCII


class FakeModelRunner(ModelRunner):
    def __init__(self, num_kv_blocks: int = 64, eos_every: int = 0, vocab_size: int = 258) -> None:
        self.default_blocks = num_kv_blocks
        self.eos_every = eos_every             # 0: never emit EOS; k: about one context in k ends
        self.vocab_size = vocab_size
        self.encoded: list[str] = []           # media hashes passed to encode_media, in order
        self.steps: list[ScheduledBatch] = []  # every executed batch (tests inspect chunking)

    def init_kv_cache(self, config: EngineConfig) -> int:
        num_blocks = config.num_kv_blocks or self.default_blocks
        self.block_size = config.block_size
        self.pool = torch.full((num_blocks * config.block_size,), -1, dtype=torch.long)
        return num_blocks

    def encode_media(self, items: list[MediaItem]) -> list[torch.Tensor]:
        self.encoded += [item.hash for item in items]
        return [torch.tensor([[media_value(m.hash, r)] for r in range(m.length)]) for m in items]

    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        self.steps.append(batch)
        self._copy_blocks(batch.block_copies)
        positions = batch.positions if batch.positions.dim() == 1 else batch.positions[0]
        feats = torch.zeros(batch.num_tokens, dtype=torch.long)
        for sl in batch.media:
            rows = batch.media_features[sl.item.hash][sl.row_start:sl.row_end, 0]
            feats[sl.token_index:sl.token_index + rows.shape[0]] = rows
        values = [token_value(int(t), int(p), int(f)) for t, p, f in zip(batch.input_ids, positions, feats)]
        self.pool[batch.attn.slot_mapping] = torch.tensor(values, dtype=torch.long)
        rows = [self._logits(self._context_sum(batch, b)) for b, s in enumerate(batch.seqs) if s.sample]
        return torch.stack(rows) if rows else torch.empty(0, self.vocab_size)

    def _copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        bs = self.block_size
        for src, dst in pairs:
            self.pool[dst * bs:(dst + 1) * bs] = self.pool[src * bs:(src + 1) * bs]

    def _context_sum(self, batch: ScheduledBatch, b: int) -> int:
        ctx = int(batch.attn.context_lens[b])
        table = batch.attn.block_tables[b]
        idx = torch.arange(ctx)
        slots = table[idx // self.block_size] * self.block_size + idx % self.block_size
        values = self.pool[slots]
        if bool((values < 0).any()):
            raise RuntimeError("the fake model read a KV slot that was never written")
        return int(values.sum())

    def _logits(self, acc: int) -> torch.Tensor:
        return self._logits_for_target(next_from_context(acc, self.eos_every))

    def _logits_for_target(self, target: int) -> torch.Tensor:
        """A peaked distribution around the target token, so sampling settings matter but greedy is exact."""
        ids = torch.arange(self.vocab_size, dtype=torch.float32)
        return 10.0 - 0.5 * (ids - target).abs()

    def reference_next(self, token_ids: list[int], media: list[MediaItem] = ()) -> int:
        """The greedy next token computed densely, without paging, batching or caches."""
        feats = [0] * len(token_ids)
        for m in media:
            for r in range(m.length):
                feats[m.offset + r] = media_value(m.hash, r)
        acc = sum(token_value(t, i, f) for i, (t, f) in enumerate(zip(token_ids, feats)))
        return next_from_context(acc, self.eos_every)

    def reference_generate(self, prompt: list[int], n: int, media: list[MediaItem] = (),
                           eos: int | None = None) -> list[int]:
        out = list(prompt)
        for _ in range(n):
            out.append(self.reference_next(out, media))
            if out[-1] == eos:
                break
        return out[len(prompt):]
