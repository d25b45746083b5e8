"""Encoder / processed-media LRU caches, config and sampling-parameter checks."""

import pytest
import torch

from ocula.engine.config import EngineConfig
from ocula.engine.encoder_cache import EncoderCache, ProcessedMediaCache
from ocula.engine.sampling_params import SamplingParams
from ocula.errors import ConfigError


def test_encoder_cache_evicts_least_recently_used_by_tokens():
    cache = EncoderCache(capacity=10)
    cache.put("a", torch.zeros(4, 3))
    cache.put("b", torch.zeros(4, 3))
    assert cache.get("a") is not None  # "b" is now the least recently used
    cache.put("c", torch.zeros(4, 3))
    assert "b" not in cache and "a" in cache and "c" in cache
    assert cache.used == 8
    cache.put("huge", torch.zeros(11, 3))  # larger than the whole cache: not stored, nothing evicted
    assert "huge" not in cache and len(cache) == 2
    assert (cache.hits, cache.misses) == (1, 0)


def test_processed_media_cache_bounded_by_bytes():
    cache = ProcessedMediaCache(capacity=100)
    cache.put("x", {"pixel_values": torch.zeros(10), "grid": [torch.zeros(2, dtype=torch.long)]})
    assert cache.used == 40 + 16
    cache.put("y", {"pixel_values": torch.zeros(12, dtype=torch.float32)})
    assert "x" not in cache and cache.used == 48
    assert cache.get("x") is None and cache.misses == 1


@pytest.mark.parametrize("kwargs", [
    {"block_size": 0}, {"max_num_seqs": 8, "max_num_batched_tokens": 4}, {"num_kv_blocks": -1},
    {"kv_cache_memory_fraction": 1.5}, {"enable_chunked_prefill": False, "max_num_batched_tokens": 64},
])
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ConfigError):
        EngineConfig(**kwargs)


def test_prefill_chunk_size():
    assert EngineConfig(max_num_batched_tokens=512).prefill_chunk_size == 512
    assert EngineConfig(max_num_batched_tokens=512, long_prefill_token_threshold=64).prefill_chunk_size == 64


@pytest.mark.parametrize("kwargs", [
    {"n": 0}, {"temperature": -1.0}, {"top_p": 0.0}, {"top_k": -2}, {"max_tokens": 0}, {"stop": [""]},
])
def test_sampling_params_rejects_bad_values(kwargs):
    with pytest.raises(ConfigError):
        SamplingParams(**kwargs)


def test_sampling_params_normalises():
    params = SamplingParams(stop="###", top_k=-1, temperature=0)
    assert params.stop == ["###"] and params.top_k == 0 and params.greedy and params.max_stop_len == 3
