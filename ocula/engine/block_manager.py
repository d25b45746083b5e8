"""Paged KV block pool with reference counts and content-addressed prefix caching.

Notable features:
- chained block hashes: full block i hashes (hash of block i-1, its token ids, the content hashes of the
  media items overlapping it), so a block is reused only when the whole prefix before it matches, and two
  different images never share KV even when their placeholder token ids are identical;
- freed blocks keep their hash and go to an LRU free queue: a later request with the same prefix revives
  them; allocation takes the least recently freed block first and only then forgets its hash;
- n > 1: `fork` shares every block of the parent (ref counts); the first write into a shared, partly
  filled block copies it (copy-on-write), reported to the runner as (src, dst) block pairs.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

from ocula.engine.request import Sequence


class Block:
    __slots__ = ("block_id", "hash", "ref_count")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: bytes | None = None


def chain_hash(parent: bytes | None, token_ids: list[int], media_hashes: list[str]) -> bytes:
    """Hash of one full block given its parent's hash (sha256: collisions would silently share KV)."""
    payload = repr((parent, tuple(token_ids), tuple(media_hashes))).encode()
    return hashlib.sha256(payload).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # LRU order
        self.cached: dict[bytes, int] = {}           # block hash -> block id
        self.pending_copies: list[tuple[int, int]] = []  # copy-on-write (src, dst) for the next step

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- hashing -------------------------------------------------------------------------------

    def update_hashes(self, seq: Sequence) -> None:
        """Extend `seq.block_hashes` to every full block of its tokens."""
        bs = self.block_size
        for i in range(len(seq.block_hashes), seq.num_tokens // bs):
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            media = [m.hash for m in seq.request.media_in(i * bs, (i + 1) * bs)]
            seq.block_hashes.append(chain_hash(parent, seq.token_ids[i * bs:(i + 1) * bs], media))

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids of the longest cached prefix, leaving at least one token to compute (for logits)."""
        if not self.enable_prefix_caching:
            return []
        self.update_hashes(seq)
        hits: list[int] = []
        for i, h in enumerate(seq.block_hashes):
            block_id = self.cached.get(h)
            if block_id is None or (i + 1) * self.block_size >= seq.num_tokens:
                break
            hits.append(block_id)
        return hits

    # ---- allocation ----------------------------------------------------------------------------

    def can_allocate(self, seq: Sequence, num_new_tokens: int, cached: list[int] = ()) -> bool:
        return self._num_new_blocks(seq, num_new_tokens, cached) <= self.num_free_blocks

    def _num_new_blocks(self, seq: Sequence, num_new_tokens: int, cached: list[int]) -> int:
        revived = sum(1 for b in cached if self.blocks[b].ref_count == 0)  # cached but on the free queue
        num_tokens = seq.num_computed_tokens + len(cached) * self.block_size + num_new_tokens
        needed = self.blocks_needed(num_tokens) - len(seq.block_table) - len(cached)
        return max(needed, 0) + revived + int(self._needs_copy(seq))

    def allocate(self, seq: Sequence, num_new_tokens: int, cached: list[int] = ()) -> bool:
        """Give `seq` room for `num_new_tokens` more tokens after its computed ones (False: no room).

        `cached` are prefix-cache hits for a sequence with nothing computed yet; they count as computed.
        """
        if not self.can_allocate(seq, num_new_tokens, cached):
            return False
        for block_id in cached:
            self._take(block_id)
        seq.block_table.extend(cached)
        seq.num_computed_tokens += len(cached) * self.block_size
        if self._needs_copy(seq):
            self._copy_on_write(seq)
        total = self.blocks_needed(seq.num_computed_tokens + num_new_tokens)
        while len(seq.block_table) < total:
            seq.block_table.append(self._take_fresh())
        return True

    def _needs_copy(self, seq: Sequence) -> bool:
        """The next token lands in a partly filled block that another sequence also references."""
        index = seq.num_computed_tokens // self.block_size
        if seq.num_computed_tokens % self.block_size == 0 or index >= len(seq.block_table):
            return False
        return self.blocks[seq.block_table[index]].ref_count > 1

    def _copy_on_write(self, seq: Sequence) -> None:
        index = seq.num_computed_tokens // self.block_size
        src = seq.block_table[index]
        dst = self._take_fresh()
        self.blocks[src].ref_count -= 1
        seq.block_table[index] = dst
        self.pending_copies.append((src, dst))

    def _take_fresh(self) -> int:
        """Take the least recently freed block for new content; its old hash is forgotten."""
        block_id = next(iter(self.free))
        block = self.blocks[block_id]
        if block.hash is not None:
            if self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash = None
        return self._take(block_id)

    def _take(self, block_id: int) -> int:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1
        return block_id

    # ---- after a step, on finish, on fork ------------------------------------------------------

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Register the hashes of blocks that became full and computed this step."""
        if not self.enable_prefix_caching:
            return
        self.update_hashes(seq)
        for i in range(seq.num_computed_tokens // self.block_size):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                block.hash = seq.block_hashes[i]
                self.cached.setdefault(block.hash, block.block_id)

    def free_sequence(self, seq: Sequence) -> None:
        """Drop `seq`'s references. Tail blocks are queued first, so they are evicted before shared heads."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table = []
        seq.num_computed_tokens = 0

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """`child` shares all of `parent`'s blocks (and their KV) from now on."""
        for block_id in parent.block_table:
            self.blocks[block_id].ref_count += 1
        child.block_table = list(parent.block_table)
        child.num_computed_tokens = parent.num_computed_tokens
        child.block_hashes = list(parent.block_hashes)

    def take_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies
