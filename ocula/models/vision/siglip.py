"""SigLIP vision tower: the image encoder of LLaVA-OneVision (and, with patch masks, of Idefics2).

Notable features (in data-flow order):
- patch embedding: a stride-`patch_size` Conv2d ("valid": pixels past the last whole patch are dropped,
  e.g. 384 / 14 keeps 27 x 27 patches), plus learned absolute position embeddings;
- hooks for variable-resolution towers (Idefics2): `position_ids` [B, N] pick the position embeddings
  per patch, and `patch_attention_mask` [B, N] (True = real patch) masks padding keys in every layer;
- pre-norm encoder layers: LayerNorm -> q / k / v -> bidirectional SDPA -> out_proj; LayerNorm ->
  fc1 -> GELU (tanh) -> fc2 (attention and MLP from `vision/blocks.py`); `SiglipEncoderLayer` /
  `SiglipEncoder` are importable on their own;
- `hidden_states(pixels, layers)`: the hidden states VLMs select (index 0 = embeddings, i = output of
  layer i, negative from the end, before `post_layernorm`), running only the layers needed;
- parameter names as transformers 5 saves them (`embeddings.patch_embedding`, `encoder.layers.N.self_attn.
  {q,k,v,out}_proj`, `mlp.fc1`, `layer_norm1`, `post_layernorm`). The attention-pooling head
  (`vision_use_head`) is not built: no supported VLM uses it.
Checked against transformers 5.23 `SiglipVisionModel` (tests/test_llava_onevision_model.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .blocks import ViTAttention, ViTConfig, ViTMLP


@dataclass
class SiglipVisionConfig(ViTConfig):
    """transformers' SiglipVisionConfig (its defaults are `ViTConfig`'s)."""

    model_type = "siglip_vision_model"

    layer_norm_eps: float = 1e-6
    vision_use_head: bool = True  # the attention-pooling head (not built by ocula)


class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, config.patch_size, stride=config.patch_size
        )
        self.position_embedding = nn.Embedding(config.grid**2, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """pixel_values [B, C, H, W] -> [B, N, hidden]; position_ids [B, N] default 0..N-1."""
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(weight.dtype))  # [B, hidden, H/p, W/p]
        embeds = patches.flatten(2).transpose(1, 2)  # [B, N, hidden]
        if position_ids is None:
            return embeds + self.position_embedding.weight[: embeds.shape[1]]
        return embeds + self.position_embedding(position_ids)


class SiglipEncoderLayer(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = ViTAttention(config.hidden_size, config.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = ViTMLP(config.hidden_size, config.intermediate_size, config.hidden_act)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, depth: int | None = None
    ) -> list[torch.Tensor]:
        """All hidden states [input, after layer 1, ..., after layer `depth`] (depth defaults to all)."""
        states = [x]
        for layer in self.layers[: len(self.layers) if depth is None else depth]:
            states.append(layer(states[-1], mask))
        return states


def key_mask_to_sdpa(patch_attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """[B, N] bool (True = real patch) -> SDPA mask [B, 1, 1, N]; None when every patch is real."""
    if patch_attention_mask is None or bool(patch_attention_mask.all()):
        return None
    return patch_attention_mask.bool()[:, None, None, :]


class SiglipVisionTransformer(nn.Module):
    """embeddings -> encoder -> post_layernorm; parameter names as transformers' SiglipVisionModel."""

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = SiglipVisionEmbeddings(config)
        self.encoder = SiglipEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def hidden_states(
        self,
        pixel_values: torch.Tensor,
        layers: list[int],
        patch_attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """The hidden states at `layers` (0 = embeddings, -1 = last layer, before post_layernorm)."""
        total = len(self.encoder.layers) + 1
        wanted = [i % total for i in layers]
        embeds = self.embeddings(pixel_values, position_ids)
        states = self.encoder(embeds, key_mask_to_sdpa(patch_attention_mask), depth=max(wanted))
        return [states[i] for i in wanted]

    def forward(
        self,
        pixel_values: torch.Tensor,
        patch_attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """pixel_values [B, C, H, W] -> last_hidden_state [B, N, hidden] (post_layernorm applied)."""
        last = self.hidden_states(pixel_values, [-1], patch_attention_mask, position_ids)[0]
        return self.post_layernorm(last)
