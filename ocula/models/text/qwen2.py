"""Qwen2 decoder: the language model of Qwen2-VL, LLaVA-OneVision and Ovis2.

Notable features:
- parameter names exactly as the checkpoints (`embed_tokens`, `layers.N.self_attn.{q,k,v,o}_proj`,
  `mlp.{gate,up,down}_proj`, `input_layernorm`, `post_attention_layernorm`, `norm`);
- q / k / v projections with bias, o_proj without (Qwen2; `qkv_bias = False` gives the Mistral block,
  so `text/mistral.py` is this decoder); SwiGLU MLP; RMSNorm computed in float32;
- 1-D RoPE from positions [B, S] or M-RoPE from [3, B, S] (`mrope_section`), `rope_parameters` (v5) or
  `rope_theta` + `rope_scaling` (hub) in the config;
- sliding window per layer like transformers: layers >= `max_window_layers` when `use_sliding_window`,
  or an explicit `layer_types` list (so a Mistral-style decoder can reuse the blocks);
- takes `inputs_embeds` (media already merged) and attention metadata (dense static cache or paged);
  masks are built once per forward.
Checked against transformers 5.23 `Qwen2VLTextModel` (tests/test_qwen2_vl_model.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ...configuration_utils import BaseConfig
from ...errors import UnsupportedFeatureError
from ...layers.attention import DenseAttentionMetadata, StaticKVCache, attention, dense_masks
from ...layers.mlp import SwiGLUMLP, activation
from ...layers.norm import RMSNorm
from ...layers.rotary import RotaryEmbedding, apply_rotary

SLIDING, FULL = "sliding_attention", "full_attention"


@dataclass
class Qwen2Config(BaseConfig):
    """A Qwen2 decoder's config (the text part of the multimodal configs)."""

    model_type = "qwen2"
    default_theta = 1000000.0  # transformers' Qwen2 default_theta

    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: no GQA (= num_attention_heads)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    rope_type: str = "default"  # only plain RoPE ("default"; the hub's "mrope" means the same)
    mrope_section: list[int] | None = None  # M-RoPE frequency bands of the t / h / w position rows
    use_sliding_window: bool = False
    sliding_window: int | None = 4096  # used only when use_sliding_window
    max_window_layers: int = 28  # layers from this index on use the sliding window
    layer_types: list[str] | None = None  # explicit "full_attention" / "sliding_attention" per layer
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    dtype: str | None = None  # the checkpoint's dtype ("bfloat16", ...); `torch_dtype` on the hub

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Qwen2Config:
        return super().from_dict(cls.rope_fields(dict(data)))

    @classmethod
    def rope_fields(cls, data: dict[str, Any]) -> dict[str, Any]:
        """`rope_parameters` (v5) or `rope_scaling` + `rope_theta` (hub) -> rope_type / rope_theta / mrope_section."""
        rope = data.pop("rope_parameters", None) or data.pop("rope_scaling", None)
        data.pop("rope_scaling", None)
        if not rope:
            return data
        kind = rope.get("rope_type", rope.get("type", "default"))
        data["rope_type"] = "default" if kind == "mrope" else kind
        data["rope_theta"] = rope.get("rope_theta", data.get("rope_theta", cls.default_theta))
        if rope.get("mrope_section") is not None:
            data["mrope_section"] = list(rope["mrope_section"])
        return data

    def __post_init__(self) -> None:
        self.check_positive("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")
        self.check_positive("num_attention_heads")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.check(self.hidden_size % self.num_attention_heads == 0, "hidden_size",
                       f"must be divisible by num_attention_heads={self.num_attention_heads}.")
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.check(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
                   f"must divide num_attention_heads={self.num_attention_heads}.")
        self._check_rope()
        if self.layer_types is None:
            self.layer_types = [self._default_layer_type(i) for i in range(self.num_hidden_layers)]
        self.check(len(self.layer_types) == self.num_hidden_layers, "layer_types",
                   f"must list one entry per layer ({self.num_hidden_layers}).")
        activation(self.hidden_act)

    def _check_rope(self) -> None:
        if self.rope_type != "default":
            raise UnsupportedFeatureError(
                f"{type(self).__name__}: rope_type={self.rope_type!r} (RoPE scaling) is not supported yet; "
                "only plain RoPE / M-RoPE checkpoints load."
            )
        if self.mrope_section is not None:
            self.check(sum(self.mrope_section) * 2 == self.head_dim, "mrope_section",
                       f"must sum to head_dim / 2 = {self.head_dim // 2}.")

    def _default_layer_type(self, layer: int) -> str:
        sliding = self.use_sliding_window and self.sliding_window is not None
        return SLIDING if sliding and layer >= self.max_window_layers else FULL

    def window(self, layer: int) -> int | None:
        """The sliding window of `layer` (None: full causal attention)."""
        return self.sliding_window if self.layer_types[layer] == SLIDING else None


class Qwen2Attention(nn.Module):
    def __init__(self, config: Qwen2Config, layer: int, qkv_bias: bool = True):
        super().__init__()
        hidden, head_dim = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(hidden, config.num_attention_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, config.num_key_value_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, config.num_key_value_heads * head_dim, bias=qkv_bias)
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
        out = attention(q, k, v, self.layer, attn, scale=self.head_dim**-0.5, masks=masks,
                        sliding_window=self.sliding_window)  # [B, S, Hq * D]
        return self.o_proj(out)


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, config: Qwen2Config, layer: int, qkv_bias: bool = True):
        super().__init__()
        self.self_attn = Qwen2Attention(config, layer, qkv_bias)
        self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn, masks) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn, masks)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    """embed_tokens -> decoder layers -> final norm. `forward` starts from embeddings."""

    qkv_bias: ClassVar[bool] = True  # Qwen2's q / k / v projections have a bias; Mistral's do not

    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.config = config
        pad = config.pad_token_id
        padding_idx = pad if isinstance(pad, int) and 0 <= pad < config.vocab_size else None
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx)
        self.layers = nn.ModuleList(
            Qwen2DecoderLayer(config, i, self.qkv_bias) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta, config.mrope_section)
        self.windows = {config.window(i) for i in range(config.num_hidden_layers)}

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, attn) -> torch.Tensor:
        """inputs_embeds [B, S, hidden], position_ids [B, S] or [3, B, S] -> hidden [B, S, hidden] (normed)."""
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
        return StaticKVCache(c.num_hidden_layers, batch_size, c.num_key_value_heads, max_len, c.head_dim,
                             dtype=dtype or weight.dtype, device=device or weight.device)
