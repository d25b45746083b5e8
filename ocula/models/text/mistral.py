"""Mistral decoder: the language model of Idefics2.

Notable features:
- parameter names exactly as the checkpoints (`embed_tokens`, `layers.N.self_attn.{q,k,v,o}_proj`,
  `mlp.{gate,up,down}_proj`, `input_layernorm`, `post_attention_layernorm`, `norm`);
- a Llama-style block without any bias: the same data flow as `text/qwen2.py`, whose config parsing, rotary,
  masks and attention it shares by import;
- sliding-window attention on every layer when `sliding_window` is set (Mistral-7B v0.1: 4096), as
  transformers' Mistral does; `sliding_window: null` gives plain causal attention;
- `head_dim` from the config when given (transformers 5 writes it), else hidden_size / num_attention_heads;
  `rope_parameters` (v5) or `rope_theta` (hub) for the RoPE base;
- takes `inputs_embeds` and attention metadata (dense static cache or paged), masks built once per forward;
Checked against transformers 5.23 `MistralModel` inside `Idefics2ForConditionalGeneration`
(tests/test_idefics2_model.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...layers.attention import DenseAttentionMetadata, StaticKVCache, attention, dense_masks
from ...layers.mlp import SwiGLUMLP
from ...layers.norm import RMSNorm
from ...layers.rotary import RotaryEmbedding, apply_rotary
from .qwen2 import FULL, SLIDING, Qwen2Config


@dataclass
class MistralConfig(Qwen2Config):
    """A Mistral decoder's config; transformers' MistralConfig defaults (Mistral-7B v0.1)."""

    model_type = "mistral"
    default_theta = 10000.0

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 8
    max_position_embeddings: int = 4096 * 32
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    sliding_window: int | None = 4096  # every layer attends to the last `sliding_window` keys; None: full
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    def _default_layer_type(self, layer: int) -> str:
        # Mistral has no `use_sliding_window` switch: a window in the config applies to all layers.
        return SLIDING if self.sliding_window is not None else FULL


class MistralAttention(nn.Module):
    def __init__(self, config: MistralConfig, layer: int):
        super().__init__()
        hidden, head_dim = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(hidden, config.num_attention_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, config.num_key_value_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, config.num_key_value_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * head_dim, hidden, bias=False)
        self.layer, self.head_dim = layer, head_dim
        self.sliding_window = config.window(layer)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn, masks) -> torch.Tensor:
        batch, seq, _ = x.shape
        heads = (batch, seq, -1, self.head_dim)
        q = self.q_proj(x).view(heads).transpose(1, 2)  # [B, Hq, S, D]
        k = self.k_proj(x).view(heads).transpose(1, 2)  # [B, Hkv, S, D]
        v = self.v_proj(x).view(heads).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        scale, window = self.head_dim**-0.5, self.sliding_window
        out = attention(
            q, k, v, self.layer, attn, scale=scale, masks=masks, sliding_window=window
        )  # [B, S, Hq*D]
        return self.o_proj(out)


class MistralDecoderLayer(nn.Module):
    def __init__(self, config: MistralConfig, layer: int):
        super().__init__()
        self.self_attn = MistralAttention(config, layer)
        self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn, masks) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn, masks)
        return x + self.mlp(self.post_attention_layernorm(x))


class MistralModel(nn.Module):
    """embed_tokens -> decoder layers -> final norm. `forward` starts from embeddings."""

    def __init__(self, config: MistralConfig):
        super().__init__()
        self.config = config
        pad = config.pad_token_id
        padding_idx = pad if isinstance(pad, int) and 0 <= pad < config.vocab_size else None
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx)
        self.layers = nn.ModuleList(MistralDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.windows = {config.window(i) for i in range(config.num_hidden_layers)}

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, attn) -> torch.Tensor:
        """inputs_embeds [B, S, hidden], position_ids [B, S] -> hidden [B, S, hidden] (normed)."""
        cos, sin = self.rotary_emb(position_ids, inputs_embeds.dtype)  # [B, S, D] each
        masks = None
        if isinstance(attn, DenseAttentionMetadata):
            masks = dense_masks(attn, inputs_embeds.shape[1], self.windows, inputs_embeds.device)
        hidden = inputs_embeds
        for layer in self.layers:
            hidden = layer(hidden, cos, sin, attn, masks)
        return self.norm(hidden)

    def new_kv_cache(
        self, batch_size: int, max_len: int, dtype: torch.dtype | None = None, device=None
    ) -> StaticKVCache:
        weight = self.embed_tokens.weight
        c = self.config
        return StaticKVCache(
            c.num_hidden_layers,
            batch_size,
            c.num_key_value_heads,
            max_len,
            c.head_dim,
            dtype=dtype or weight.dtype,
            device=device or weight.device,
        )
