"""Decode steps through `DecodeGraphs` (ocula/engine/cuda_graphs.py) give the plain paged path's tokens.

On a CPU the static-shape step runs eagerly (`capture=False`): the padding of batch and key length to
buckets, the scratch block and the masks computed from device tensors are what is checked, on all four
families (Idefics2 with its sliding window). With a CUDA device the same checks run on captured graphs.
"""

from __future__ import annotations

import pytest
import torch

from ocula import LLM, SamplingParams
from ocula.engine.cuda_graphs import DecodeGraphs, batch_buckets, key_buckets
from tests.checkpoints import make_image

FAMILIES = ["qwen2_vl", "llava_onevision", "idefics2", "ovis2"]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 24, 32]
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert key_buckets(4096, 16) == [256, 512, 1024, 2048, 4096]
    assert key_buckets(1000, 16) == [256, 512, 1008]
    assert key_buckets(100, 16) == [112]
    assert key_buckets(64, 6, min_keys=16) == [18, 36, 66]  # whole blocks of 6


def _conversations():
    def user(image, text):
        content = [{"type": "text", "text": text}] if image is None else \
            [{"type": "image", "image": image}, {"type": "text", "text": text}]
        return [{"role": "user", "content": content}]
    return [
        user(make_image(64, 48, seed=1), "What is in this picture?"),
        user(None, "Tell me a story about a cat and a dog in the garden, " * 3),
        user(make_image(40, 80, seed=2), "Describe."),
    ]


def _llm(folder, device="cpu", **options):
    settings = {"device": device, "max_num_seqs": 4, "max_model_len": 512, "kv_cache_tokens": 4096,
                "block_size": 4, **options}
    return LLM(folder, **settings)


def _run(llm, params):
    outs = llm.chat(_conversations(), params, use_tqdm=False)
    return [o.outputs[0] for o in outs]


class _Counter:
    def __init__(self, graphs: DecodeGraphs):
        self.calls, self.shapes = 0, set()
        original = graphs.run

        def run(batch):
            self.calls += 1
            self.shapes.add(len(batch.seqs))
            return original(batch)
        graphs.run = run


@pytest.mark.parametrize("family", FAMILIES)
def test_static_decode_steps_equal_the_paged_path(family, request):
    folder = request.getfixturevalue(f"{family}_ckpt")
    # different answer lengths, so the batch shrinks from 3 rows (bucket 4: a padding row) to 1
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=1) for n in (12, 5, 8)]
    eager = _run(_llm(folder), params)
    llm = _llm(folder)
    runner = llm.engine.runner
    assert runner.graphs is None  # no CUDA device: eager unless asked
    runner.enable_decode_graphs(llm.engine.config, capture=False)
    runner.graphs.key_lengths = list(range(8, 513, 8))  # fine buckets: 12 decode steps cross some
    counter = _Counter(runner.graphs)
    static = _run(llm, params)
    assert [c.token_ids for c in static] == [c.token_ids for c in eager]
    for ours, ref in zip(static, eager):
        for a, b in zip(ours.logprobs, ref.logprobs):
            assert a.keys() == b.keys()
            assert all(a[t] == pytest.approx(b[t], abs=1e-4) for t in a)
    assert counter.calls >= 10 and counter.shapes >= {1, 3}
    keys = {key[1] for key in runner.graphs.shapes}
    assert len(keys) >= 2, "contexts should cross a key-length bucket"
    if family == "idefics2":
        window = llm.model.config.text_config.sliding_window
        assert max(keys) > window, "the sliding window must cut into the keys"


def test_padding_rows_touch_only_the_scratch_block(qwen2_vl_ckpt):
    llm = _llm(qwen2_vl_ckpt)
    runner = llm.engine.runner
    runner.enable_decode_graphs(llm.engine.config, capture=False, min_keys=16)
    scratch = runner.kv.num_blocks - 1
    assert llm.engine.block_manager.num_blocks == scratch  # the engine never hands the scratch block out
    before = runner.kv.k[:, :scratch].clone()
    llm.chat(_conversations()[:1], SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)
    # one sequence: bucket 1, no padding; then three sequences: bucket 4 with one padding row
    changed = (runner.kv.k[:, :scratch] != before).any()
    _run(llm, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    assert changed
    assert runner.kv.k[:, scratch].abs().sum() > 0, "padding rows write their K/V into the scratch block"


@CUDA
@pytest.mark.parametrize("family", FAMILIES)
def test_captured_cuda_graphs_equal_eager(family, request):
    folder = request.getfixturevalue(f"{family}_ckpt")
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=1) for n in (12, 5, 8)]
    eager = _run(_llm(folder, "cuda", enforce_eager=True), params)
    llm = _llm(folder, "cuda")
    assert llm.engine.runner.graphs is not None and llm.engine.runner.graphs.capture
    graphs = _run(llm, params)
    assert [c.token_ids for c in graphs] == [c.token_ids for c in eager]
    for ours, ref in zip(graphs, eager):
        for a, b in zip(ours.logprobs, ref.logprobs):
            assert all(a[t] == pytest.approx(b.get(t, a[t]), abs=1e-3) for t in a)
    captured = llm.engine.runner.graphs.shapes.values()
    assert captured and all(s.graph is not None for s in captured)


def test_static_steps_with_prefix_hits_forks_and_preemption(qwen2_vl_ckpt):
    """The static path through the engine's other features: a prompt served from the prefix cache (its last
    token alone runs, with precomputed M-RoPE positions), n > 1 sequences forked from one prefill
    (copy-on-write blocks), and preemption in a pool too small for all of them."""
    conv = _conversations()[0]
    params = SamplingParams(n=3, max_tokens=10, temperature=0.9, top_p=0.9, seed=5)
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    results = []
    for static in (False, True):
        llm = _llm(qwen2_vl_ckpt, kv_cache_tokens=120)
        if static:
            llm.engine.runner.enable_decode_graphs(llm.engine.config, capture=False)
            counter = _Counter(llm.engine.runner.graphs)
        first = llm.chat(conv, greedy, use_tqdm=False)[0].outputs[0].token_ids
        again = llm.chat(conv, greedy, use_tqdm=False)[0]  # prefix hit: only the tail of the prompt runs
        forked = llm.chat(conv, params, use_tqdm=False)[0]
        crowded = llm.chat(_conversations() * 2, greedy, use_tqdm=False)  # 6 requests, 120 KV slots
        results.append((first, again.outputs[0].token_ids, again.num_cached_tokens,
                        [c.token_ids for c in forked.outputs], [o.outputs[0].token_ids for o in crowded]))
        assert llm.engine.stats().num_preemptions > 0, "the pool must be too small for the six requests"
        if static:
            assert counter.calls > 20
    assert results[0] == results[1]
    assert results[1][2] > 0, "the second request must hit the prefix cache"
