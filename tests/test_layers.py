"""Layers against transformers' implementations and a plain eager attention reference."""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen2_vl import modeling_qwen2_vl as hf
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig, Qwen2VLVisionConfig
from transformers.vision_utils import get_vision_position_ids

from ocula.engine.paged_attention import PagedAttentionMetadata, PagedKVCache
from ocula.layers.attention import DenseAttentionMetadata, StaticKVCache, attention, segment_attention
from ocula.layers.mlp import SwiGLUMLP, quick_gelu
from ocula.layers.norm import RMSNorm
from ocula.layers.rotary import RotaryEmbedding, VisionRotaryEmbedding, apply_rotary, vision_rows_cols


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_transformers_exactly(dtype):
    ours, ref = RMSNorm(32, eps=1e-5), hf.Qwen2VLRMSNorm(32, eps=1e-5)
    weight = 1 + 0.1 * torch.randn(32, generator=_gen())
    ours.weight.data.copy_(weight), ref.weight.data.copy_(weight)
    ours.to(dtype), ref.to(dtype)
    x = (3 * torch.randn(2, 5, 32, generator=_gen(1))).to(dtype)
    assert torch.equal(ours(x), ref(x))


def test_swiglu_mlp_matches_transformers():
    config = Qwen2VLTextConfig(hidden_size=16, intermediate_size=40)
    ref, ours = hf.Qwen2MLP(config), SwiGLUMLP(16, 40, "silu")
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 16, generator=_gen())
    torch.testing.assert_close(ours(x), ref(x), atol=0, rtol=0)


def test_quick_gelu():
    x = torch.linspace(-4, 4, 9)
    torch.testing.assert_close(quick_gelu(x), x * torch.sigmoid(1.702 * x))


def test_mrope_cos_sin_match_transformers():
    config = Qwen2VLTextConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                               rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})
    ref = hf.Qwen2VLRotaryEmbedding(config)
    ours = RotaryEmbedding(16, 1e6, [2, 3, 3])
    positions = torch.randint(0, 50, (3, 2, 7), generator=_gen())
    x = torch.zeros(1)
    for got, want in zip(ours(positions, torch.float32), ref(x, positions)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    # [B, S] positions on an M-RoPE model: three equal rows
    flat = positions[0]
    for got, want in zip(ours(flat, torch.float32), ref(x, flat[None].expand(3, -1, -1))):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_apply_rotary_matches_transformers():
    q, k = torch.randn(2, 4, 7, 16, generator=_gen()), torch.randn(2, 2, 7, 16, generator=_gen(1))
    cos, sin = RotaryEmbedding(16, 10000.0)(torch.arange(7).expand(2, -1), torch.float32)
    want_q, want_k = hf.apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(apply_rotary(q, cos, sin), want_q, atol=0, rtol=0)
    torch.testing.assert_close(apply_rotary(k, cos, sin), want_k, atol=0, rtol=0)


def test_vision_rotary_matches_transformers():
    grid = torch.tensor([[1, 4, 6], [2, 2, 4]])
    rows_cols = vision_rows_cols(grid, 2)
    assert torch.equal(rows_cols, get_vision_position_ids(grid, 2))
    config = Qwen2VLVisionConfig(embed_dim=32, num_heads=2)
    want = hf.Qwen2VLVisionRotaryEmbedding(config)(torch.zeros(1), rows_cols)
    for got, expected in zip(VisionRotaryEmbedding(16)(rows_cols), want):
        torch.testing.assert_close(got, expected, atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------- attention


def eager_reference(q, k, v, key_mask, window):
    """Softmax attention by the definition: causal by index, padding keys hidden, optional window."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    seq = q.shape[2]
    idx = torch.arange(seq)
    allowed = idx[None, :] <= idx[:, None]
    if window is not None:
        allowed &= idx[None, :] > idx[:, None] - window
    allowed = allowed[None, None] & key_mask[:, None, None, :]
    live = allowed.any(-1, keepdim=True)  # a query that sees no key (left padding) outputs zeros
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    out = scores.masked_fill(~(allowed | ~live), float("-inf")).softmax(-1) @ v * live
    return out.transpose(1, 2).flatten(2)


def _qkv(batch=2, seq=9, hq=4, hkv=2, dim=8, seed=0):
    g = _gen(seed)
    return (torch.randn(batch, hq, seq, dim, generator=g), torch.randn(batch, hkv, seq, dim, generator=g),
            torch.randn(batch, hkv, seq, dim, generator=g))


@pytest.mark.parametrize("window", [None, 3])
def test_dense_attention_matches_reference(window):
    q, k, v = _qkv()
    key_mask = torch.ones(2, 9, dtype=torch.bool)
    key_mask[1, :3] = False  # left padding
    meta = DenseAttentionMetadata(key_mask=key_mask)
    got = attention(q, k, v, 0, meta, scale=8**-0.5, sliding_window=window)
    torch.testing.assert_close(got, eager_reference(q, k, v, key_mask, window), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 3])
def test_static_cache_steps_equal_one_full_pass(window):
    q, k, v = _qkv(seed=1)
    key_mask = torch.ones(2, 9, dtype=torch.bool)
    key_mask[0, :2] = False
    full = attention(q, k, v, 0, DenseAttentionMetadata(key_mask=key_mask), scale=0.3, sliding_window=window)
    cache = StaticKVCache(2, 2, 2, 12, 8)
    prefill = attention(q[:, :, :6], k[:, :, :6], v[:, :, :6], 1, DenseAttentionMetadata(cache, 0, key_mask[:, :6]),
                        scale=0.3, sliding_window=window)
    steps = [
        attention(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], 1,
                  DenseAttentionMetadata(cache, i, key_mask[:, :i + 1]), scale=0.3, sliding_window=window)
        for i in range(6, 9)
    ]
    real = key_mask  # padding queries see every key present, so they differ by design
    torch.testing.assert_close(torch.cat([prefill, *steps], dim=1)[real], full[real], atol=1e-6, rtol=1e-6)
    assert torch.equal(cache.k[1, :, :, :9], k) and not bool(cache.k[0].any())  # written in place, layer 1


def test_paged_path_equals_dense():
    q, k, v = _qkv(batch=1, seq=7, seed=2)
    dense = attention(q, k, v, 0, DenseAttentionMetadata(), scale=0.35, sliding_window=4)
    pool = PagedKVCache(num_layers=1, num_blocks=4, block_size=4, num_kv_heads=2, head_dim=8)
    meta = PagedAttentionMetadata(
        slot_mapping=torch.tensor([8, 9, 10, 11, 4, 5, 6]),  # blocks 2 then 1
        block_tables=torch.tensor([[2, 1]]),
        context_lens=torch.tensor([7]),
        query_start_loc=torch.tensor([0, 7]),
        cache=pool,
    )
    paged = attention(q, k, v, 0, meta, scale=0.35, sliding_window=4)
    torch.testing.assert_close(paged, dense, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("bounds", [[0, 16, 32, 48], [0, 16, 40, 48], [0, 48]])
def test_segment_attention_keeps_each_segment_to_itself(bounds):
    """Equal segments take one batched call, unequal ones a call each: both equal a masked eager reference."""
    q, k, v = (torch.randn(3, 48, 8, generator=_gen(i)) for i in range(3))
    segment = torch.repeat_interleave(torch.arange(len(bounds) - 1), torch.diff(torch.tensor(bounds)))
    scores = (q @ k.transpose(1, 2)) / 8**0.5
    scores = scores.masked_fill(segment[:, None] != segment[None, :], float("-inf"))
    torch.testing.assert_close(segment_attention(q, k, v, bounds), scores.softmax(-1) @ v)
