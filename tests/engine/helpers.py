"""Small builders shared by the engine tests."""

from ocula.engine.config import EngineConfig
from ocula.engine.engine import LLMEngine
from ocula.engine.request import MediaItem, Request, Sequence
from ocula.engine.sampling_params import SamplingParams
from ocula.engine.testing import ByteTokenizer, FakeModelRunner

TOK = ByteTokenizer()


def make_seq(tokens, media=(), seq_id=0, n=1):
    request = Request(f"r{seq_id}", tokens, SamplingParams(n=n), list(media), max_tokens=8)
    seq = Sequence(seq_id, request, 0, tokens)
    request.sequences.append(seq)
    return seq


def make_engine(*, num_kv_blocks=64, block_size=4, max_num_seqs=4, budget=32, max_model_len=256, **kw):
    runner = FakeModelRunner()
    config = EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, block_size=block_size,
                          max_model_len=max_model_len, num_kv_blocks=num_kv_blocks, **kw)
    return LLMEngine(runner, config, tokenizer=TOK), runner


def run_all(engine, max_steps=10_000):
    """Step until done; return the last output of every request."""
    final = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return final
        for out in engine.step():
            final[out.request_id] = out
    raise AssertionError("the engine did not finish")


def image(name, offset, length):
    return MediaItem(hash=f"hash-{name}", offset=offset, length=length)


def greedy(max_tokens=8, **kw):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)
