"""Paged attention over a shuffled block pool == dense attention over the whole sequences."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from ocula.engine.paged_attention import PagedAttentionMetadata, PagedKVCache, paged_attention

BS, HQ, HKV, D = 4, 4, 2, 8


def _dense(q, k, v, window=None, softcap=None):
    """Reference: causal (+ window) attention over one full sequence. q [L, Hq, D], k/v [L, Hkv, D]."""
    n = q.shape[0]
    pos = torch.arange(n, device=q.device)
    mask = pos[None, :] <= pos[:, None]
    if window is not None:
        mask &= pos[None, :] > pos[:, None] - window
    k = k.repeat_interleave(HQ // HKV, dim=1)
    v = v.repeat_interleave(HQ // HKV, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * D**-0.5
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))


def _run_phase(cache, tables, seqs, spans, window, softcap):
    """Run tokens [lo, hi) of each sequence in one mixed batch; return each sequence's output rows."""
    q, k, v, slots, qsl = [], [], [], [], [0]
    for (sq, sk, sv), (lo, hi), table in zip(seqs, spans, tables):
        q.append(sq[lo:hi]), k.append(sk[lo:hi]), v.append(sv[lo:hi])
        slots += [table[i // BS] * BS + i % BS for i in range(lo, hi)]
        qsl.append(qsl[-1] + hi - lo)
    width = max(len(t) for t in tables)
    device = cache.k.device
    meta = PagedAttentionMetadata(
        slot_mapping=torch.tensor(slots, device=device),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], device=device),
        context_lens=torch.tensor([hi for _, hi in spans], device=device),
        query_start_loc=torch.tensor(qsl, device=device),
        cache=cache,
    )
    out = paged_attention(torch.cat(q), torch.cat(k), torch.cat(v), 1, meta, scale=D**-0.5,
                          sliding_window=window, softcap=softcap)
    return [out[a:b] for a, b in itertools.pairwise(qsl)]


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("window,softcap", [(None, None), (5, None), (None, 20.0)])
def test_paged_equals_dense_prefill_chunk_and_decode(window, softcap, device):
    g = torch.Generator().manual_seed(1)
    lengths = [11, 6, 17]
    seqs = [(torch.randn(n, HQ, D, generator=g), torch.randn(n, HKV, D, generator=g),
             torch.randn(n, HKV, D, generator=g)) for n in lengths]
    seqs = [tuple(x.to(device) for x in s) for s in seqs]
    cache = PagedKVCache(num_layers=2, num_blocks=16, block_size=BS, num_kv_heads=HKV, head_dim=D,
                         device=device)
    order = torch.randperm(16, generator=g).tolist()  # blocks scattered over the pool
    tables, used = [], 0
    for n in lengths:
        tables.append(order[used:used + -(-n // BS)])
        used += len(tables[-1])
    # phase 1: first prefill chunk; phase 2: the rest but one, on top of cached context; phase 3: decode
    phases = [[(0, 5), (0, 3), (0, 9)], [(5, 10), (3, 5), (9, 16)], [(10, 11), (5, 6), (16, 17)]]
    expected = [_dense(*s, window=window, softcap=softcap) for s in seqs]
    for spans in phases:
        outs = _run_phase(cache, tables, seqs, spans, window, softcap)
        for out, ref, (lo, hi) in zip(outs, expected, spans):
            torch.testing.assert_close(out, ref[lo:hi], rtol=1e-4, atol=1e-4)
    assert cache.k[0].abs().sum() == 0  # only layer 1 was written


def test_copy_blocks_copies_every_layer():
    cache = PagedKVCache(num_layers=2, num_blocks=4, block_size=BS, num_kv_heads=HKV, head_dim=D)
    cache.k.normal_()
    cache.v.normal_()
    cache.copy_blocks([(1, 3)])
    torch.testing.assert_close(cache.k[:, 3], cache.k[:, 1])
    torch.testing.assert_close(cache.v[:, 3], cache.v[:, 1])
    assert not torch.equal(cache.k[:, 2], cache.k[:, 1])


def test_sdpa_reference_matches_torch_dense():
    """Guard the test's own reference against torch's causal SDPA."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(9, HQ, D, generator=g)
    k, v = torch.randn(9, HKV, D, generator=g), torch.randn(9, HKV, D, generator=g)
    heads_first = [x.repeat_interleave(HQ // x.shape[1], 1).transpose(0, 1) for x in (q, k, v)]  # [H, L, D]
    want = F.scaled_dot_product_attention(*heads_first, is_causal=True).transpose(0, 1)
    torch.testing.assert_close(_dense(q, k, v), want, rtol=1e-5, atol=1e-5)
