"""Qwen2-VL: a ViT with 2-D rotary over native-resolution patches, a 2x2 patch merger, a Qwen2 decoder
with M-RoPE.

Notable features (in data-flow order):
- patch embed: the checkpoint's Conv3d over one (temporal 2 x 14 x 14) patch is a single matrix
  product, so it runs as `F.linear` on the flattened patches (same weight, same name);
- vision blocks: LayerNorm -> fused qkv -> 2-D rotary (row / column halves) -> attention restricted to
  each image / video frame (one SDPA call per segment: no dense [N, N] mask, even for big images) ->
  proj; LayerNorm -> fc1 -> QuickGELU (per config) -> fc2 (`vision/blocks.py`'s `ViTMLP`);
- patch merger: ln_q, then each 2x2 window of patches (consecutive in the processor's order) -> MLP;
- media features replace the `<|image_pad|>` / `<|video_pad|>` placeholders; a count mismatch raises
  `PlaceholderMismatchError` with both numbers;
- M-RoPE positions from `mm_token_type_ids` (0 text, 1 image, 2 video) and the grids, per row, padding
  skipped. Text after a media item continues at max over its (t, h, w) positions + 1, as the original
  Qwen2-VL and transformers 4.x do; transformers 5.23 uses start + max(h, w) / merge, ignoring t, which
  is the same for images (t = 1) but overlaps the positions of a long video (docs/compatibility.md);
- the model contract of docs/architecture.md (`get_media_features`, `embed_inputs`, `get_position_ids`,
  `forward_text`, `compute_logits`, `new_kv_cache`) plus a transformers-style `forward` with the loss.
Checked against transformers 5.23 `Qwen2VLForConditionalGeneration` (tests/test_qwen2_vl_model.py).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import PlaceholderMismatchError
from ...layers.attention import segment_attention
from ...layers.rotary import VisionRotaryEmbedding, apply_vision_rotary, vision_rows_cols
from ...modeling_utils import (
    CausalLMOutput,
    OwnedBaseModel,
    PreTrainedModel,
    TextContractMixin,
    own,
    plain_positions,
)
from ..text.qwen2 import Qwen2Model
from ..vision.blocks import ViTMLP
from .config import Qwen2VLConfig, Qwen2VLVisionConfig

TEXT, IMAGE, VIDEO = 0, 1, 2  # mm_token_type_ids values

# ----------------------------------------------------------------------------------------------- vision


class PatchEmbed(nn.Module):
    def __init__(self, config: Qwen2VLVisionConfig):
        super().__init__()
        kernel = (config.temporal_patch_size, config.patch_size, config.patch_size)
        self.proj = nn.Conv3d(config.in_channels, config.embed_dim, kernel, stride=kernel, bias=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """patches [N, C * T * P * P] (the processor's flattening order) -> [N, embed_dim]."""
        weight = self.proj.weight.flatten(1)  # [embed_dim, C * T * P * P]: one conv window = one matmul
        return F.linear(patches.to(weight.dtype), weight)


class VisionAttention(nn.Module):
    def __init__(self, config: Qwen2VLVisionConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.embed_dim, 3 * config.embed_dim, bias=True)
        self.proj = nn.Linear(config.embed_dim, config.embed_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bounds: list[int]) -> torch.Tensor:
        """x [N, E]; attention stays within each segment [bounds[i], bounds[i + 1])."""
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, -1).unbind(1)  # [N, H, D] each
        q, k = apply_vision_rotary(q, cos, sin), apply_vision_rotary(k, cos, sin)
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # [H, N, D]
        out = segment_attention(q, k, v, bounds)  # [H, N, D], each image / frame group attends to itself
        return self.proj(out.transpose(0, 1).reshape(n, -1))


class VisionBlock(nn.Module):
    def __init__(self, config: Qwen2VLVisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.embed_dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(config.embed_dim, eps=1e-6)
        self.attn = VisionAttention(config)
        self.mlp = ViTMLP(config.embed_dim, int(config.embed_dim * config.mlp_ratio), config.hidden_act)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bounds: list[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, bounds)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """LayerNorm, then each merge x merge window of patches (consecutive rows) -> one text-width vector."""

    def __init__(self, config: Qwen2VLVisionConfig):
        super().__init__()
        self.window_dim = config.embed_dim * config.spatial_merge_size**2
        self.ln_q = nn.LayerNorm(config.embed_dim, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(self.window_dim, self.window_dim), nn.GELU(), nn.Linear(self.window_dim, config.hidden_size)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.window_dim))  # [N, E] -> [N / merge^2, hidden]


class Qwen2VisionTransformer(nn.Module):
    def __init__(self, config: Qwen2VLVisionConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.rotary_pos_emb = VisionRotaryEmbedding(config.head_dim, config.rope_theta)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.merger = PatchMerger(config)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values [sum t*h*w, C*T*P*P], grid_thw [n_items, 3] -> [sum t*h*w / merge^2, hidden]."""
        x = self.patch_embed(pixel_values)  # [N, E]
        cos, sin = self.rotary_pos_emb(vision_rows_cols(grid_thw, self.config.spatial_merge_size))
        bounds = frame_bounds(grid_thw)
        for block in self.blocks:
            x = block(x, cos, sin, bounds)
        return self.merger(x)


def frame_bounds(grid_thw: torch.Tensor) -> list[int]:
    """Segment bounds: every frame of every item attends within itself ([0, h*w, 2*h*w, ...])."""
    sizes = [h * w for t, h, w in grid_thw.tolist() for _ in range(t)]
    return [0, *itertools.accumulate(sizes)]


# ----------------------------------------------------------------------------------------------- M-RoPE


def mrope_positions(
    token_types: torch.Tensor,
    attention_mask: torch.Tensor | None,
    grids: dict[int, torch.Tensor | None],
    merge: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE positions [3, B, S] and delta [B] (a token at cache index t decodes at t + delta).

    Padding positions get 0. Grids are consumed in order across the batch, as the processor lists them.
    """
    batch, seq = token_types.shape
    positions = torch.zeros(3, batch, seq, dtype=torch.long)
    delta = torch.zeros(batch, dtype=torch.long)
    grid_iters = {kind: iter(g.tolist()) for kind, g in grids.items() if g is not None}
    mask = attention_mask.bool().cpu() if attention_mask is not None else torch.ones(batch, seq, dtype=torch.bool)
    for row in range(batch):
        row_positions = _row_positions(token_types[row].cpu()[mask[row]].tolist(), grid_iters, merge)
        positions[:, row, mask[row]] = row_positions
        delta[row] = (int(row_positions.max()) + 1 if row_positions.numel() else 0) - seq
    return positions.to(token_types.device), delta.to(token_types.device)


def _row_positions(types: list[int], grids: dict[int, Iterator], merge: int) -> torch.Tensor:
    pieces, next_pos = [], 0
    for kind, group in itertools.groupby(types):
        length = len(list(group))
        if kind == TEXT:
            pieces.append(torch.arange(next_pos, next_pos + length).expand(3, -1))
            next_pos += length
            continue
        while length > 0:  # adjacent items of one kind form one group
            piece = _media_positions(_next_grid(grids, kind), merge) + next_pos
            pieces.append(piece)
            next_pos = int(piece.max()) + 1  # the original rule: max over (t, h, w) positions + 1
            length -= piece.shape[1]
        if length < 0:
            raise PlaceholderMismatchError(_grid_mismatch(kind))
    return torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)


def _media_positions(grid: list[int], merge: int) -> torch.Tensor:
    """[3, t * h/merge * w/merge] (t, row, col) positions of one item's tokens, starting at 0."""
    t, h, w = grid[0], grid[1] // merge, grid[2] // merge
    tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack((tt, hh, ww)).flatten(1)


def _next_grid(grids: dict[int, Iterator], kind: int) -> list[int]:
    grid = next(grids.get(kind, iter(())), None)
    if grid is None:
        raise PlaceholderMismatchError(_grid_mismatch(kind))
    return grid


def _grid_mismatch(kind: int) -> str:
    name = "image" if kind == IMAGE else "video"
    return (
        f"The {name} placeholder tokens do not match {name}_grid_thw (more or fewer tokens than the grids "
        f"describe). Pass input_ids, mm_token_type_ids and {name}_grid_thw from the same processor call."
    )


# ----------------------------------------------------------------------------------------------- model


class Qwen2VLModel(OwnedBaseModel, nn.Module):
    """Holds `visual` and `language_model`, so parameter names match transformers 5's `model.*`; its forward
    gives the final hidden states (`OwnedBaseModel`)."""

    def __init__(self, config: Qwen2VLConfig):
        super().__init__()
        self.visual = Qwen2VisionTransformer(config.vision_config)
        self.language_model = Qwen2Model(config.text_config)


class Qwen2VLForConditionalGeneration(TextContractMixin, PreTrainedModel):
    config_class = Qwen2VLConfig
    # pre-v5 hub weight names -> transformers 5 names
    checkpoint_rename: ClassVar[list[tuple[str, str]]] = [
        (r"^visual\.", "model.visual."),
        (r"^model\.(layers|embed_tokens|norm)\.", r"model.language_model.\1."),
    ]
    tied_weights: ClassVar[dict[str, str]] = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: Qwen2VLConfig):
        super().__init__(config)
        text = config.text_config
        self.model = Qwen2VLModel(config)
        own(self, self.model)
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.tie_weights()

    # -- the model contract (docs/architecture.md); embed_inputs, forward_text, compute_logits and
    # new_kv_cache come from TextContractMixin ------------------------------------------------------

    def get_media_features(
        self,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        **ignored,
    ) -> dict[int, torch.Tensor]:
        """Placeholder token id -> merged vision features [n_tokens, hidden] (all items concatenated)."""
        features = {}
        visual = self.model.visual
        if pixel_values is not None:
            features[self.config.image_token_id] = visual(pixel_values, _required(image_grid_thw, "image"))
        if pixel_values_videos is not None:
            features[self.config.video_token_id] = visual(pixel_values_videos, _required(video_grid_thw, "video"))
        return features

    def get_position_ids(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        **ignored,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """M-RoPE positions [3, B, S] (padding skipped, padding slots 0) and delta [B] long."""
        types = mm_token_type_ids if mm_token_type_ids is not None else self._token_types(input_ids)
        grids = {IMAGE: image_grid_thw, VIDEO: video_grid_thw}
        return mrope_positions(types, attention_mask, grids, self.config.vision_config.spatial_merge_size)

    # -- transformers-style forward -----------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **ignored,
    ) -> CausalLMOutput:
        """Logits [B, S, V] (or the last `logits_to_keep`) and, with `labels`, the shifted LM loss."""
        embeds, position_ids, attention_mask = self.decoder_inputs(
            input_ids, attention_mask, position_ids, pixel_values, image_grid_thw, pixel_values_videos,
            video_grid_thw, mm_token_type_ids, inputs_embeds,
        )
        return self.lm_output(embeds, position_ids, attention_mask, labels, logits_to_keep)

    def decoder_inputs(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **ignored,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(embeddings with the media merged [B, S, hidden], M-RoPE positions [3, B, S], attention mask)."""
        media = {"pixel_values": pixel_values, "image_grid_thw": image_grid_thw,
                 "pixel_values_videos": pixel_values_videos, "video_grid_thw": video_grid_thw}
        embeds = self.forward_embeddings(input_ids, inputs_embeds, media)
        if position_ids is None:
            position_ids = self._forward_positions(input_ids, attention_mask, mm_token_type_ids, embeds, media)
        return embeds, _three_rows(position_ids), attention_mask

    def _forward_positions(self, input_ids, attention_mask, mm_token_type_ids, embeds, media) -> torch.Tensor:
        has_grids = media["image_grid_thw"] is not None or media["video_grid_thw"] is not None
        if has_grids and input_ids is not None:
            return self.get_position_ids(input_ids, attention_mask, media["image_grid_thw"],
                                         media["video_grid_thw"], mm_token_type_ids)[0]
        # Text only: like transformers' forward, plain 0..S-1 whatever the padding (generate() passes
        # padding-aware positions through get_position_ids instead); _three_rows makes it [3, B, S].
        return plain_positions(embeds)

    def _token_types(self, input_ids: torch.Tensor) -> torch.Tensor:
        types = torch.zeros_like(input_ids)
        types[input_ids == self.config.image_token_id] = IMAGE
        types[input_ids == self.config.video_token_id] = VIDEO
        return types


def _required(grid: torch.Tensor | None, name: str) -> torch.Tensor:
    if grid is None:
        raise PlaceholderMismatchError(f"{name} pixels were given without {name}_grid_thw: pass both.")
    return grid


def _three_rows(position_ids: torch.Tensor) -> torch.Tensor:
    """User positions: [B, S] -> [3, B, S]; transformers' packed [4, B, S] drops the text row."""
    if position_ids.dim() == 2:
        return position_ids[None].expand(3, -1, -1)
    return position_ids[1:] if position_ids.shape[0] == 4 else position_ids


Qwen2VLModel.owner_class = Qwen2VLForConditionalGeneration
