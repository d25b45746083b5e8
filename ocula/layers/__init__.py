"""Building blocks shared by every model family.

- attention.py: `StaticKVCache`, `DenseAttentionMetadata`, `attention()` (dense SDPA path + engine paged path)
- rotary.py: 1-D RoPE, M-RoPE, Qwen2-VL's 2-D vision rotary
- norm.py: `RMSNorm`; mlp.py: `SwiGLUMLP` and the `hidden_act` table; sampler.py: token selection
"""
