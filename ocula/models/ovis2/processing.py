"""Ovis2 preprocessing: the tiling image processor and the processor that ties it to the text.

Notable features:
- tiles: with `crop_to_patches` (and max_patches > 1) an image becomes a grid of `size` tiles, plus a
  thumbnail of the whole image first when the grid has more than one tile. The grid is the covering-area
  grid (`use_covering_area_grid`: the fewest tiles covering > 90 % of the image) or the canvas with the
  closest aspect ratio among min_patches..max_patches tiles;
- the grid follows transformers' HF-format preprocessing exactly, including its transposition of the
  covering grid (a wide image gets more rows than columns) and one resize of the whole image to the canvas;
  the original AIDC preprocessing differs (docs/compatibility.md);
- uint8 in, PIL bicubic resizes (bit-identical to transformers' PIL image processor), one table lookup for
  rescale + CLIP normalisation. pixel_values is float32 `[total_tiles, 3, S, S]`; `grids` [n, 2] holds each
  image's (rows, cols) (transformers' processor drops it from the output, as here);
- the processor expands each plain-text `<image>` into `<IMG_START>`, the thumbnail's atoms, `<IMG_GRID>`,
  then the tiles' atoms row by row (`<IMG_COL>` between tiles, `<IMG_ROW>` between rows), `<IMG_END>`;
  `image_seq_length` atoms (<IMG_ATOM>) per tile;
- the per-image report (`process().media`) covers each image's contiguous span from <IMG_START> to
  <IMG_END>, with its (rows, cols) in `grid_thw` (the model's `get_media_features(grids=...)` fills it).
Checked against transformers 5.23 `models/ovis2/{image_processing_pil_ovis2, processing_ovis2}.py`
(tests/test_ovis2_processing.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from functools import cache
from typing import Any, ClassVar

import numpy as np
import torch

from ...batch import BatchFeature
from ...errors import MediaError
from ...image_processing_utils import (
    ImageOptions,
    flatten_images,
    lookup,
    normalize_table,
    pil_resize,
    to_rgb_array,
)
from ...processing_utils import MediaItem, ProcessorMixin

__all__ = [
    "Ovis2ImageProcessor",
    "Ovis2Processor",
    "closest_canvas",
    "covering_grid",
    "image_placeholder",
    "span_length",
    "tile_grid",
]

COVERING_THRESHOLD = 0.9  # a grid "covers" the image when its tiles keep > 90 % of the image area


# ----------------------------------------------------------------------------------------------- grids


def _grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """All (a, b) with min_tiles <= a * b <= max_tiles, ordered by tile count (stable within a count)."""
    grids = [
        (a, b)
        for a in range(1, max_tiles + 1)
        for b in range(1, max_tiles + 1)
        if min_tiles <= a * b <= max_tiles
    ]
    return sorted(grids, key=lambda g: g[0] * g[1])


def _covered_area(width: int, height: int, side: int) -> float:
    """Area of a region kept by a square tile of `side` after an aspect-preserving downscale."""
    long, short = max(width, height), min(width, height)
    if long > side:
        short, long = short / long * side, side
    return long * short


def _regions(height: int, width: int, rows: int, cols: int) -> list[tuple[int, int]]:
    """(width, height) of each cell of a rows x cols split; the last row / column takes the remainder."""
    row_h, col_w = height // rows, width // cols
    return [
        (width - c * col_w if c == cols - 1 else col_w, height - r * row_h if r == rows - 1 else row_h)
        for r in range(rows)
        for c in range(cols)
    ]


@cache
def covering_grid(height: int, width: int, side: int, max_tiles: int) -> tuple[int, int]:
    """(rows, cols) of the fewest tiles covering > 90 % of the image (the best-covering grid otherwise).

    Ties in tile count go to the better coverage; as in the original Ovis preprocessing, min_patches does not
    apply here.
    """
    scored = []
    for rows, cols in _grids(1, max_tiles):
        covered = sum(_covered_area(w, h, side) for w, h in _regions(height, width, rows, cols))
        scored.append(((rows, cols), covered / (height * width)))
    enough = [s for s in scored if s[1] > COVERING_THRESHOLD]
    if enough:
        return min(enough, key=lambda s: (s[0][0] * s[0][1], -s[1]))[0]
    return min(scored, key=lambda s: (-s[1], s[0][0] * s[0][1]))[0]


@cache
def closest_canvas(height: int, width: int, tile: tuple[int, int], min_tiles: int, max_tiles: int):
    """(cols, rows) whose aspect ratio is closest to the image's; on a tie the later (larger) grid wins
    when the image is bigger than half of its canvas."""
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in _grids(min_tiles, max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile[0] * tile[1] * cols * rows:
            best = (cols, rows)
    return best


def tile_grid(
    height: int, width: int, tile: tuple[int, int], min_tiles: int, max_tiles: int, covering: bool
) -> tuple[int, int]:
    """(rows, cols) of the canvas an image is resized to, exactly as transformers computes it.

    Trap: transformers reads the covering grid, which is (rows, cols), as (cols, rows): a wide image is
    tiled with more rows than columns. HF-format checkpoints ship with this preprocessing, so ocula keeps it
    (docs/compatibility.md).
    """
    if covering:
        cols, rows = covering_grid(height, width, tile[0], max_tiles)
    else:
        cols, rows = closest_canvas(height, width, tile, min_tiles, max_tiles)
    return rows, cols


# ------------------------------------------------------------------------------------------ image processor


@dataclasses.dataclass
class Ovis2ImageProcessor(ImageOptions):
    """Images -> `pixel_values` float32 `[total_tiles, 3, H, W]` and `grids` int64 `[n, 2]` (rows, cols).

    Resize / rescale / normalise options with CLIP defaults come from `ImageOptions`."""

    size: dict = dataclasses.field(default_factory=lambda: {"height": 384, "width": 384})  # the tile size
    crop_to_patches: bool = False  # tile the image (thumbnail first when more than one tile)
    min_patches: int = 1  # fewest tiles (closest-canvas grids only)
    max_patches: int = 12  # most tiles
    use_covering_area_grid: bool = True  # covering-area grid, else the closest-aspect canvas

    model_input_names: ClassVar[list[str]] = ["pixel_values"]

    def __post_init__(self) -> None:
        size = dict(self.size)
        if "height" not in size or "width" not in size:
            raise MediaError(
                f"Ovis2ImageProcessor needs size={{'height': H, 'width': W}}, got {self.size!r}."
            )
        self.size = {"height": int(size["height"]), "width": int(size["width"])}

    @property
    def tile(self) -> tuple[int, int]:
        return self.size["height"], self.size["width"]

    def load(self, images: Any) -> list[np.ndarray]:
        """Decode every image (a flat or per-sample nested list) into uint8 RGB `[H, W, 3]`."""
        return [to_rgb_array(image) for image in flatten_images(images)]

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of an image of that size; (1, 1) when it is not tiled."""
        if not (self.crop_to_patches and self.max_patches > 1):
            return 1, 1
        return tile_grid(
            height, width, self.tile, self.min_patches, self.max_patches, self.use_covering_area_grid
        )

    def tiles(self, image: np.ndarray) -> tuple[list[np.ndarray], tuple[int, int]]:
        """uint8 `[H, W, 3]` -> the uint8 tiles (thumbnail first when several) and (rows, cols)."""
        rows, cols = self.grid(*image.shape[:2])
        if not (self.crop_to_patches and self.max_patches > 1):
            return [self._resized(image)], (rows, cols)
        tile_h, tile_w = self.tile
        canvas = pil_resize(image, tile_h * rows, tile_w * cols, self.resample)  # one resize to the canvas
        canvas = canvas.reshape(rows, tile_h, cols, tile_w, 3).swapaxes(1, 2)  # [rows, cols, h, w, 3]
        tiles = [self._resized(t) for t in canvas.reshape(rows * cols, tile_h, tile_w, 3)]
        if len(tiles) > 1:
            tiles.insert(0, pil_resize(image, tile_h, tile_w, self.resample))  # the thumbnail
        return tiles, (rows, cols)

    def _resized(self, image: np.ndarray) -> np.ndarray:
        return pil_resize(image, *self.tile, self.resample) if self.do_resize else image

    def run(
        self, images: list[np.ndarray], return_tensors: str | None = "pt", **kwargs: Any
    ) -> dict[str, Any]:
        """Tile, rescale and normalise decoded images (call-time overrides as keyword arguments)."""
        options = self.replace(**kwargs)
        table = normalize_table(
            options.do_rescale,
            options.rescale_factor,
            options.do_normalize,
            options.image_mean,
            options.image_std,
        )
        tiles, grids = [], []
        for image in images:
            pieces, grid = options.tiles(image)
            tiles += pieces
            grids.append(grid)
        if len({t.shape for t in tiles}) > 1:
            raise MediaError(
                "do_resize=False needs images of one size (the tiles are stacked): resize them first."
            )
        pixels = np.ascontiguousarray(np.stack(tiles).transpose(0, 3, 1, 2))  # [N, 3, H, W] uint8
        values = lookup(pixels, table, np.empty(pixels.shape, np.float32))
        grid = np.asarray(grids, dtype=np.int64).reshape(-1, 2)
        if return_tensors == "pt":
            return {"pixel_values": torch.from_numpy(values), "grids": torch.from_numpy(grid)}
        return {"pixel_values": values, "grids": grid}

    def __call__(self, images: Any, return_tensors: str | None = None, **kwargs: Any) -> BatchFeature:
        return BatchFeature(self.run(self.load(images), return_tensors, **kwargs), tensor_type=return_tensors)

    preprocess = __call__

    @classmethod
    def normalize_kwargs(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs = dict(kwargs)
        if isinstance(kwargs.get("size"), int):  # a bare side, as some hub configs write it
            kwargs["size"] = {"height": kwargs["size"], "width": kwargs["size"]}
        return kwargs


# ------------------------------------------------------------------------------------------- processor

IMG_ATOM, IMG_START, IMG_GRID, IMG_COL, IMG_ROW, IMG_END = (
    "<IMG_ATOM>", "<IMG_START>", "<IMG_GRID>", "<IMG_COL>", "<IMG_ROW>", "<IMG_END>",
)  # fmt: skip


def span_length(rows: int, cols: int, image_seq_length: int) -> int:
    """Tokens of `image_placeholder`: 3 indicators + the thumbnail's atoms, plus, when tiled, every tile's
    atoms and the <IMG_COL> / <IMG_ROW> separators between them."""
    tiles = rows * cols
    if tiles == 1:
        return 3 + image_seq_length
    return 3 + image_seq_length * (tiles + 1) + (tiles - 1)


def image_placeholder(rows: int, cols: int, image_seq_length: int) -> str:
    """The text an image becomes: thumbnail atoms, then (when tiled) the tiles row by row."""
    atoms = IMG_ATOM * image_seq_length
    text = f"{IMG_START}{atoms}{IMG_GRID}"
    if rows * cols > 1:
        text += IMG_ROW.join(IMG_COL.join([atoms] * cols) for _ in range(rows))
    return text + IMG_END


class Ovis2Processor(ProcessorMixin):
    """Ovis2's processor: the Qwen2 tokenizer, the tiling image processor and the chat template.

    `image_token` is the plain-text marker "<image>"; `image_token_id` is the model's placeholder token
    (<IMG_ATOM>), the one the features fill (transformers leaves it None: "<image>" is not a token).
    """

    image_processor_class = Ovis2ImageProcessor
    default_image_token = "<image>"
    processor_fields = ("image_seq_length",)

    def __init__(
        self,
        image_processor: Ovis2ImageProcessor | None = None,
        tokenizer=None,
        video_processor=None,
        chat_template: str | dict[str, str] | None = None,
        image_seq_length: int = 256,
        **unused: Any,
    ):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template)
        self.image_token = "<image>"  # fixed, as in transformers (a tokenizer attribute does not change it)
        self.image_seq_length = int(image_seq_length)
        self.image_token_id = self._token_id(IMG_ATOM)

    def _count(self, outputs: dict, modality: str) -> int:
        grids = outputs.get("grids") if modality == "image" else None
        return 0 if grids is None else len(grids)

    def item_grid(self, outputs: dict, modality: str, index: int) -> tuple[int, ...]:
        return tuple(int(x) for x in outputs["grids"][index])

    def item_rows(self, outputs: dict, modality: str, index: int) -> int:
        """Tiles of the image in pixel_values: the thumbnail plus rows x cols when tiled."""
        rows, cols = self.item_grid(outputs, modality, index)
        return 1 if rows * cols == 1 else rows * cols + 1

    def item_tokens(self, outputs: dict, modality: str, index: int) -> int:
        """Tokens of the image's whole span, <IMG_START> to <IMG_END> (atoms and indicator tokens)."""
        return span_length(*self.item_grid(outputs, modality, index), self.image_seq_length)

    def replace_image_token(self, image_outputs: dict, index: int) -> str:
        rows, cols = self.item_grid(image_outputs, "image", index)
        return image_placeholder(rows, cols, self.image_seq_length)

    def _locate_media(self, input_ids, owners, image_out, video_out) -> list[MediaItem]:
        """One item per image covering its contiguous span: `offset` is its <IMG_START>, `num_tokens` the
        span length (the atoms alone are not contiguous when the image is tiled)."""
        starts: dict[int, Iterator[int]] = {}
        items, first_row = [], 0
        start_id = self._token_id(IMG_START)
        for index, (_, sample) in enumerate(owners):
            if sample not in starts:
                starts[sample] = iter(np.flatnonzero(np.asarray(input_ids[sample]) == start_id).tolist())
            tiles = self.item_rows(image_out, "image", index)
            grid = self.item_grid(image_out, "image", index)
            items.append(
                MediaItem(
                    "image",
                    index,
                    sample,
                    self.image_token_id,
                    self.item_tokens(image_out, "image", index),
                    next(starts[sample]),
                    (first_row, first_row + tiles),
                    grid,
                    "",
                )
            )
            first_row += tiles
        return items

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs: Any) -> dict[str, list[int]]:
        """Tokens per image (height, width) without pixels (atoms plus indicator tokens), and tiles."""
        options = self.image_processor.replace(**self.split_kwargs(kwargs).images)
        grids = [options.grid(height, width) for height, width in image_sizes or []]
        return {
            "num_image_tokens": [span_length(rows, cols, self.image_seq_length) for rows, cols in grids],
            "num_image_patches": [1 if rows * cols == 1 else rows * cols + 1 for rows, cols in grids],
        }

    @property
    def unused_input_names(self) -> list[str]:
        return ["grids"]


# transformers' other names for the same image processor (its PIL backend; the deprecated "Fast" spelling)
Ovis2ImageProcessorPil = Ovis2ImageProcessor
Ovis2ImageProcessorFast = Ovis2ImageProcessor
