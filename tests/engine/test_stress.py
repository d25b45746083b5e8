"""Randomised end-to-end check: many requests with shared prefixes, repeated and different images, n > 1,
a tiny KV pool (preemption), small budgets (chunking) and prefix caching; every completion must equal the
dense greedy reference and every block must come back."""

import random
from dataclasses import replace

import pytest

from ocula.engine.request import MediaItem
from ocula.engine.sampling_params import SamplingParams

from .helpers import greedy, make_engine, run_all


def _random_request(rng, system):
    prompt = system + [rng.randrange(32, 127) for _ in range(rng.randrange(1, 14))]
    media = []
    if rng.random() < 0.6:
        offset = rng.randrange(0, len(prompt))
        image = rng.randrange(3)
        length = 3 + 4 * image  # the same image always becomes the same number of tokens
        prompt = prompt[:offset] + [255] * length + prompt[offset:]
        media = [MediaItem(hash=f"img{image}", offset=offset, length=length)]
    return prompt, media


@pytest.mark.parametrize("seed", [0, 1, 2, 7])
def test_random_workload_matches_reference(seed):
    rng = random.Random(seed)
    engine, runner = make_engine(num_kv_blocks=rng.choice([22, 26, 80]), block_size=rng.choice([2, 4]),
                                 budget=rng.choice([8, 12, 24]), max_num_seqs=4, max_model_len=64)
    system = [rng.randrange(32, 127) for _ in range(9)]
    requests, final = {}, {}
    for i in range(10):
        prompt, media = _random_request(rng, system)
        n, max_tokens = rng.choice([1, 1, 2]), rng.randrange(1, 10)
        requests[f"r{i}"] = (prompt, media, n, max_tokens)
        engine.add_request(f"r{i}", prompt, greedy(max_tokens, n=n), media=media)
        for _ in range(rng.randrange(0, 3)):  # requests arrive while others run
            final.update({out.request_id: out for out in engine.step()})
    final.update(run_all(engine))
    for rid, (prompt, media, n, max_tokens) in requests.items():
        want = runner.reference_generate(prompt, max_tokens, media)
        assert [c.token_ids for c in final[rid].outputs] == [want] * n, rid
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.requests


@pytest.mark.parametrize("seed", [1, 3])
def test_random_seeded_sampling_matches_solo_runs(seed):
    """Sampled n > 1 under preemption: completion i equals the same request run alone with seed + i."""
    rng = random.Random(seed)
    engine, _ = make_engine(num_kv_blocks=22, block_size=2, budget=12, max_num_seqs=4, max_model_len=64)
    system = [rng.randrange(32, 127) for _ in range(9)]
    requests, final = {}, {}
    for i in range(8):
        prompt, media = _random_request(rng, system)
        params = SamplingParams(n=rng.choice([1, 2, 3]), max_tokens=rng.randrange(2, 10), temperature=1.0,
                                top_k=30, seed=100 * i)
        requests[f"r{i}"] = (prompt, media, params)
        engine.add_request(f"r{i}", prompt, params, media=media)
        final.update({out.request_id: out for out in engine.step()})
    final.update(run_all(engine))
    assert engine.scheduler.num_preemptions > 0
    for rid, (prompt, media, params) in requests.items():
        for i, completion in enumerate(final[rid].outputs):
            solo, _ = make_engine(num_kv_blocks=80)
            solo.add_request("x", prompt, replace(params, n=1, seed=params.seed + i), media=media)
            assert run_all(solo)["x"].outputs[0].token_ids == completion.token_ids, (rid, i)
