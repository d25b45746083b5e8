"""LLaVA-OneVision preprocessing: anyres image tiles, video frames, and the processor expanding placeholders.

Notable features:
- anyres geometry shared with the model (`best_resolution`, `feature_grid`): the pinpoint that keeps the
  most of the image with the least waste, the unpadded feature grid and its anyres_max_N downsampling,
  so the placeholder count of every image equals the features the model produces;
- images (one per sample): the base tile (the whole image squashed to the tile size) then the tiles of
  the image resized into the best pinpoint (aspect kept, PIL bicubic on uint8, bit-identical to
  transformers' PIL image processor) and centred on a zero canvas; rescale + CLIP normalisation is one
  table lookup; `pixel_values` is float32 `[num_images, max_tiles, 3, S, S]`, zero-padded tiles;
- a sample with two or more images skips anyres: each image is padded to a square of `int(mean * 255)`
  and becomes one tile (+ one newline feature);
- `image_sizes` (original h, w) and `batch_num_images` (images per sample that has any) as transformers;
- videos: frames from a path (PyAV), an array or a list of frames, optionally sampled (`num_frames` /
  `fps`, transformers' uniform sampling), resized with the torch kernel transformers' video processor
  runs; `pixel_values_videos` float32 `[num_videos, T, 3, S, S]`;
- `<image>` becomes base + rows * (cols + 1) tokens (one tile + 1 for multi-image samples), `<video>`
  becomes frames * ceil(P / 2)^2 + 1.
Checked against transformers 5.23 `models/llava_onevision/{image_processing_pil_llava_onevision,
video_processing_llava_onevision, processing_llava_onevision}.py` (tests/test_llava_onevision_processing.py).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from ...batch import BatchFeature
from ...errors import ConfigError, MediaError, UnsupportedFeatureError
from ...image_processing_utils import (
    ImageOptions,
    flatten_images,
    lookup,
    normalize_table,
    pil_resize,
    to_rgb_array,
    torch_resize,
)
from ...media import uniform_indices
from ...processing_utils import ProcessorMixin
from ...video_processing_utils import Video, VideoLoaderMixin

__all__ = [
    "LlavaOnevisionImageProcessor",
    "LlavaOnevisionProcessor",
    "LlavaOnevisionVideoProcessor",
    "best_resolution",
    "feature_grid",
    "image_num_tokens",
    "resized_within",
    "video_num_tokens",
]

# ------------------------------------------------------------------------------------- anyres geometry


def best_resolution(height: int, width: int, pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The pinpoint (h, w) showing the most image pixels, ties broken by the least padding."""
    best, best_effective, best_waste = None, 0, float("inf")
    for pin_h, pin_w in pinpoints:
        scale = min(pin_w / width, pin_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = pin_w * pin_h - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (pin_h, pin_w), effective, waste
    return best


def resized_within(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
    """The aspect-kept size of an image fitted into `target` (h, w): one side equal, the other rounded up."""
    target_h, target_w = target
    if target_w / width < target_h / height:
        return min(math.ceil(height * target_w / width), target_h), target_w
    return target_h, min(math.ceil(width * target_h / height), target_w)


@dataclasses.dataclass(frozen=True)
class FeatureGrid:
    """The feature map of one anyres image after unpadding (and downsampling)."""

    tiles: tuple[int, int]  # tile rows, tile columns of the best pinpoint
    unpadded: tuple[int, int]  # feature rows, columns once the padding is cut
    final: tuple[int, int] | None  # rows, columns after anyres_max_N downsampling (None: not needed)

    @property
    def shape(self) -> tuple[int, int]:
        return self.final or self.unpadded


def feature_grid(
    height: int, width: int, pinpoints: Sequence[Sequence[int]], tile: int, patches: int, max_num_patches: int
) -> FeatureGrid:
    """Where the features of an image of `height` x `width` land: tiles, unpadded grid, downsampled grid.

    `tile` is the vision input side, `patches` the patches per tile side. The unpadding and the
    downsampling ratio follow transformers' `unpad_image` and `pack_image_features` to the rounding.
    """
    pin_h, pin_w = best_resolution(height, width, pinpoints)
    tiles = (pin_h // tile, pin_w // tile)
    rows, cols = patches * tiles[0], patches * tiles[1]
    if width / height > cols / rows:
        new_rows = int(round(height * (cols / width), 7))
        rows -= (rows - new_rows) // 2 * 2
    else:
        new_cols = int(round(width * (rows / height), 7))
        cols -= (cols - new_cols) // 2 * 2
    ratio = math.sqrt(rows * cols / (max_num_patches * patches**2))
    final = (int(rows // ratio), int(cols // ratio)) if ratio > 1.1 else None
    return FeatureGrid(tiles, (rows, cols), final)


def image_num_tokens(grid: FeatureGrid, patches: int) -> int:
    """Base tile features + one feature per grid cell + one newline per grid row."""
    rows, cols = grid.shape
    return patches**2 + rows * (cols + 1)


def video_num_tokens(num_frames: int, patches: int) -> int:
    """Each frame's features pooled 2x2 (ceil), plus one newline for the whole video."""
    return num_frames * math.ceil(patches / 2) ** 2 + 1


# ---------------------------------------------------------------------------------------------- images


def _tile_size(size: dict[str, int]) -> tuple[int, int]:
    if size.get("height") and size.get("width"):
        return int(size["height"]), int(size["width"])
    if size.get("shortest_edge"):
        return int(size["shortest_edge"]), int(size["shortest_edge"])
    raise MediaError(f"size must have 'height' and 'width' (or 'shortest_edge'), got {size!r}")


class ImageBatch(list):
    """Decoded images (uint8 [H, W, 3]) plus how many belong to each sample that has images."""

    def __init__(self, images: list[np.ndarray], batch_num_images: list[int]):
        super().__init__(images)
        self.batch_num_images = batch_num_images


def _group_sizes(images: Any) -> list[int]:
    """transformers' rule: a list of lists is per sample (empty samples dropped); anything else, 1 each."""
    if isinstance(images, (list, tuple)) and images and isinstance(images[0], (list, tuple)):
        return [len(sample) for sample in images if len(sample)]
    return [1] * len(flatten_images(images))


@dataclasses.dataclass
class _Options(ImageOptions):
    """Options shared by the image and the video processor (CLIP rescale / normalise defaults)."""

    size: dict = dataclasses.field(default_factory=lambda: {"height": 384, "width": 384})  # the tile

    def _normalized(self, pixels: np.ndarray, fused: bool) -> torch.Tensor:
        """uint8 [T, 3, H, W] -> rescaled and normalised float32 [T, 3, H, W] (one table lookup)."""
        table = normalize_table(
            self.do_rescale,
            self.rescale_factor,
            self.do_normalize,
            self.image_mean,
            self.image_std,
            fused=fused,
        )
        return torch.from_numpy(lookup(pixels, table, np.empty(pixels.shape, dtype=np.float32)))


@dataclasses.dataclass
class LlavaOnevisionImageProcessor(_Options):
    """Images -> `pixel_values` [num_images, max_tiles, 3, S, S], `image_sizes`, `batch_num_images`."""

    image_grid_pinpoints: tuple = tuple([384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7))
    do_pad: bool = True  # zero tiles up to the batch's largest tile count

    model_input_names: ClassVar[list[str]] = ["pixel_values", "image_sizes", "batch_num_images"]

    def load(self, images: Any) -> ImageBatch:
        """Decode every image (flat or per-sample nested list) and remember the per-sample counts."""
        return ImageBatch([to_rgb_array(image) for image in flatten_images(images)], _group_sizes(images))

    def run(
        self, images: list[np.ndarray], return_tensors: str | None = "pt", **kwargs: Any
    ) -> dict[str, Any]:
        """Tile, resize and normalise decoded images (call-time overrides as keyword arguments)."""
        options = self.replace(**kwargs)
        groups = getattr(images, "batch_num_images", [1] * len(images))
        if sum(groups) != len(images):
            raise MediaError(f"batch_num_images={groups} does not add up to the {len(images)} images given.")
        anyres = [n == 1 for n in groups for _ in range(n)]
        tiles = [options._tiles(image, use_anyres) for image, use_anyres in zip(images, anyres)]
        return options._output(tiles, [image.shape[:2] for image in images], groups, return_tensors)

    def _tiles(self, image: np.ndarray, anyres: bool) -> torch.Tensor:
        """One image -> normalised tiles [T, 3, S, S] float32 (base tile first)."""
        tile_h, tile_w = _tile_size(self.size)
        if anyres:
            crops = [pil_resize(image, tile_h, tile_w, self.resample)] + self._grid_crops(image, tile_h)
        else:
            crops = [_pad_to_square(image, tuple(int(m * 255) for m in self.image_mean))]
        if self.do_resize:
            crops = [pil_resize(crop, tile_h, tile_w, self.resample) for crop in crops]
        return self._normalized(np.stack(crops).transpose(0, 3, 1, 2), fused=False)  # [T, 3, S, S]

    def _grid_crops(self, image: np.ndarray, tile: int) -> list[np.ndarray]:
        """Resize into the best pinpoint (aspect kept), centre on a zero canvas, cut into tiles row-major."""
        height, width = image.shape[:2]
        target = best_resolution(height, width, self.image_grid_pinpoints)
        new_h, new_w = resized_within(height, width, target)
        canvas = np.zeros((*target, 3), dtype=np.uint8)
        top, left = (target[0] - new_h) // 2, (target[1] - new_w) // 2
        canvas[top : top + new_h, left : left + new_w] = pil_resize(image, new_h, new_w, self.resample)
        return [
            canvas[y : y + tile, x : x + tile]
            for y in range(0, target[0], tile)
            for x in range(0, target[1], tile)
        ]

    def _output(self, tiles: list[torch.Tensor], sizes, groups: list[int], return_tensors) -> dict[str, Any]:
        if self.do_pad:
            most = max(t.shape[0] for t in tiles)
            tiles = [torch.cat([t, t.new_zeros(most - t.shape[0], *t.shape[1:])]) for t in tiles]
        data = {
            "pixel_values": torch.stack(tiles)
            if self.do_pad or len({t.shape for t in tiles}) == 1
            else tiles,
            "image_sizes": torch.tensor([list(s) for s in sizes], dtype=torch.int64).reshape(-1, 2),
            "batch_num_images": torch.tensor(groups, dtype=torch.int64),
        }
        if return_tensors in (None, "np"):
            return {
                k: v.numpy() if isinstance(v, torch.Tensor) else [t.numpy() for t in v]
                for k, v in data.items()
            }
        return data

    def __call__(self, images: Any, return_tensors: str | None = None, **kwargs: Any) -> BatchFeature:
        return BatchFeature(
            self.run(self.load(images), return_tensors=return_tensors, **kwargs), tensor_type=return_tensors
        )

    preprocess = __call__


def _pad_to_square(image: np.ndarray, color: tuple[int, ...]) -> np.ndarray:
    """Centre the image on a square of `color` (the longer side), as transformers' `pad_to_square`."""
    height, width = image.shape[:2]
    if height == width:
        return image
    side = max(height, width)
    out = np.empty((side, side, 3), dtype=np.uint8)
    out[:] = np.asarray(color, dtype=np.uint8)
    top, left = (side - height) // 2, (side - width) // 2
    out[top : top + height, left : left + width] = image
    return out


# ---------------------------------------------------------------------------------------------- videos


@dataclasses.dataclass
class LlavaOnevisionVideoProcessor(VideoLoaderMixin, _Options):
    """Videos -> `pixel_values_videos` float32 [num_videos, T, 3, S, S]."""

    do_sample_frames: bool = False  # transformers' default; apply_chat_template turns it on
    num_frames: int | None = None  # frames to sample uniformly
    fps: float | None = None  # or frames per second to sample
    return_metadata: bool = False

    model_input_names: ClassVar[list[str]] = ["pixel_values_videos"]

    @classmethod
    def accepted_kwargs(cls) -> frozenset[str]:
        return cls.field_names() | {"video_metadata"}

    def sample_indices(self, total_num_frames: int, video_fps: float | None) -> list[int]:
        """transformers' default sampling: `num_frames` evenly spaced, or `fps` per second, or all."""
        return uniform_indices(
            total_num_frames, num_frames=self.num_frames, fps=self.fps, video_fps=video_fps
        ).tolist()

    def run(self, videos: list[Video], return_tensors: str | None = "pt", **kwargs: Any) -> dict[str, Any]:
        """Resize and normalise decoded videos: [num_videos, T, 3, S, S]."""
        kwargs.pop("video_metadata", None)
        options = self.replace(**kwargs)
        height, width = _tile_size(options.size)
        clips = []
        for clip in videos:
            frames = torch.from_numpy(np.require(clip.frames, requirements="CW")).permute(
                0, 3, 1, 2
            )  # [T, 3, H, W]
            if options.do_resize:
                frames = torch_resize(frames.contiguous(), height, width, options.resample)
            clips.append(options._normalized(frames.numpy(), fused=True))
        if len({c.shape for c in clips}) > 1:
            raise MediaError(
                f"Videos of different lengths cannot be batched ({[c.shape[0] for c in clips]} frames): "
                "sample the same number of frames from each (num_frames=...)."
            )
        values = torch.stack(clips)
        return {"pixel_values_videos": values.numpy() if return_tensors in (None, "np") else values}

    def __call__(self, videos: Any, return_tensors: str | None = None, **kwargs: Any) -> BatchFeature:
        loaded = self.load(videos, kwargs)
        kwargs.pop("video_metadata", None)
        return BatchFeature(
            self.run(loaded, return_tensors=return_tensors, **kwargs), tensor_type=return_tensors
        )

    preprocess = __call__


# ------------------------------------------------------------------------------------------- processor


class LlavaOnevisionProcessor(ProcessorMixin):
    """LLaVA-OneVision's processor: the Qwen2 tokenizer, the two processors above and the chat template."""

    image_processor_class = LlavaOnevisionImageProcessor
    video_processor_class = LlavaOnevisionVideoProcessor
    default_image_token = "<image>"
    default_video_token = "<video>"
    processor_fields = ("num_image_tokens", "vision_feature_select_strategy", "vision_aspect_ratio")

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        video_processor=None,
        chat_template=None,
        num_image_tokens: int | None = None,
        vision_feature_select_strategy: str | None = None,
        vision_aspect_ratio: str = "anyres_max_9",
        **unused: Any,
    ):
        super().__init__(image_processor, tokenizer, video_processor, chat_template=chat_template)
        self.num_image_tokens = num_image_tokens  # vision tokens per tile (patches per side squared)
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.vision_aspect_ratio = vision_aspect_ratio

    @property
    def patches_per_side(self) -> int:
        if not self.num_image_tokens:
            raise ConfigError(
                "LlavaOnevisionProcessor needs num_image_tokens (vision tokens per tile, e.g. 729): "
                "set it in processor_config.json or pass num_image_tokens=."
            )
        return int(math.sqrt(self.num_image_tokens))

    def _count(self, outputs: dict, modality: str) -> int:
        key = "image_sizes" if modality == "image" else "pixel_values_videos"
        return 0 if outputs.get(key) is None else len(outputs[key])

    def item_grid(self, outputs: dict, modality: str, index: int) -> tuple[int, ...]:
        return ()  # one row of pixel_values / pixel_values_videos per item

    def _hash_media(self, media, image_items, video_items, options):
        """Content hashes that also say whether an image was tiled: the same pixels alone in a sample
        (anyres tiles) and in a multi-image sample (one tile) give different features."""
        from ...media import media_hash

        media = super()._hash_media(media, image_items, video_items, options)
        groups = getattr(image_items, "batch_num_images", [1] * len(image_items))
        tiled = [n == 1 for n in groups for _ in range(n)]
        return [
            dataclasses.replace(m, content_hash=media_hash(m.content_hash, anyres=tiled[m.index]))
            if m.modality == "image"
            else m
            for m in media
        ]

    def image_tokens(self, height: int, width: int, multi_image: bool, tile: int) -> int:
        """Placeholder tokens of one image of `height` x `width` (original size)."""
        if multi_image:
            count = self.num_image_tokens + 1  # one tile + a newline
        else:
            if self.vision_feature_select_strategy == "default":
                raise UnsupportedFeatureError(
                    "vision_feature_select_strategy='default' with anyres images is not "
                    "supported (transformers fails on it too): use 'full'."
                )
            max_patches = int(self.vision_aspect_ratio.removeprefix("anyres_max_"))
            grid = feature_grid(
                height,
                width,
                self.image_processor.image_grid_pinpoints,
                tile,
                self.patches_per_side,
                max_patches,
            )
            count = image_num_tokens(grid, self.patches_per_side)
        return count - 1 if self.vision_feature_select_strategy == "default" else count

    def replace_image_token(self, image_outputs: dict, index: int) -> str:
        groups = [int(n) for n in image_outputs["batch_num_images"]]
        multi = [n != 1 for n in groups for _ in range(n)][index]
        height, width = (int(x) for x in image_outputs["image_sizes"][index])
        tile = int(image_outputs["pixel_values"][0][0].shape[-2])
        return self.image_token * self.image_tokens(height, width, multi, tile)

    def replace_video_token(self, video_outputs: dict, index: int) -> str:
        frames = len(video_outputs["pixel_values_videos"][index])
        return self.video_token * video_num_tokens(frames, self.patches_per_side)

    def _get_num_multimodal_tokens(
        self, image_sizes=None, video_sizes=None, **kwargs: Any
    ) -> dict[str, list[int]]:
        """Placeholder tokens per image (height, width) / video (frames, height, width), without pixels."""
        out: dict[str, list[int]] = {}
        if image_sizes is not None:
            tile = _tile_size(self.split_kwargs(kwargs).images.get("size") or self.image_processor.size)[0]
            out["num_image_tokens"] = [self.image_tokens(h, w, False, tile) for h, w in image_sizes]
            out["num_image_patches"] = [1] * len(image_sizes)
        if video_sizes is not None:
            out["num_video_tokens"] = [video_num_tokens(t, self.patches_per_side) for t, _, _ in video_sizes]
        return out
