"""Idefics2: a variable-resolution SigLIP tower, a perceiver resampler, and a Mistral decoder.

Notable features (in data-flow order):
- pixel_values [B, max_images, 3, H, W] carry all-zero padding images (samples with fewer images); like
  transformers, every image whose pixels are all exactly 0 is dropped before the vision tower, so padding
  images cost nothing;
- vision tower (`vision.py`): SigLIP with a patch attention mask and bucketed position ids per image;
- connector: the modality projection (SwiGLU MLP, vision width -> text width), then the perceiver resampler:
  `resampler_n_latents` learned latents cross-attend (grouped key / value heads, keys and values over
  [context, latents], padding patches masked) for `resampler_depth` blocks with RMS norms; each image (crop)
  becomes exactly `n_latents` tokens;
- the features replace the `<image>` placeholders row by row; a count mismatch raises
  `PlaceholderMismatchError` with both numbers;
- Mistral decoder with sliding-window attention (`models/text/mistral.py`); 1-D RoPE positions skip left
  padding in generation (delta = -num_left_pad), and are 0..S-1 in a plain forward, as in transformers;
- the model contract of docs/architecture.md plus a transformers-style `forward` with the loss (trainable:
  the same loss and gradients as transformers).
Checked against transformers 5.23 `Idefics2ForConditionalGeneration` (tests/test_idefics2_model.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ...layers.attention import sdpa
from ...layers.mlp import SwiGLUMLP
from ...layers.norm import RMSNorm
from ...modeling_utils import (
    CausalLMOutput,
    OwnedBaseModel,
    PreTrainedModel,
    TextContractMixin,
    full_sequence_hidden,
    head_output,
    keep_last,
    scatter_features,
)
from ..text.mistral import MistralModel
from .config import Idefics2Config, Idefics2PerceiverConfig
from .vision import Idefics2VisionTransformer, patch_mask_from_pixels

# ----------------------------------------------------------------------------------------------- connector


class ProjectionMLP(SwiGLUMLP):
    """down_proj(act(gate_proj(x)) * up_proj(x)) with an output width of its own (the modality projection)."""

    def __init__(self, in_size: int, intermediate_size: int, out_size: int, hidden_act: str):
        super().__init__(in_size, intermediate_size, hidden_act)
        self.down_proj = nn.Linear(intermediate_size, out_size, bias=False)  # [.., intermediate] -> [.., out]


class PerceiverAttention(nn.Module):
    """Latents attend to [context, latents]; keys / values use `num_key_value_heads` grouped heads."""

    def __init__(self, config: Idefics2PerceiverConfig):
        super().__init__()
        hidden, self.head_dim = config.hidden_size, config.resampler_head_dim
        self.q_proj = nn.Linear(hidden, config.resampler_n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, config.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, config.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.resampler_n_heads * self.head_dim, hidden, bias=False)

    def forward(
        self, latents: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """latents [N, L, hidden], context [N, P, hidden], mask [N, 1, 1, P + L] bool or None -> [N, L, hidden]."""
        batch, n_latents, _ = latents.shape
        both = torch.cat([context, latents], dim=1)  # [N, P + L, hidden]
        heads = (batch, both.shape[1], -1, self.head_dim)
        q = self.q_proj(latents).view(batch, n_latents, -1, self.head_dim).transpose(1, 2)  # [N, H, L, D]
        k = self.k_proj(both).view(heads).transpose(1, 2)  # [N, Hkv, P + L, D]
        v = self.v_proj(both).view(heads).transpose(1, 2)
        gqa = q.shape[1] != k.shape[1]
        out = sdpa(
            q, k, v, attn_mask=mask, scale=self.head_dim**-0.5, enable_gqa=gqa
        )
        return self.o_proj(out.transpose(1, 2).flatten(2))


class PerceiverLayer(nn.Module):
    def __init__(self, config: Idefics2PerceiverConfig):
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.input_latents_norm = RMSNorm(hidden, eps)
        self.input_context_norm = RMSNorm(hidden, eps)
        self.self_attn = PerceiverAttention(config)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.mlp = SwiGLUMLP(hidden, 4 * hidden, config.hidden_act)

    def forward(
        self, latents: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        latents = latents + self.self_attn(
            self.input_latents_norm(latents), self.input_context_norm(context), mask
        )
        return latents + self.mlp(self.post_attention_layernorm(latents))


class PerceiverResampler(nn.Module):
    """Compress each image's patch sequence into `resampler_n_latents` vectors."""

    def __init__(self, config: Idefics2PerceiverConfig):
        super().__init__()
        self.latents = nn.Parameter(torch.ones(config.resampler_n_latents, config.hidden_size))
        self.layers = nn.ModuleList(PerceiverLayer(config) for _ in range(config.resampler_depth))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, context: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        """context [N, P, hidden], patch_mask [N, P] bool (True = real patch) -> [N, L, hidden]."""
        latents = self.latents[None].expand(context.shape[0], -1, -1)  # [N, L, hidden]
        mask = None
        if not bool(patch_mask.all()):  # the latents themselves are always visible
            keys = torch.cat(
                [patch_mask.bool(), patch_mask.new_ones(latents.shape[:2], dtype=torch.bool)], dim=1
            )
            mask = keys[:, None, None, :]  # [N, 1, 1, P + L]
        for layer in self.layers:
            latents = layer(latents, context, mask)
        return self.norm(latents)


class Idefics2Connector(nn.Module):
    def __init__(self, config: Idefics2Config):
        super().__init__()
        text = config.text_config
        self.modality_projection = ProjectionMLP(
            config.vision_config.hidden_size, text.intermediate_size, text.hidden_size, text.hidden_act
        )
        self.perceiver_resampler = PerceiverResampler(config.perceiver_config)

    def forward(self, image_hidden: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        """image_hidden [N, P, vision hidden], patch_mask [N, P] -> [N, n_latents, text hidden]."""
        return self.perceiver_resampler(self.modality_projection(image_hidden), patch_mask)


# ----------------------------------------------------------------------------------------------- model

# the placeholder count depends on these processor options too
ADVICE = " (the same do_image_splitting and image_seq_len)"


@dataclass
class Idefics2ModelOutput:
    """What `Idefics2Model.forward` returns."""

    last_hidden_state: torch.Tensor  # [B, S, hidden], after the final norm
    image_hidden_states: torch.Tensor | None = None  # [n_real_images * n_latents, hidden]

    def __getitem__(self, key: str | int) -> torch.Tensor | None:
        if isinstance(key, str):
            return getattr(self, key)
        return tuple(v for v in (self.last_hidden_state, self.image_hidden_states) if v is not None)[key]


class Idefics2Model(OwnedBaseModel, nn.Module):
    """Holds `vision_model`, `connector` and `text_model`, so parameter names match transformers' `model.*`."""

    def __init__(self, config: Idefics2Config):
        super().__init__()
        self.config = config
        self.vision_model = Idefics2VisionTransformer(config.vision_config)
        self.connector = Idefics2Connector(config)
        self.text_model = MistralModel(config.text_config)

    def get_image_features(
        self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """pixel_values [B, M, 3, H, W] (+ mask [B, M, H, W]) -> [n_real_images, n_latents, text hidden]."""
        dtype = self.vision_model.embeddings.patch_embedding.weight.dtype
        pixels = pixel_values.to(dtype).flatten(0, 1)  # [B * M, 3, H, W]
        real = (pixels != 0).flatten(1).any(dim=1)  # padding images are all zeros (transformers' rule)
        pixels = pixels[real]
        if pixel_attention_mask is None:
            pixel_mask = torch.ones(
                pixels.shape[0], *pixels.shape[2:], dtype=torch.bool, device=pixels.device
            )
        else:
            pixel_mask = pixel_attention_mask.flatten(0, 1)[real]  # [N, H, W]
        patch_mask = patch_mask_from_pixels(pixel_mask, self.config.vision_config.patch_size)  # [N, h, w]
        hidden = self.vision_model(pixels, patch_mask)  # [N, h * w, vision hidden]
        return self.connector(hidden, patch_mask.flatten(1))

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        **ignored,
    ) -> Idefics2ModelOutput:
        """Final-normed hidden states [B, S, hidden] and the image features, as transformers' Idefics2Model."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.text_model.embed_tokens(input_ids)
        images = None
        if pixel_values is not None:
            images = self.get_image_features(pixel_values, pixel_attention_mask).flatten(
                0, 1
            )  # [N * L, hidden]
            where = self._image_slots(input_ids, inputs_embeds)
            inputs_embeds = scatter_features(inputs_embeds, where, images, self.config.image_token_id, ADVICE)
        hidden = full_sequence_hidden(self.text_model, inputs_embeds, position_ids, attention_mask)
        return Idefics2ModelOutput(last_hidden_state=hidden, image_hidden_states=images)

    def _image_slots(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """[B, S] bool: the `<image>` slots (found by comparing embeddings when only embeddings are given)."""
        if input_ids is not None:
            return input_ids == self.config.image_token_id
        image = self.text_model.embed_tokens.weight[self.config.image_token_id]
        return (inputs_embeds == image.to(inputs_embeds.dtype)).all(-1)


class Idefics2ForConditionalGeneration(TextContractMixin, PreTrainedModel):
    config_class = Idefics2Config
    decoder_path: ClassVar[str] = "model.text_model"
    mismatch_advice: ClassVar[str] = ADVICE
    tied_weights: ClassVar[dict[str, str]] = {"lm_head.weight": "model.text_model.embed_tokens.weight"}

    def __init__(self, config: Idefics2Config):
        super().__init__(config)
        text = config.text_config
        self.model = Idefics2Model(config)
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.image_token_id = config.image_token_id
        if config.tie_word_embeddings:
            self.tie_weights()

    def get_image_features(
        self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[n_real_images, n_latents, hidden]: the features of every real image (crop), in order."""
        return self.model.get_image_features(pixel_values, pixel_attention_mask)

    # -- the model contract (docs/architecture.md); embed_inputs, forward_text, compute_logits and
    # new_kv_cache come from TextContractMixin ------------------------------------------------------

    def get_media_features(
        self,
        pixel_values: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        **ignored,
    ) -> dict[int, torch.Tensor]:
        """`<image>` id -> [n_real_images * n_latents, hidden] (all images of the batch, in order)."""
        if pixel_values is None:
            return {}
        features = self.get_image_features(pixel_values, pixel_attention_mask)
        return {self.config.image_token_id: features.flatten(0, 1)}

    def get_position_ids(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **ignored
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """1-D positions [B, S] that skip left padding (padding slots 0) and delta [B] (= -num_left_pad)."""
        batch, seq = input_ids.shape
        if attention_mask is None:
            positions = torch.arange(seq, device=input_ids.device).expand(batch, seq)
        else:
            mask = attention_mask.to(input_ids.device).long()
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # transformers' generate() rule
        # transformers continues decoding at the last position + 1
        return positions, positions[:, -1] + 1 - seq

    # -- transformers-style forward -----------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **ignored,
    ) -> CausalLMOutput:
        """Logits [B, S, V] (or the last `logits_to_keep`) and, with `labels`, the shifted LM loss."""
        hidden = self.model(input_ids, attention_mask, position_ids, inputs_embeds, pixel_values,
                            pixel_attention_mask).last_hidden_state  # fmt: skip
        return head_output(self.compute_logits(keep_last(hidden, logits_to_keep)), labels)


Idefics2Model.owner_class = Idefics2ForConditionalGeneration
