"""Mistral decoder: the language model of Idefics2.

Notable features:
- parameter names exactly as the checkpoints (`embed_tokens`, `layers.N.self_attn.{q,k,v,o}_proj`,
  `mlp.{gate,up,down}_proj`, `input_layernorm`, `post_attention_layernorm`, `norm`);
- a Llama-style block without any bias: `text/qwen2.py`'s decoder (layers, rotary, masks, attention,
  config parsing) with `qkv_bias = False`, so only the config defaults and the window rule live here;
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
from typing import ClassVar

from .qwen2 import FULL, SLIDING, Qwen2Config, Qwen2Model


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


class MistralModel(Qwen2Model):
    """embed_tokens -> decoder layers (no bias anywhere) -> final norm. `forward` starts from embeddings."""

    qkv_bias: ClassVar[bool] = False
