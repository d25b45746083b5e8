"""Ovis2: an AIMv2-style tower read as a visual tokenizer, a visual embedding table, a Qwen2 decoder.

Notable features (in data-flow order):
- vision tower (models/vision/aimv2.py) over fixed-size tiles [N, 3, S, S] -> [N, g * g, d];
- hidden_stride merging: each s x s window of neighbouring patches is concatenated into one vector
  [N, t * t, s * s * d]. The patch grid is padded with zeros up to a multiple of s first, so ANY grid side
  works (transformers 5.23 pads the wrong dimensions and crashes on odd sides: docs/compatibility.md);
- visual tokenizer head: head_linear -> LayerNorm -> logits over the visual words (the indicator slots
  excluded) -> `tokenize_function`: softmax, gumbel_argmax (hard Gumbel-softmax, random) or st_argmax
  (straight-through one-hot);
- visual embedding: probabilities x the visual embedding table (a soft lookup), the indicator slots
  getting probability 0; the last `num_visual_indicator_tokens` rows of the table embed <IMG_START>,
  <IMG_GRID>, <IMG_COL>, <IMG_ROW>, <IMG_END>;
- the tile features fill the <IMG_ATOM> placeholders in order; when an image is given, every indicator
  token takes its table row instead of its text embedding (as transformers does);
- engine view: given each image's (rows, cols), `get_media_features` returns one row per token of the
  image's contiguous span <IMG_START> ... <IMG_END> (indicator rows included), so a media item is a plain
  token range that can be cached by content hash and split across prefill chunks;
- Qwen2 decoder (models/text/qwen2.py) with 1-D RoPE and tied input / output embeddings;
- the model contract of docs/architecture.md (`get_media_features`, `embed_inputs`, `get_position_ids`
  with delta = -left padding, `forward_text`, `compute_logits`, `new_kv_cache`), a transformers-style
  `forward` with the loss, and `get_image_features` (the tile embeddings and the indicator embeddings).
Checked against transformers 5.23 `Ovis2ForConditionalGeneration` (tests/test_ovis2_model.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import PlaceholderMismatchError, UnsupportedFeatureError
from ...modeling_utils import CausalLMOutput, OwnedBaseModel, PreTrainedModel, TextContractMixin, own
from ..text.qwen2 import Qwen2Model
from ..vision.aimv2 import AIMv2VisionTransformer
from .config import Ovis2Config, Ovis2VisionConfig

__all__ = [
    "Ovis2ForConditionalGeneration",
    "Ovis2ImageFeatures",
    "Ovis2Model",
    "Ovis2VisualTokenizer",
    "merge_neighbours",
    "span_rows",
]

# ----------------------------------------------------------------------------------------------- vision


def merge_neighbours(hidden: torch.Tensor, stride: int) -> torch.Tensor:
    """[N, g * g, d] -> [N, t * t, stride * stride * d] with t = ceil(g / stride), row-major windows.

    The g x g grid is zero-padded at the bottom and the right up to t * stride, so an odd side works.
    """
    count, length, dim = hidden.shape
    side = round(length**0.5)
    if side * side != length:
        raise UnsupportedFeatureError(
            f"hidden_stride merging needs a square patch grid, got {length} patches."
        )
    tokens = -(-side // stride)
    pad = tokens * stride - side
    grid = F.pad(hidden.view(count, side, side, dim), (0, 0, 0, pad, 0, pad))  # [N, t*s, t*s, d]
    windows = grid.view(count, tokens, stride, tokens, stride, dim).permute(0, 1, 3, 2, 4, 5)
    return windows.reshape(count, tokens * tokens, stride * stride * dim)  # [N, t*t, s*s*d]


def straight_through_argmax(logits: torch.Tensor) -> torch.Tensor:
    """One-hot of the argmax in the forward pass, softmax gradients in the backward pass."""
    soft = logits.softmax(-1)
    hard = torch.zeros_like(soft).scatter_(-1, soft.argmax(-1, keepdim=True), 1.0)
    return hard - soft.detach() + soft


class Ovis2VisualTokenizer(nn.Module):
    """Tiles -> probabilities over the visual words (the checkpoint's `vision_tower`)."""

    def __init__(self, config: Ovis2VisionConfig):
        super().__init__()
        self.config = config
        words = config.vocab_size - config.num_visual_indicator_tokens
        self.transformer = AIMv2VisionTransformer(config)
        self.head_linear = nn.Linear(config.hidden_size * config.hidden_stride**2, words, bias=False)
        self.head_norm = nn.LayerNorm(words)

    def merged_hidden(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] -> merged hidden states [N, t * t, s * s * d]."""
        hidden = self.transformer(pixel_values)  # [N, g * g, d]
        stride = self.config.hidden_stride
        return merge_neighbours(hidden, stride) if stride > 1 else hidden

    def tokenize(self, logits: torch.Tensor) -> torch.Tensor:
        kind = self.config.tokenize_function
        if kind == "gumbel_argmax":
            return F.gumbel_softmax(logits, dim=-1, hard=True)
        if kind == "st_argmax":
            return straight_through_argmax(logits)
        return logits.softmax(-1)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(probabilities [N, T, words], merged hidden [N, T, s * s * d])."""
        hidden = self.merged_hidden(pixel_values)
        return self.tokenize(self.head_norm(self.head_linear(hidden))), hidden


def span_rows(tiles: torch.Tensor, rows: int, cols: int, marks: torch.Tensor) -> list[torch.Tensor]:
    """One image's span in the order of the processor's placeholder text: <IMG_START>, thumbnail rows,
    <IMG_GRID>, then the tiles row by row with <IMG_COL> / <IMG_ROW> between them, <IMG_END>.

    tiles [1 or 1 + rows * cols, T, hidden]; marks [5, 1, hidden] (START, GRID, COL, ROW, END).
    """
    start, grid_mark, col_mark, row_mark, end = marks
    pieces = [start, tiles[0], grid_mark]
    if rows * cols > 1:
        for r in range(rows):
            for c in range(cols):
                pieces += [tiles[1 + r * cols + c]] if c == 0 else [col_mark, tiles[1 + r * cols + c]]
            pieces += [row_mark] if r < rows - 1 else []
    return [*pieces, end]


# ----------------------------------------------------------------------------------------------- model


@dataclass
class Ovis2ImageFeatures:
    """What `get_image_features` returns (transformers' field names)."""

    pooler_output: torch.Tensor  # [N_tiles, T, hidden]: the visual embeddings of each tile's tokens
    visual_indicator_features: torch.Tensor  # [num_indicators, hidden]: <IMG_START> ... <IMG_END>
    last_hidden_state: torch.Tensor  # [N_tiles, T, s * s * d]: merged tower output, before the head

    def __getitem__(self, key: str) -> torch.Tensor:
        return getattr(self, key)


class Ovis2Model(OwnedBaseModel, nn.Module):
    """Holds `vision_tower`, `language_model` and `visual_embeddings_table` (transformers 5's `model.*`)."""

    def __init__(self, config: Ovis2Config):
        super().__init__()
        self.config = config
        self.vision_tower = Ovis2VisualTokenizer(config.vision_config)
        self.language_model = Qwen2Model(config.text_config)
        self.visual_embeddings_table = nn.Embedding(config.vision_config.vocab_size, config.hidden_size)

    def get_image_features(self, pixel_values: torch.Tensor, **ignored) -> Ovis2ImageFeatures:
        """Tiles [N, 3, S, S] -> tile embeddings [N, T, hidden] and the indicator embeddings."""
        probs, hidden = self.vision_tower(pixel_values)  # [N, T, words]
        table = self.visual_embeddings_table.weight  # [words + indicators, hidden]
        words = probs.shape[-1]
        # the indicator slots have probability 0: multiplying by the word rows only is the same sum
        embeds = probs.to(table.dtype) @ table[:words]  # [N, T, hidden]
        return Ovis2ImageFeatures(embeds, table[words:], hidden)

    def indicator_embeddings(self) -> torch.Tensor:
        """[num_indicators, hidden]: the table rows of <IMG_START>, <IMG_GRID>, <IMG_COL>, <IMG_ROW>, <IMG_END>."""
        count = self.config.vision_config.num_visual_indicator_tokens
        return self.visual_embeddings_table.weight[self.visual_embeddings_table.num_embeddings - count :]


class Ovis2ForConditionalGeneration(TextContractMixin, PreTrainedModel):
    config_class = Ovis2Config
    # older LLaVA-style names -> transformers 5 names (transformers 5.23 itself saves the latter)
    checkpoint_rename: ClassVar[list[tuple[str, str]]] = [
        (r"^language_model\.model\.", "model.language_model."),
        (r"^language_model\.lm_head\.", "lm_head."),
        (r"^(vision_tower|visual_embeddings_table)\.", r"model.\1."),
    ]
    tied_weights: ClassVar[dict[str, str]] = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: Ovis2Config):
        super().__init__(config)
        self.model = Ovis2Model(config)
        own(self, self.model)
        self.lm_head = nn.Linear(config.hidden_size, config.text_config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.tie_weights()

    def get_image_features(self, pixel_values: torch.Tensor, **ignored) -> Ovis2ImageFeatures:
        return self.model.get_image_features(pixel_values)

    # -- the model contract (docs/architecture.md); embed_inputs, get_position_ids (1-D), forward_text,
    # compute_logits and new_kv_cache come from TextContractMixin, with `merge_media` overridden ----

    def get_media_features(
        self, pixel_values: torch.Tensor | None = None, grids: torch.Tensor | None = None, **ignored
    ) -> dict[int, torch.Tensor]:
        """{<IMG_ATOM> id: features} for the images' tiles, in order.

        Without `grids` (transformers' processor outputs, `generate()`): the atoms' rows [N_tiles * T, hidden].
        With `grids` [n_images, 2] (rows, cols), e.g. the processor report's `grid_thw` of each item: one row
        per token of each image's whole span <IMG_START> ... <IMG_END> (indicator rows from the visual table),
        so an item's features cover a contiguous token range, as the engine's media items do.
        """
        if pixel_values is None:
            return {}
        tiles = self.model.get_image_features(pixel_values).pooler_output  # [N_tiles, T, hidden]
        if grids is None:
            return {self.config.image_token_id: tiles.flatten(0, 1)}
        return {self.config.image_token_id: self._span_features(tiles, grids)}

    def _span_features(self, tiles: torch.Tensor, grids) -> torch.Tensor:
        """Tile embeddings [N_tiles, T, hidden] -> the rows of every image span [sum span_len, hidden]."""
        marks = self.model.indicator_embeddings().to(tiles.dtype)[:, None]  # [num_indicators, 1, hidden]
        pieces, first = [], 0
        for rows, cols in torch.as_tensor(grids).view(-1, 2).tolist():
            count = 1 if rows * cols == 1 else rows * cols + 1  # the thumbnail first when tiled
            pieces += span_rows(tiles[first : first + count], rows, cols, marks)
            first += count
        if first != tiles.shape[0]:
            raise PlaceholderMismatchError(
                f"grids describe {first} tiles but pixel_values has {tiles.shape[0]}: pass the grids of the "
                "same processor call."
            )
        return torch.cat(pieces)

    def merge_media(
        self, embeds: torch.Tensor, input_ids: torch.Tensor, features: dict[int, torch.Tensor]
    ) -> torch.Tensor:
        """Atom rows fill the <IMG_ATOM> tokens and every indicator token takes its visual-table row (as
        transformers does when an image is given); span rows fill atoms and indicators in order."""
        values = self._image_rows(features)
        if values is None:
            return embeds  # text only (or a decode step): indicator tokens keep their text embeddings
        atoms = input_ids == self.config.image_token_id
        indicator_ids = torch.tensor(self.config.visual_indicator_token_ids, device=input_ids.device)
        where = input_ids[..., None] == indicator_ids  # [B, S, num_indicators]
        span = atoms | where.any(-1)
        if values.shape[0] == int(span.sum()) != int(atoms.sum()):  # span rows: atoms and indicators
            return embeds.masked_scatter(span[..., None], values.to(embeds.dtype))
        if values.shape[0] != int(atoms.sum()):
            raise PlaceholderMismatchError(
                f"The text has {int(atoms.sum())} <IMG_ATOM> tokens ({int(span.sum())} with the indicator "
                f"tokens) but the images give {values.shape[0]} feature rows. Use the processor's input_ids "
                "with the pixel_values of the same call."
            )
        embeds = embeds.masked_scatter(atoms[..., None], values.to(embeds.dtype))
        rows = self.model.indicator_embeddings().to(embeds.dtype)[where.float().argmax(-1)]  # [B, S, hidden]
        return torch.where(where.any(-1, keepdim=True), rows, embeds)

    def _image_rows(self, features: dict[int, torch.Tensor]) -> torch.Tensor | None:
        """The image rows, keyed by <IMG_ATOM> or, for span rows grouped by the first token of a chunk of
        the span (what the engine's `gather_media_features` does), by one indicator token id."""
        span_ids = [self.config.image_token_id, *self.config.visual_indicator_token_ids]
        keys = [key for key in features if key in span_ids]
        if len(keys) > 1:
            raise PlaceholderMismatchError(
                f"Image rows came under several token ids {keys}: give all of them under "
                f"{self.config.image_token_id} (<IMG_ATOM>) in token order."
            )
        return features[keys[0]] if keys else None

    # -- transformers-style forward -----------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **ignored,
    ) -> CausalLMOutput:
        """Logits [B, S, V] (or the last `logits_to_keep`) and, with `labels`, the shifted LM loss."""
        embeds, position_ids, attention_mask = self.decoder_inputs(
            input_ids, pixel_values, attention_mask, position_ids, inputs_embeds
        )
        return self.lm_output(embeds, position_ids, attention_mask, labels, logits_to_keep)

    def decoder_inputs(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **ignored,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(embeddings with the media merged [B, S, hidden], positions or None, attention mask)."""
        embeds = self.forward_embeddings(input_ids, inputs_embeds, {"pixel_values": pixel_values})
        return embeds, position_ids, attention_mask


Ovis2Model.owner_class = Ovis2ForConditionalGeneration
