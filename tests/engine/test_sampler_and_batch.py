"""Sampling filters against transformers' warpers; batch layout (slots, M-RoPE positions, media rows)."""

import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from ocula.engine.model_runner import gather_media_features, media_rows
from ocula.engine.request import MediaItem, Request, Sequence
from ocula.engine.sampler import sample_tokens
from ocula.engine.sampling_params import SamplingParams
from ocula.engine.testing import FakeModelRunner

from .helpers import TOK, greedy, make_engine, run_all


def _seq(i, **params):
    request = Request(f"r{i}", [1, 2, 3], SamplingParams(**params), max_tokens=4)
    seq = Sequence(i, request, 0, [1, 2, 3])
    request.sequences.append(seq)
    return seq


def test_engine_sampling_follows_transformers_processors_and_seeds():
    """Per-row settings in one call; each seeded row equals transformers' warpers + multinomial with that
    seed, including the top-p boundary (the tail whose mass is <= 1 - p is dropped)."""
    g = torch.Generator().manual_seed(3)
    settings = [(5, 1.0), (0, 0.7), (12, 0.5), (0, 0.05)]
    logits = torch.randn(len(settings), 50, generator=g) * 2
    seqs = [_seq(i, temperature=0.8, top_k=k, top_p=p, seed=10 + i) for i, (k, p) in enumerate(settings)]
    got = [token for token, _ in sample_tokens(logits, seqs, [[]] * len(seqs))]
    for row, (top_k, top_p) in enumerate(settings):
        ref = logits[row : row + 1] / 0.8
        if top_k:
            ref = TopKLogitsWarper(top_k)(None, ref)
        if top_p < 1.0:
            ref = TopPLogitsWarper(top_p)(None, ref)
        want = torch.multinomial(ref.softmax(-1), 1, generator=torch.Generator().manual_seed(10 + row))
        assert got[row] == int(want)


def test_greedy_banned_and_logprobs_rows():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 1.0]])
    seqs = [_seq(0, temperature=0.0, logprobs=1), _seq(1, temperature=0.0)]
    (t0, lp0), (t1, lp1) = sample_tokens(logits, seqs, [[1], []])
    assert (t0, t1) == (2, 0) and lp1 is None
    raw = torch.log_softmax(logits[0], -1)
    assert lp0 == {2: float(raw[2]), 1: float(raw[1])}  # raw logprobs: the sampled id and the top 1


class MRopeRunner(FakeModelRunner):
    """Pretends to be an M-RoPE model: prompt positions 3 rows apart, decode continues at index + delta."""

    def init_positions(self, request):
        p = request.num_prompt_tokens
        base = torch.arange(p)
        return torch.stack([base, base + 100, base + 200]), -5


def test_mrope_positions_slots_and_media_rows_in_the_batch():
    engine, _ = make_engine(budget=6)
    runner = MRopeRunner()
    engine.runner = runner
    runner.init_kv_cache(engine.config)
    prompt = TOK.encode("0123456789")
    media = [MediaItem("h", 2, 3)]
    engine.add_request("a", prompt, greedy(3), media=media)
    run_all(engine)
    first, second, decode = runner.steps[:3]
    assert first.positions.tolist() == [[0, 1, 2, 3, 4, 5], [100, 101, 102, 103, 104, 105],
                                        [200, 201, 202, 203, 204, 205]]
    assert second.positions[:, -1].tolist() == [9, 109, 209]
    assert decode.positions.tolist() == [[10 - 5], [10 - 5], [10 - 5]]
    table = first.attn.block_tables[0].tolist()
    assert first.attn.slot_mapping.tolist() == [table[i // 4] * 4 + i % 4 for i in range(6)]
    assert first.attn.context_lens.tolist() == [6] and second.attn.context_lens.tolist() == [10]
    assert first.sample_indices.tolist() == [] and second.sample_indices.tolist() == [3]
    features = gather_media_features(first)
    assert list(features) == [prompt[2]] and features[prompt[2]].shape == (3, 1)
    indices, rows = media_rows(first)
    assert indices.tolist() == [2, 3, 4] and torch.equal(rows, features[prompt[2]])
    assert media_rows(decode) is None
