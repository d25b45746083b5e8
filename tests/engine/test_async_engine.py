"""AsyncLLMEngine: concurrent streams equal the synchronous engine; cancellation aborts and frees blocks."""

import asyncio
import itertools

import pytest

from ocula.engine.async_engine import AsyncLLMEngine
from ocula.errors import RequestTooLargeError

from .helpers import TOK, greedy, make_engine

PROMPTS = [TOK.encode("first prompt here"), TOK.encode("a second, longer prompt for streaming")]


async def _collect(engine, request_id, prompt, params):
    return [out async for out in engine.generate(request_id, prompt, params)]


def test_concurrent_streams_match_reference():
    async def main():
        sync_engine, runner = make_engine(budget=8)
        engine = AsyncLLMEngine(sync_engine)
        streams = await asyncio.gather(*[
            _collect(engine, f"r{i}", p, greedy(10, stop=["@@"])) for i, p in enumerate(PROMPTS)
        ])
        await engine.shutdown()
        return streams, runner

    streams, runner = asyncio.run(main())
    for prompt, outs in zip(PROMPTS, streams):
        assert len(outs) >= 10 and outs[-1].finished and not any(o.finished for o in outs[:-1])
        ids = [o.outputs[0].token_ids for o in outs]
        assert all(len(a) <= len(b) for a, b in itertools.pairwise(ids))  # cumulative
        want = runner.reference_generate(prompt, 10)
        if "@@" not in TOK.decode(want):
            assert ids[-1] == want


def test_cancelling_the_consumer_aborts_and_frees_blocks():
    async def main():
        sync_engine, _ = make_engine(num_kv_blocks=32)
        engine = AsyncLLMEngine(sync_engine)
        got = []

        async def consume():
            async for out in engine.generate("c", PROMPTS[1], greedy(60)):
                got.append(out)

        task = asyncio.create_task(consume())
        for _ in range(2000):
            if len(got) >= 3 or task.done():
                break
            await asyncio.sleep(0.001)
        assert len(got) >= 3
        assert sync_engine.block_manager.num_free_blocks < 32
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):
            if not sync_engine.has_unfinished():
                break
            await asyncio.sleep(0.001)
        free = sync_engine.block_manager.num_free_blocks
        leftover = dict(sync_engine.requests)
        # the engine keeps serving new requests afterwards
        again = await _collect(engine, "d", PROMPTS[0], greedy(3))
        await engine.shutdown()
        return got, free, leftover, again

    got, free, leftover, again = asyncio.run(main())
    assert not got[-1].finished and len(got[-1].outputs[0].token_ids) < 60
    assert free == 32 and leftover == {}
    assert again[-1].finished and len(again[-1].outputs[0].token_ids) == 3


def test_abort_delivers_final_output_and_bad_requests_raise_early():
    async def main():
        sync_engine, _ = make_engine(max_model_len=64)
        engine = AsyncLLMEngine(sync_engine)
        with pytest.raises(RequestTooLargeError):
            async for _ in engine.generate("big", [1] * 64, greedy(2)):
                pass
        outs = []
        async for out in engine.generate("x", PROMPTS[0], greedy(40)):
            outs.append(out)
            if len(outs) == 2:
                engine.abort("x")
        await engine.shutdown()
        return outs

    outs = asyncio.run(main())
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
