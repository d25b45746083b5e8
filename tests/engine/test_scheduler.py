"""Scheduling through the engine with the fake model: admission, chunked prefill, media chunk rule,
preemption, abort, and requests that can never fit. Every output is compared with the dense reference."""

import pytest

from ocula.errors import PlaceholderMismatchError, RequestTooLargeError

from .helpers import TOK, greedy, image, make_engine, run_all

PROMPT = TOK.encode("Describe the picture in one short sentence, please.")  # 51 tokens


def _check_reference(runner, engine_out, prompt, media=(), max_tokens=8):
    want = runner.reference_generate(prompt, max_tokens, list(media))
    assert engine_out.outputs[0].token_ids == want


def _steps_of(runner, request_id):
    return [[s for s in b.seqs if s.seq.request.request_id == request_id] for b in runner.steps]


def test_new_request_joins_running_batch():
    engine, runner = make_engine()
    engine.add_request("a", PROMPT[:10], greedy(10))
    for _ in range(3):
        engine.step()
    engine.add_request("b", PROMPT[20:32], greedy(5))
    engine.step()
    last = runner.steps[-1]
    assert {s.seq.request.request_id for s in last.seqs} == {"a", "b"}
    assert [s.num_new_tokens for s in last.seqs] == [1, 12]  # a decodes while b prefills
    final = run_all(engine)
    _check_reference(runner, final["b"], PROMPT[20:32], max_tokens=5)
    assert len(final["b"].outputs[0].token_ids) == 5


def test_chunked_prefill_does_not_stall_decoding():
    engine, runner = make_engine(budget=8, max_num_seqs=2)
    engine.add_request("short", PROMPT[:5], greedy(12))
    engine.step()
    engine.add_request("long", PROMPT, greedy(4))
    final = run_all(engine)
    assert all(b.num_tokens <= 8 for b in runner.steps)
    long_steps = [s for s in _steps_of(runner, "long") if s]
    assert len(long_steps) >= 51 // 7  # the long prompt took many steps...
    short = _steps_of(runner, "short")
    first_long = next(i for i, s in enumerate(_steps_of(runner, "long")) if s)
    assert all(short[i] for i in range(first_long, first_long + 6))  # ...while "short" decoded every step
    _check_reference(runner, final["long"], PROMPT, max_tokens=4)
    _check_reference(runner, final["short"], PROMPT[:5], max_tokens=12)


def test_long_prefill_threshold_caps_chunks():
    engine, runner = make_engine(budget=32, long_prefill_token_threshold=10)
    engine.add_request("a", PROMPT, greedy(2))
    final = run_all(engine)
    assert [b.num_tokens for b in runner.steps[:6]] == [10, 10, 10, 10, 10, 1]
    _check_reference(runner, final["a"], PROMPT, max_tokens=2)


def test_chunk_stops_before_an_image_then_runs_it_whole():
    engine, runner = make_engine(budget=14)
    media = [image("cat", 10, 8)]
    engine.add_request("a", PROMPT[:30], greedy(3), media=media)
    final = run_all(engine)
    assert [b.num_tokens for b in runner.steps[:3]] == [10, 14, 6]  # [0,10) then the image [10,18) whole
    slices = runner.steps[1].media
    assert [(s.row_start, s.row_end, s.token_index) for s in slices] == [(0, 8, 0)]
    _check_reference(runner, final["a"], PROMPT[:30], media, max_tokens=3)


def test_image_larger_than_budget_is_split_and_encoded_once():
    engine, runner = make_engine(budget=8)
    media = [image("big", 3, 20)]
    engine.add_request("a", PROMPT[:30], greedy(3), media=media)
    final = run_all(engine)
    assert [b.num_tokens for b in runner.steps[:5]] == [3, 8, 8, 8, 3]
    rows = [(s.row_start, s.row_end) for b in runner.steps[1:4] for s in b.media]
    assert rows == [(0, 8), (8, 16), (16, 20)]
    assert runner.encoded == ["hash-big"]
    _check_reference(runner, final["a"], PROMPT[:30], media, max_tokens=3)


def test_image_larger_than_the_encoder_cache_is_still_encoded_once_across_chunks():
    engine, runner = make_engine(budget=8, encoder_cache_tokens=10)  # the 20-row image never fits the cache
    media = [image("big", 3, 20)]
    engine.add_request("a", PROMPT[:30], greedy(3), media=media)
    final = run_all(engine)
    assert runner.encoded == ["hash-big"] and len(engine.encoder_cache) == 0
    assert not engine._pinned  # released once its last rows ran
    _check_reference(runner, final["a"], PROMPT[:30], media, max_tokens=3)


def test_prefix_cache_hits_for_same_image_misses_for_another():
    engine, runner = make_engine()
    prompt = PROMPT[:20]
    engine.add_request("a", prompt, greedy(4), media=[image("cat", 2, 6)])
    run_all(engine)
    engine.add_request("same", prompt, greedy(4), media=[image("cat", 2, 6)])
    engine.add_request("other", prompt, greedy(4), media=[image("dog", 2, 6)])
    final = run_all(engine)
    assert final["same"].num_cached_tokens == 16 and final["other"].num_cached_tokens == 0
    _check_reference(runner, final["same"], prompt, [image("cat", 2, 6)], 4)
    _check_reference(runner, final["other"], prompt, [image("dog", 2, 6)], 4)
    assert final["same"].outputs[0].token_ids != final["other"].outputs[0].token_ids
    assert runner.encoded == ["hash-cat", "hash-dog"]  # the vision encoder ran once per image
    stats = engine.stats()
    assert stats.prefix_cache_hit_rate == 16 / 60 and stats.num_running == 0 and stats.num_waiting == 0
    # "same" found the image's KV in the prefix cache, so its features were not even looked up
    assert (stats.encoder_cache_hits, stats.encoder_cache_misses) == (0, 2)


def test_preemption_by_recompute_keeps_outputs():
    prompts = [PROMPT[i:i + 14] for i in range(4)]
    engine, runner = make_engine(num_kv_blocks=12, max_num_seqs=4, enable_prefix_caching=False)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, greedy(20))
    final = run_all(engine)
    assert engine.scheduler.num_preemptions > 0
    for i, p in enumerate(prompts):
        _check_reference(runner, final[f"r{i}"], p, max_tokens=20)
    assert engine.block_manager.num_free_blocks == 12


def test_max_num_seqs_is_respected():
    engine, runner = make_engine(max_num_seqs=2)
    for i in range(5):
        engine.add_request(f"r{i}", PROMPT[:6 + i], greedy(3))
    run_all(engine)
    assert max(len(b.seqs) for b in runner.steps) == 2


def test_abort_frees_blocks_immediately():
    engine, _ = make_engine(num_kv_blocks=16)
    engine.add_request("a", PROMPT[:20], greedy(30))
    engine.add_request("b", PROMPT[:9], greedy(30))
    engine.step()
    engine.step()
    assert engine.block_manager.num_free_blocks < 16
    out = engine.abort("a")
    assert out.finished and out.outputs[0].finish_reason == "abort"
    engine.abort("b")
    assert engine.block_manager.num_free_blocks == 16 and not engine.has_unfinished()
    assert engine.requests == {} and engine._detok == {}
    assert engine.abort("unknown") is None


def test_requests_that_can_never_fit_raise():
    engine, _ = make_engine(num_kv_blocks=4, block_size=4, max_model_len=64)
    with pytest.raises(RequestTooLargeError, match="max_model_len"):
        engine.add_request("a", [1] * 64, greedy(1))
    with pytest.raises(RequestTooLargeError, match="KV blocks"):
        engine.add_request("b", [1] * 10, greedy(20))
    with pytest.raises(RequestTooLargeError, match="max_num_seqs"):
        engine.add_request("d", [1] * 10, greedy(6, n=5))
    engine.add_request("c", [1] * 10, greedy(6))  # 16 tokens = 4 blocks: fits
    assert not engine.requests["c"].sequences[0].is_finished


def test_media_outside_prompt_raises():
    engine, _ = make_engine()
    with pytest.raises(PlaceholderMismatchError):
        engine.add_request("a", [1] * 10, greedy(1), media=[image("x", 8, 4)])
    with pytest.raises(PlaceholderMismatchError):
        engine.add_request("a", [1] * 10, greedy(1), media=[image("x", 0, 4), image("y", 2, 4)])


def test_features_must_match_the_placeholder_count():
    engine, _ = make_engine()
    engine.add_request("a", PROMPT[:20], greedy(2), media=[image("cat", 2, 6)])
    run_all(engine)
    engine.add_request("b", PROMPT[20:40], greedy(2), media=[image("cat", 2, 5)])  # same hash, other count
    with pytest.raises(PlaceholderMismatchError, match="5 placeholder tokens but its features have 6"):
        run_all(engine)
