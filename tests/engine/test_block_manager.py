"""Block pool: reference counts, chained hashes with media, LRU reuse, fork and copy-on-write."""

from ocula.engine.block_manager import BlockManager

from .helpers import image, make_seq

TOKENS = list(range(100, 114))  # 14 tokens: 3 full blocks of 4 + 2


def _run(bm, seq, n=None):
    """Allocate and pretend the tokens were computed."""
    n = seq.num_tokens - seq.num_computed_tokens if n is None else n
    assert bm.allocate(seq, n)
    seq.num_computed_tokens += n
    bm.cache_computed_blocks(seq)


def test_allocate_and_free_ref_counts():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(TOKENS)
    _run(bm, seq)
    assert len(seq.block_table) == 4 and bm.num_free_blocks == 4
    assert all(bm.blocks[b].ref_count == 1 for b in seq.block_table)
    bm.free_sequence(seq)
    assert bm.num_free_blocks == 8 and seq.block_table == [] and seq.num_computed_tokens == 0


def test_prefix_hit_shares_blocks_and_leaves_one_token():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = make_seq(TOKENS, seq_id=1)
    _run(bm, a)
    b = make_seq(TOKENS[:12] + [7, 8], seq_id=2)
    hits = bm.find_cached_prefix(b)
    assert hits == a.block_table[:3]
    assert bm.allocate(b, b.num_tokens - 12, hits)
    assert b.num_computed_tokens == 12 and all(bm.blocks[x].ref_count == 2 for x in hits)
    # an exact multiple of the block size: the last block is recomputed so there are logits to sample
    c = make_seq(TOKENS[:12], seq_id=3)
    assert len(bm.find_cached_prefix(c)) == 2


def test_different_media_hash_misses_same_media_hits():
    bm = BlockManager(num_blocks=32, block_size=4)
    a = make_seq(TOKENS, media=[image("cat", 2, 6)], seq_id=1)
    _run(bm, a)
    same = make_seq(TOKENS, media=[image("cat", 2, 6)], seq_id=2)
    other = make_seq(TOKENS, media=[image("dog", 2, 6)], seq_id=3)
    assert len(bm.find_cached_prefix(same)) == 3
    assert bm.find_cached_prefix(other) == []  # block 0 already overlaps the image
    # the chain: a change in block 1 invalidates blocks 1 and 2 but not 0
    later = make_seq(TOKENS, media=[image("dog", 5, 2)], seq_id=4)
    assert bm.find_cached_prefix(later) == []
    changed = make_seq(TOKENS[:4] + [1] + TOKENS[5:], media=[image("cat", 2, 6)], seq_id=5)
    assert bm.find_cached_prefix(changed) == a.block_table[:1]


def test_freed_cached_blocks_are_revived_then_evicted_lru():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_seq(TOKENS[:9], seq_id=1)  # 2 full blocks + 1 partial
    _run(bm, a)
    kept = list(a.block_table)
    bm.free_sequence(a)
    assert bm.num_free_blocks == 4
    b = make_seq(TOKENS[:9], seq_id=2)
    hits = bm.find_cached_prefix(b)
    assert hits == kept[:2]
    assert bm.can_allocate(b, 1, hits)
    # a different prompt needing the whole pool evicts the cached blocks (tail first) and forgets them
    c = make_seq([1] * 16, seq_id=3)
    _run(bm, c)
    assert bm.find_cached_prefix(b) == []
    assert not bm.can_allocate(b, 9)


def test_can_allocate_counts_revived_blocks():
    bm = BlockManager(num_blocks=3, block_size=4)
    a = make_seq(TOKENS[:8], seq_id=1)
    _run(bm, a)
    bm.free_sequence(a)
    b = make_seq(TOKENS[:8] + [5] * 5, seq_id=2)  # hits 2 freed blocks, needs 2 more: 4 > 3
    hits = bm.find_cached_prefix(b)
    assert len(hits) == 2 and not bm.can_allocate(b, 5, hits)


def test_fork_then_copy_on_write_of_shared_partial_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    parent = make_seq(TOKENS[:6], seq_id=1, n=2)
    _run(bm, parent)
    child = make_seq(TOKENS[:6], seq_id=2)
    bm.fork(parent, child)
    assert child.block_table == parent.block_table
    assert [bm.blocks[b].ref_count for b in parent.block_table] == [2, 2]
    for seq in (parent, child):
        seq.token_ids.append(1)
        assert bm.allocate(seq, 1)
    copies = bm.take_copies()
    assert len(copies) == 1  # the first writer copies; the second then owns the original alone
    src, dst = copies[0]
    assert parent.block_table[1] == dst and child.block_table[1] == src
    assert parent.block_table[0] == child.block_table[0]
    assert bm.blocks[parent.block_table[0]].ref_count == 2 and bm.blocks[src].ref_count == 1
    bm.free_sequence(parent)
    bm.free_sequence(child)
    assert bm.num_free_blocks == 8
