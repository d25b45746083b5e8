"""LLaVA-OneVision: a SigLIP tower over anyres tiles, a 2-layer GELU projector, and a Qwen2 decoder.

Notable features (in data-flow order):
- vision: every tile of every image (zero-padding tiles dropped using `image_sizes`) and every video
  frame goes through the SigLIP tower in one batch; `vision_feature_layer` picks one hidden state or
  concatenates several (the tower stops at the deepest one); strategy "default" drops the first token;
- projector: linear_1 -> GELU -> linear_2, over the selected features;
- `pack_image_features`: anyres images put their tiles' features back on one 2-D grid, cut the rows or
  columns that were padding (the original aspect ratio), downsample bilinearly when the grid holds more
  than anyres_max_N tiles' worth of patches, append `image_newline` after each row, and follow the base
  tile's features; an image of a multi-image sample is its one tile + one newline;
- videos: per-frame features pooled 2x2 (bilinear, ceil), frames concatenated, one newline per video;
- media features replace the `<image>` / `<video>` placeholders (the counts come from the same geometry
  as the processor's, `processing.feature_grid`); a mismatch raises `PlaceholderMismatchError`;
- the Qwen2 decoder with 1-D RoPE: positions cumsum(mask) - 1 for generation (delta = -left padding),
  0..S-1 in `forward` as transformers;
- the model contract of docs/architecture.md plus a transformers-style `forward` with the loss.
Checked against transformers 5.23 `LlavaOnevisionForConditionalGeneration`
(tests/test_llava_onevision_model.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import MediaError, PlaceholderMismatchError, UnsupportedFeatureError
from ...layers.mlp import activation
from ...modeling_utils import CausalLMOutput, OwnedBaseModel, PreTrainedModel, TextContractMixin, own
from ..text.qwen2 import Qwen2Model
from ..vision.siglip import SiglipVisionTransformer
from .config import LlavaOnevisionConfig
from .processing import best_resolution, feature_grid

# ----------------------------------------------------------------------------------------------- projector


class LlavaOnevisionMultiModalProjector(nn.Module):
    def __init__(self, config: LlavaOnevisionConfig):
        super().__init__()
        vision_width = config.vision_config.hidden_size * len(config.feature_layers)
        hidden, bias = config.text_config.hidden_size, config.multimodal_projector_bias
        self.linear_1 = nn.Linear(vision_width, hidden, bias=bias)
        self.act = activation(config.projector_hidden_act)
        self.linear_2 = nn.Linear(hidden, hidden, bias=bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


# ----------------------------------------------------------------------------------------------- model


class LlavaOnevisionModel(OwnedBaseModel, nn.Module):
    """vision_tower + multi_modal_projector + image_newline + language_model (transformers 5 names)."""

    def __init__(self, config: LlavaOnevisionConfig):
        super().__init__()
        self.config = config
        self.vision_tower = SiglipVisionTransformer(config.vision_config)
        self.multi_modal_projector = LlavaOnevisionMultiModalProjector(config)
        self.image_newline = nn.Parameter(torch.empty(config.text_config.hidden_size))
        self.language_model = Qwen2Model(config.text_config)

    @property
    def patches(self) -> int:
        """Patches per tile side (image_size // patch_size)."""
        return self.config.vision_config.grid

    def project(self, pixels: torch.Tensor, grid: bool = False) -> torch.Tensor:
        """Tiles / frames [N, 3, S, S] -> projected features [N, P * P, hidden].

        `grid`: the features are laid back on a 2-D grid (anyres tiles, video frames), which needs all
        P * P of them: strategy "default" (drop the first token) fails there in transformers too.
        """
        if grid and self.config.vision_feature_select_strategy == "default":
            raise UnsupportedFeatureError(
                "vision_feature_select_strategy='default' drops a patch, so anyres images and videos cannot "
                "be laid on their grid: use 'full' (what LLaVA-OneVision checkpoints use)."
            )
        states = self.vision_tower.hidden_states(pixels, self.config.feature_layers)
        features = torch.cat(states, dim=-1)  # [N, P * P, vision_hidden * len(layers)]
        if self.config.vision_feature_select_strategy == "default":
            features = features[:, 1:]
        return self.multi_modal_projector(features)

    # -- images ------------------------------------------------------------------------------------

    def image_tile_counts(self, image_sizes: torch.Tensor, anyres: Sequence[bool]) -> list[int]:
        """Real tiles per image: base + the best pinpoint's tiles (anyres), or 1 in multi-image samples."""
        tile = self.config.vision_config.image_size
        counts = []
        for (height, width), use_anyres in zip(image_sizes.tolist(), anyres):
            pin_h, pin_w = best_resolution(height, width, self.config.image_grid_pinpoints)
            counts.append(math.ceil(pin_h / tile) * math.ceil(pin_w / tile) + 1 if use_anyres else 1)
        return counts

    def image_features(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor,
        batch_num_images: Sequence[int] | None = None,
        image_anyres: Sequence[bool] | None = None,
    ) -> list[torch.Tensor]:
        """pixel_values [num_images, max_tiles, 3, S, S] (or the real tiles [N, 3, S, S]) -> [n_i, hidden]."""
        if image_anyres is None:
            image_anyres = anyres_flags(batch_num_images, len(image_sizes))
        counts = self.image_tile_counts(image_sizes, image_anyres)
        if pixel_values.dim() == 5:  # drop the zero tiles that only pad the batch
            pixel_values = torch.cat([tiles[:n] for tiles, n in zip(pixel_values, counts)])
        features = self.project(pixel_values, grid=any(image_anyres)).split(
            counts
        )  # [tiles_i, P * P, hidden]
        return [self.pack_image(f, size) for f, size in zip(features, image_sizes.tolist())]

    def pack_image(self, features: torch.Tensor, image_size: Sequence[int]) -> torch.Tensor:
        """One image's tile features [T, P * P, hidden] -> its token features [n, hidden]."""
        newline = self.image_newline.to(features.dtype)
        if features.shape[0] == 1:  # one tile (multi-image sample): its features + a newline
            return torch.cat([features[0], newline[None]])
        grid = feature_grid(
            *image_size,
            self.config.image_grid_pinpoints,
            self.config.vision_config.image_size,
            self.patches,
            self.config.max_num_patches,
        )
        canvas = self._tiles_to_canvas(features[1:], grid.tiles)  # [hidden, rows, cols]
        rows, cols = grid.unpadded
        top, left = (canvas.shape[1] - rows) // 2, (canvas.shape[2] - cols) // 2
        canvas = canvas[:, top : top + rows, left : left + cols]
        if grid.final is not None:  # anyres_max_N: too many patches, downsample the grid
            canvas = F.interpolate(canvas[None], size=grid.final, mode="bilinear")[0]
        hidden, rows, cols = canvas.shape
        newlines = newline[:, None, None].expand(hidden, rows, 1)
        canvas = torch.cat([canvas, newlines], dim=2)  # [hidden, rows, cols + 1]
        return torch.cat([features[0], canvas.flatten(1).t()])

    def _tiles_to_canvas(self, tiles: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """[th * tw, P * P, hidden] row-major tiles -> one feature map [hidden, th * P, tw * P]."""
        p = self.patches
        x = tiles.view(grid[0], grid[1], p, p, -1)  # [th, tw, P, P, hidden]
        x = x.permute(4, 0, 2, 1, 3)  # [hidden, th, P (rows), tw, P (cols)]
        return x.reshape(x.shape[0], grid[0] * p, grid[1] * p)

    # -- videos ------------------------------------------------------------------------------------

    def video_features(self, pixel_values_videos: torch.Tensor) -> list[torch.Tensor]:
        """[num_videos, T, 3, S, S] -> per video [T * ceil(P / 2)^2 + 1, hidden]."""
        videos = pixel_values_videos.shape[0]
        features = self.project(pixel_values_videos.flatten(0, 1), grid=True)  # [V * T, P * P, hidden]
        p, hidden = self.patches, features.shape[-1]
        maps = features.view(-1, p, p, hidden).permute(0, 3, 1, 2)  # [V * T, hidden, P, P]
        pooled = F.interpolate(maps, size=(math.ceil(p / 2), math.ceil(p / 2)), mode="bilinear")
        pooled = pooled.permute(0, 2, 3, 1).reshape(videos, -1, hidden)  # [V, T * p2 * p2, hidden]
        newline = self.image_newline.to(pooled.dtype)[None, None].expand(videos, 1, hidden)
        return list(torch.cat([pooled, newline], dim=1))


def anyres_flags(batch_num_images: Sequence[int] | None, num_images: int) -> list[bool]:
    """Which images are tiled (anyres): those alone in their sample (transformers' rule)."""
    groups = [int(n) for n in batch_num_images] if batch_num_images is not None else [1] * num_images
    flags = [n == 1 for n in groups for _ in range(n)]
    if len(flags) != num_images:
        raise MediaError(
            f"batch_num_images={groups} counts {len(flags)} images but image_sizes has {num_images}: pass "
            "the processor's outputs unchanged."
        )
    return flags


class LlavaOnevisionForConditionalGeneration(TextContractMixin, PreTrainedModel):
    config_class = LlavaOnevisionConfig
    # weight names of hub checkpoints (and of transformers' own saves) -> transformers 5 module names
    checkpoint_rename: ClassVar[list[tuple[str, str]]] = [
        (r"^language_model\.model\.", "model.language_model."),
        (r"^language_model\.lm_head\.", "lm_head."),
        (r"^vision_tower\.(vision_model\.)?", "model.vision_tower."),
        (r"^multi_modal_projector\.", "model.multi_modal_projector."),
        (r"^image_newline$", "model.image_newline"),
    ]
    tied_weights: ClassVar[dict[str, str]] = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: LlavaOnevisionConfig):
        super().__init__(config)
        text = config.text_config
        self.model = LlavaOnevisionModel(config)
        own(self, self.model)
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.tie_weights()

    # -- the model contract (docs/architecture.md); embed_inputs, get_position_ids (1-D), forward_text,
    # compute_logits and new_kv_cache come from TextContractMixin ----------------------------------

    def get_media_features(
        self,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        batch_num_images: Sequence[int] | torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        image_anyres: Sequence[bool] | None = None,
        **ignored,
    ) -> dict[int, torch.Tensor]:
        """Placeholder token id -> features [n_tokens, hidden] (all items of the batch, in order).

        `image_anyres` (ocula) says per image whether it is tiled, instead of `batch_num_images`: what
        `item_inputs` passes to encode one image of a multi-image sample on its own.
        """
        features = {}
        if pixel_values is not None:
            if image_sizes is None:
                raise PlaceholderMismatchError(
                    "pixel_values were given without image_sizes: pass both (the "
                    "processor returns them together)."
                )
            sizes = torch.as_tensor(image_sizes)
            images = self.model.image_features(pixel_values, sizes, batch_num_images, image_anyres)
            features[self.config.image_token_id] = torch.cat(images)
        if pixel_values_videos is not None:
            features[self.config.video_token_id] = torch.cat(self.model.video_features(pixel_values_videos))
        return features

    def item_inputs(self, inputs: dict, modality: str, index: int) -> dict:
        """The `get_media_features` arguments that encode only image / video `index` of processor outputs."""
        if modality == "video":
            return {"pixel_values_videos": inputs["pixel_values_videos"][index : index + 1]}
        sizes = inputs["image_sizes"]
        anyres = anyres_flags(inputs.get("batch_num_images"), len(sizes))[index]
        return {
            "pixel_values": inputs["pixel_values"][index : index + 1],
            "image_sizes": sizes[index : index + 1],
            "image_anyres": [anyres],
        }

    # -- transformers-style forward -----------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        batch_num_images: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **ignored,
    ) -> CausalLMOutput:
        """Logits [B, S, V] (or the last `logits_to_keep`) and, with `labels`, the shifted LM loss."""
        embeds, position_ids, attention_mask = self.decoder_inputs(
            input_ids, pixel_values, image_sizes, pixel_values_videos, attention_mask, position_ids,
            inputs_embeds, batch_num_images,
        )
        return self.lm_output(embeds, position_ids, attention_mask, labels, logits_to_keep)

    def decoder_inputs(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        batch_num_images: torch.Tensor | None = None,
        **ignored,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(embeddings with the media merged [B, S, hidden], positions or None, attention mask)."""
        media = {
            "pixel_values": pixel_values,
            "image_sizes": image_sizes,
            "batch_num_images": batch_num_images,
            "pixel_values_videos": pixel_values_videos,
        }
        return self.forward_embeddings(input_ids, inputs_embeds, media), position_ids, attention_mask


LlavaOnevisionModel.owner_class = LlavaOnevisionForConditionalGeneration
