"""LLMEngine end to end with the fake model: n > 1, seeds, stop conditions, logprobs, detokenisation."""

import torch

from ocula.engine.detokenizer import IncrementalDetokenizer
from ocula.engine.engine import LLMEngine
from ocula.engine.sampling_params import SamplingParams
from ocula.engine.testing import ByteTokenizer, FakeModelRunner

from .helpers import TOK, greedy, make_engine, run_all

PROMPT = TOK.encode("A cat sits on a mat")  # 19 tokens: the last block is partly filled


def _generate(engine, params, prompt=PROMPT, request_id="a"):
    engine.add_request(request_id, prompt, params)
    return run_all(engine)[request_id]


def test_greedy_batch_matches_reference():
    engine, runner = make_engine()
    prompts = [PROMPT, PROMPT[3:], TOK.encode("zzz"), PROMPT[:7]]
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, greedy(12))
    final = run_all(engine)
    for i, p in enumerate(prompts):
        out = final[str(i)].outputs[0]
        assert out.token_ids == runner.reference_generate(p, 12)
        assert out.text == TOK.decode(out.token_ids) and out.finish_reason == "length"
    metrics = final["0"].metrics
    assert metrics.ttft is not None and metrics.ttft >= 0 and metrics.finish_time is not None


def test_n_greedy_shares_one_prefill():
    engine, runner = make_engine()
    out = _generate(engine, greedy(6, n=3))
    assert [c.index for c in out.outputs] == [0, 1, 2]
    want = runner.reference_generate(PROMPT, 6)
    assert all(c.token_ids == want for c in out.outputs)
    prompt_tokens_run = sum(s.num_new_tokens for b in runner.steps for s in b.seqs if s.start < len(PROMPT))
    assert prompt_tokens_run == len(PROMPT)  # the prompt ran once, not three times
    assert engine.block_manager.num_free_blocks == 64


def test_n_sampled_forks_equal_independent_seeded_requests():
    """Completion i of a seeded n>1 request draws from seed + i: it must equal an n=1 request with that
    seed, which holds only if each fork reads its own (copied-on-write) KV."""
    params = {"temperature": 1.0, "top_k": 20, "max_tokens": 10, "seed": 123}
    engine, _ = make_engine(enable_prefix_caching=False)
    forked = _generate(engine, SamplingParams(n=3, **params))
    texts = [c.token_ids for c in forked.outputs]
    assert len({tuple(t) for t in texts}) == 3  # different samples
    for i in range(3):
        solo_engine, _ = make_engine()
        solo = _generate(solo_engine, SamplingParams(**{**params, "seed": 123 + i}))
        assert solo.outputs[0].token_ids == texts[i]


def test_seeded_sampling_is_reproducible_and_survives_preemption():
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=16, seed=7)
    engine, _ = make_engine()
    want = _generate(engine, params).outputs[0].token_ids
    crowded, _ = make_engine(num_kv_blocks=10, enable_prefix_caching=False)
    for i in range(3):
        crowded.add_request(f"x{i}", PROMPT[i:], SamplingParams(temperature=0.8, max_tokens=16, seed=i))
    crowded.add_request("a", PROMPT, params)
    final = run_all(crowded)
    assert crowded.scheduler.num_preemptions > 0
    assert final["a"].outputs[0].token_ids == want


def test_stop_string_cuts_text_and_is_held_back_while_streaming():
    engine, _ = make_engine()
    full = _generate(engine, greedy(20)).outputs[0].text
    stop = full[6:9]
    cut = full.find(stop)
    engine.add_request("s", PROMPT, greedy(20, stop=[stop]))
    streamed = []
    while engine.has_unfinished():
        streamed += [o.outputs[0].text for o in engine.step()]
    assert streamed[-1] == full[:cut]
    assert all(full.startswith(t) and len(t) <= cut for t in streamed)  # never shows part of the stop
    engine.add_request("k", PROMPT, greedy(20, stop=[stop], include_stop_str_in_output=True))
    out = run_all(engine)["k"].outputs[0]
    assert out.text == full[:cut + 3] and out.finish_reason == "stop" and out.stop_reason == stop


def test_stop_token_ids_and_eos():
    engine, _runner = make_engine()
    full = _generate(engine, greedy(10)).outputs[0].token_ids
    out = _generate(engine, greedy(10, stop_token_ids=[full[3]]), request_id="b").outputs[0]
    first = full.index(full[3])
    assert out.token_ids == full[:first + 1] and out.stop_reason == full[3] and out.finish_reason == "stop"
    eos_runner = FakeModelRunner(eos_every=5)
    want = eos_runner.reference_generate(PROMPT, 40, eos=TOK.eos_token_id)
    assert want[-1] == TOK.eos_token_id and len(want) < 40
    eos_engine = LLMEngine(eos_runner, engine.config, tokenizer=TOK)
    out = _generate(eos_engine, greedy(40)).outputs[0]
    assert out.token_ids == want and out.finish_reason == "stop" and out.stop_reason is None
    assert "</s>" not in out.text
    out = _generate(eos_engine, greedy(len(want) + 3, ignore_eos=True), request_id="c").outputs[0]
    assert len(out.token_ids) == len(want) + 3 and out.finish_reason == "length"
    out = _generate(eos_engine, greedy(40, min_tokens=len(want) + 1), request_id="d").outputs[0]
    assert out.token_ids[:len(want) - 1] == want[:-1] and TOK.eos_token_id not in out.token_ids[:len(want)]


def test_min_tokens_and_max_model_len():
    engine, _runner = make_engine(max_model_len=24)
    out = _generate(engine, greedy(None)).outputs[0]
    assert len(out.token_ids) == 24 - len(PROMPT) and out.finish_reason == "length"


def test_logprobs_are_raw_log_softmax():
    engine, runner = make_engine()
    out = _generate(engine, greedy(4, logprobs=2)).outputs[0]
    assert len(out.logprobs) == 4
    context = list(PROMPT)
    total = 0.0
    for token, entry in zip(out.token_ids, out.logprobs):
        target = runner.reference_next(context)
        logprobs = torch.log_softmax(runner._logits_for_target(target), -1)
        top = torch.topk(logprobs, 2).indices.tolist()
        assert set(entry) == {token, *top} and token == top[0]
        assert abs(entry[token] - float(logprobs[token])) < 1e-6
        total += entry[token]
        context.append(token)
    assert abs(out.cumulative_logprob - total) < 1e-5


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    prompt = list(range(32, 127, 2))  # even printable bytes: about half of the targets are penalised
    engine, runner = make_engine()
    out = _generate(engine, greedy(12, repetition_penalty=3.0), prompt=prompt).outputs[0].token_ids
    processor = RepetitionPenaltyLogitsProcessor(3.0)
    context, changed = list(prompt), 0
    for token in out:
        target = runner.reference_next(context)
        logits = processor(torch.tensor([context]), runner._logits_for_target(target)[None])
        assert token == int(logits.argmax())
        changed += token != target
        context.append(token)
    assert changed > 0


def test_incremental_detokenizer_waits_for_whole_characters():
    tok = ByteTokenizer()
    text = "héllo → 猫!"
    detok = IncrementalDetokenizer(tok, tok.encode("> "))
    deltas = [detok.add(b) for b in tok.encode(text)]
    assert "".join(deltas) == text == detok.text
    assert all("\ufffd" not in d for d in deltas)
    assert deltas[1] == "" and deltas[2] == "é"  # the 2-byte character appears when complete
    assert detok.add(tok.eos_token_id) == ""


def test_errors_are_typed():
    import pytest

    from ocula.errors import ConfigError

    engine, _ = make_engine()
    engine.add_request("a", PROMPT, greedy(2))
    with pytest.raises(ConfigError, match="already running"):
        engine.add_request("a", PROMPT, greedy(2))
    with pytest.raises(ConfigError, match="empty"):
        engine.add_request("b", [], greedy(2))
    bare = LLMEngine(FakeModelRunner(), engine.config)
    with pytest.raises(ConfigError, match="tokenizer"):
        bare.add_request("c", PROMPT, greedy(2, stop=["x"]))
