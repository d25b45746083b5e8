"""Continuous batching with chunked prefill, prefix caching and preemption by recompute.

Each step has a token budget (`max_num_batched_tokens`). Running sequences are served first, in arrival
order (a decode costs 1 token, an unfinished prefill its next chunk); then waiting sequences are admitted
first-come-first-served while the budget, `max_num_seqs` and free KV blocks allow. A new request therefore
joins the running ones at the next step, and a huge prompt is prefilled a chunk per step while the others
keep decoding.

Notable rules:
- Media placeholders: a chunk that would end inside a media item's placeholder range which starts after
  the chunk's first token is cut just before that item, so the item runs whole in the next chunk. A chunk
  that starts at (or inside) an item may end inside it (the item is larger than the budget left, or a
  prefix-cache hit ended inside it): the runner then gets the matching rows of the item's cached features
  (`MediaSlice`), which every model can take because its decoder attends causally over placeholders.
- Preemption: when a running sequence needs a block and none is free, the most recently admitted running
  sequence is preempted: its blocks are freed and it is re-queued at the front of the waiting queue, to
  be recomputed from its tokens (prompt + generated so far). Nothing new is admitted in that step.
- A finished or aborted sequence frees its blocks at once; their hashes stay cached until reused.
"""

from __future__ import annotations

import time
from collections import deque

from ocula.engine.block_manager import BlockManager
from ocula.engine.config import EngineConfig
from ocula.engine.model_runner import ScheduledBatch, ScheduledSeq, build_batch
from ocula.engine.request import Sequence, SequenceStatus
from ocula.errors import RequestTooLargeError


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        self.config = config
        self.blocks = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prefix_queried_tokens = 0  # prompt tokens looked up in the prefix cache at first admission
        self.prefix_hit_tokens = 0      # ... and found there

    def check_fits(self, num_tokens: int) -> None:
        """Raise if a sequence of `num_tokens` tokens could never hold its KV, even alone."""
        needed = self.blocks.blocks_needed(num_tokens)
        if needed > self.blocks.num_blocks:
            raise RequestTooLargeError(
                f"a request of up to {num_tokens} tokens needs {needed} KV blocks of {self.blocks.block_size}"
                f" tokens but the pool has {self.blocks.num_blocks}; lower max_tokens, shorten the prompt "
                "or give the engine more KV memory (num_kv_blocks / kv_cache_memory_fraction)"
            )

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- scheduling ----------------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch | None:
        budget = self.config.max_num_batched_tokens
        scheduled, budget, preempted = self._schedule_running(budget)
        if not preempted:
            scheduled += self._schedule_waiting(budget)
        if not scheduled:
            return None
        return build_batch(scheduled, self.blocks.block_size, self.blocks.take_copies())

    def _schedule_running(self, budget: int) -> tuple[list[ScheduledSeq], int, bool]:
        scheduled: list[ScheduledSeq] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = self._chunk(seq, seq.num_computed_tokens, budget)
            while n and not self.blocks.allocate(seq, n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    return scheduled, budget, preempted
            if n:
                scheduled.append(self._scheduled(seq, n))
                budget -= n
            i += 1
        return scheduled, budget, preempted

    def _schedule_waiting(self, budget: int) -> list[ScheduledSeq]:
        scheduled: list[ScheduledSeq] = []
        while self.waiting and budget > 0 and self._has_seat(self.waiting[0]):
            seq = self.waiting[0]
            cached = self.blocks.find_cached_prefix(seq)
            n = self._chunk(seq, len(cached) * self.blocks.block_size, budget)
            if n == 0 or not self.blocks.allocate(seq, n, cached):
                break
            self.waiting.popleft()
            self._admit(seq, len(cached) * self.blocks.block_size)
            scheduled.append(self._scheduled(seq, n))
            budget -= n
        return scheduled

    def _has_seat(self, seq: Sequence) -> bool:
        seats = 1 if seq.request.forked else seq.request.params.n  # n > 1 forks after its prefill
        return len(self.running) + seats <= self.config.max_num_seqs

    def _admit(self, seq: Sequence, num_cached: int) -> None:
        if seq.status == SequenceStatus.WAITING:
            seq.num_cached_tokens = num_cached
            self.prefix_queried_tokens += seq.num_tokens
            self.prefix_hit_tokens += num_cached
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        metrics = seq.request.metrics
        if metrics.first_scheduled_time is None:
            metrics.first_scheduled_time = time.monotonic()

    def _scheduled(self, seq: Sequence, n: int) -> ScheduledSeq:
        start = seq.num_computed_tokens
        return ScheduledSeq(seq, n, start, sample=start + n == seq.num_tokens)

    def _chunk(self, seq: Sequence, start: int, budget: int) -> int:
        """Tokens of `seq` to run from index `start` this step (0: none)."""
        n = min(seq.num_tokens - start, budget, max(self.config.prefill_chunk_size, 1))
        end = start + n
        if end < seq.num_tokens:
            for item in seq.request.media_in(end - 1, end):
                if item.offset > start and item.end > end:
                    end = item.offset  # run the whole item in the next chunk
        return end - start

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free_sequence(seq)
        seq.status = SequenceStatus.PREEMPTED
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    # ---- after a step --------------------------------------------------------------------------

    def update_computed(self, batch: ScheduledBatch) -> None:
        """The step's tokens now have KV: advance the sequences and publish their full blocks."""
        for s in batch.seqs:
            s.seq.num_computed_tokens = s.start + s.num_new_tokens
            self.blocks.cache_computed_blocks(s.seq)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        self.blocks.fork(parent, child)
        child.status = SequenceStatus.RUNNING
        self.running.append(child)

    def finish(self, seq: Sequence, status: SequenceStatus) -> None:
        """End `seq` (stop, length or abort) and free its KV blocks now."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free_sequence(seq)
        seq.status = status

