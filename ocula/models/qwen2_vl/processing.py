"""Qwen2-VL preprocessing: image processor, video processor and the processor that ties them to the text.

Notable features:
- `smart_resize`: each side a multiple of patch_size * merge_size (28), the area kept within
  [min_pixels, max_pixels], the aspect ratio nearly kept; `size={"shortest_edge", "longest_edge"}` and the
  older `min_pixels=` / `max_pixels=` both work, at load and at call time;
- images: uint8 in, one PIL bicubic resize (bit-identical to transformers' PIL image processor), one table
  lookup for rescale + CLIP normalisation, one vectorised patchify. `backend="torchvision"` (or transformers'
  deprecated `use_fast=True`) instead resizes with torch's uint8 antialiased kernel and normalises with the
  fused table: bit-identical to transformers' default torchvision image processor, and faster than the
  Pillow resize (docs/performance.md). pixel_values is float32
  `[sum t*h*w, 3 * 2 * 14 * 14]`, the patches of each 2x2 merge window adjacent (the order the vision
  merger expects); an image is its own frame repeated to temporal_patch_size;
- videos: frames sampled by `fps` or `num_frames` exactly as transformers' Qwen2-VL video processor does
  (rounded to temporal_patch_size, clamped to [min_frames, max_frames]); resized with the same torch kernel
  transformers' torchvision path uses; a frame count that is not a multiple of temporal_patch_size is
  padded with the last frame; decoding, batching and metadata are the shared `VideoLoaderMixin`
  (`ocula.video_processing_utils`; files through `ocula.media.load_video`, PyAV);
- the processor expands each `<|image_pad|>` / `<|video_pad|>` into grid.prod() // merge_size**2 tokens and
  returns `mm_token_type_ids` (0 text, 1 image, 2 video), which the model's M-RoPE needs.

Checked against transformers 5.23 `models/qwen2_vl/{image_processing_pil_qwen2_vl, video_processing_qwen2_vl,
processing_qwen2_vl}.py` (tests/test_qwen2_vl_processing.py).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, ClassVar

import numpy as np
import torch

from ...batch import BatchFeature
from ...errors import ConfigError, MediaError
from ...image_processing_utils import (
    ImageOptions,
    flatten_images,
    lookup,
    normalize_table,
    pil_resize,
    to_rgb_array,
    torch_resize,
)
from ...media import qwen2_vl_indices
from ...media.ops import lookup_pairs
from ...processing_utils import ProcessorMixin
from ...video_processing_utils import Video, VideoLoaderMixin

__all__ = [
    "Qwen2VLImageProcessor",
    "Qwen2VLProcessor",
    "Qwen2VLVideoProcessor",
    "Video",
    "patch_values",
    "smart_resize",
]


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 14 * 14 * 4 * 1280
) -> tuple[int, int]:
    """The resized (height, width): multiples of `factor`, area within [min_pixels, max_pixels]."""
    if max(height, width) / min(height, width) > 200:
        raise MediaError(
            f"An image's aspect ratio must be below 200, got {height}x{width}: crop or pad it first."
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patch_values(
    frames: np.ndarray, table: np.ndarray, patch: int, merge: int, temporal: int
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """uint8 `[T, H, W, C]` -> float32 `[gt * gh * gw, C * temporal * patch * patch]` and the grid.

    Patches come in merge-window order. The reordering is done on uint8 (a quarter of the bytes) and the
    table lookup writes the float32 output once. A single frame (an image) is looked up once and repeated
    to `temporal` frames in the output, as transformers broadcasts it.
    """
    count, height, width, channels = frames.shape
    if height % (patch * merge) or width % (patch * merge):
        raise MediaError(
            f"A {height}x{width} frame is not a multiple of patch_size * merge_size = {patch * merge}: keep "
            "do_resize=True, or resize it to multiples of that first."
        )
    if count > 1 and (pad := -count % temporal):  # repeat the last frame up to a whole temporal patch
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
    step = 1 if count == 1 else temporal
    gt, gh, gw = frames.shape[0] // step, height // patch, width // patch
    x = frames.reshape(gt, step, gh // merge, merge, patch, gw // merge, merge, patch, channels)
    # [gt, t, gh/m, mh, ph, gw/m, mw, pw, C] -> [gt, gh/m, gw/m, mh, mw, C, t, ph, pw]
    x = np.ascontiguousarray(x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)).reshape(gt * gh * gw, channels, step, -1)
    out = np.empty((gt * gh * gw, channels, temporal, patch * patch), np.float32)
    out = (lookup_pairs if patch % 2 == 0 else lookup)(x, table, out)  # pairs: same values, about 2x faster
    return torch.from_numpy(out.reshape(gt * gh * gw, -1)), (gt, gh, gw)


def _size_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`size` ({"shortest_edge", "longest_edge"} or the older {"min_pixels", "max_pixels"}) -> min/max pixels;
    explicit `min_pixels` / `max_pixels` win, as in transformers."""
    kwargs = dict(kwargs)
    size = kwargs.pop("size", None)
    if isinstance(size, dict):
        for key, field in (
            ("shortest_edge", "min_pixels"),
            ("min_pixels", "min_pixels"),
            ("longest_edge", "max_pixels"),
            ("max_pixels", "max_pixels"),
        ):
            if size.get(key) is not None and kwargs.get(field) is None:
                kwargs[field] = size[key]
    elif size is not None:
        raise MediaError(
            f"size must be a dict with 'shortest_edge' and 'longest_edge' (pixel counts), got {size!r}"
        )
    return {k: v for k, v in kwargs.items() if not (k in ("min_pixels", "max_pixels") and v is None)}


@dataclasses.dataclass
class _Qwen2VLOptions(ImageOptions):
    """Options shared by the image and the video processor (field defaults are the image processor's):
    `ImageOptions`' resize / rescale / normalise fields plus the pixel bounds and the patch geometry."""

    min_pixels: int = 56 * 56  # smallest resized area (size["shortest_edge"])
    max_pixels: int = 28 * 28 * 1280  # largest resized area (size["longest_edge"])
    patch_size: int = 14  # ViT patch side
    temporal_patch_size: int = 2  # frames per patch (an image is repeated to fill it)
    merge_size: int = 2  # merge window side: merge_size**2 patches -> one token

    @classmethod
    def accepted_kwargs(cls) -> frozenset[str]:
        return cls.field_names() | {"size"}

    @classmethod
    def normalize_kwargs(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        return _size_kwargs(kwargs)

    @property
    def size(self) -> dict[str, int]:
        return {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}

    def _table(self, fused: bool) -> np.ndarray:
        mean, std = tuple(self.image_mean), tuple(self.image_std)
        return _cached_table(self.do_rescale, self.rescale_factor, self.do_normalize, mean, std, fused)

    def _target(self, height: int, width: int, max_pixels: int | None = None) -> tuple[int, int]:
        if not self.do_resize:
            return height, width
        factor = self.patch_size * self.merge_size
        return smart_resize(height, width, factor, self.min_pixels, max_pixels or self.max_pixels)


@functools.lru_cache(maxsize=16)
def _cached_table(
    do_rescale: bool, factor: float, do_normalize: bool, mean: tuple, std: tuple, fused: bool
) -> np.ndarray:
    """`normalize_table`, built once per set of options (read-only: every call shares it)."""
    table = normalize_table(do_rescale, factor, do_normalize, mean, std, fused=fused)
    table.flags.writeable = False
    return table


def _pixels_out(
    pixels: list[torch.Tensor],
    grids: list[tuple[int, int, int]],
    names: list[str],
    return_tensors: str | None,
) -> dict[str, Any]:
    values = pixels[0] if len(pixels) == 1 else torch.cat(pixels)
    grid = torch.tensor(grids, dtype=torch.int64).reshape(-1, 3)
    if return_tensors is None or return_tensors == "np":
        return {names[0]: values.numpy(), names[1]: grid.numpy()}
    return {names[0]: values, names[1]: grid}


# ---------------------------------------------------------------------------------------------- images


@dataclasses.dataclass
class Qwen2VLImageProcessor(_Qwen2VLOptions):
    """Images -> `pixel_values` float32 `[sum t*h*w, 1176]` and `image_grid_thw` int64 `[n, 3]`."""

    backend: str = "pil"  # "pil" or "torchvision": the transformers image backend whose pixels to match

    model_input_names: ClassVar[list[str]] = ["pixel_values", "image_grid_thw"]

    @classmethod
    def accepted_kwargs(cls) -> frozenset[str]:
        return super().accepted_kwargs() | {"use_fast"}

    @classmethod
    def normalize_kwargs(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        """transformers' deprecated `use_fast=True/False` means backend "torchvision" / "pil"."""
        kwargs = super().normalize_kwargs(kwargs)
        use_fast = kwargs.pop("use_fast", None)
        if use_fast is not None and kwargs.get("backend") is None:
            kwargs["backend"] = "torchvision" if use_fast else "pil"
        return kwargs

    def load(self, images: Any) -> list[np.ndarray]:
        """Decode every image (a flat or per-sample nested list) into uint8 RGB `[H, W, 3]`."""
        return [to_rgb_array(image) for image in flatten_images(images)]

    def run(
        self, images: list[np.ndarray], return_tensors: str | None = "pt", **kwargs: Any
    ) -> dict[str, Any]:
        """Preprocess decoded images with call-time overrides (`min_pixels=`, `size=`, ...)."""
        options = self.replace(**kwargs)
        torch_backend = options._torch_backend()
        table = options._table(fused=torch_backend)  # the torchvision backend fuses rescale into normalise
        resize = _torch_resize_image if torch_backend else pil_resize
        pixels, grids = [], []
        for image in images:
            height, width = options._target(*image.shape[:2])
            resized = resize(image, height, width, options.resample)  # uint8 [H, W, 3]
            patches, grid = patch_values(
                resized[None], table, options.patch_size, options.merge_size, options.temporal_patch_size
            )
            pixels.append(patches)
            grids.append(grid)
        return _pixels_out(pixels, grids, self.model_input_names, return_tensors)

    def __call__(self, images: Any, return_tensors: str | None = None, **kwargs: Any) -> BatchFeature:
        return BatchFeature(
            self.run(self.load(images), return_tensors=return_tensors, **kwargs), tensor_type=return_tensors
        )

    preprocess = __call__

    def _torch_backend(self) -> bool:
        if self.backend not in ("pil", "torchvision"):
            raise ConfigError(f"backend={self.backend!r} is not an image backend; use 'pil' or 'torchvision'")
        return self.backend == "torchvision"

    def get_number_of_image_patches(self, height: int, width: int, images_kwargs: dict | None = None) -> int:
        options = self.replace(**(images_kwargs or {}))
        resized = options._target(height, width)
        return (resized[0] // options.patch_size) * (resized[1] // options.patch_size)


def _torch_resize_image(image: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """uint8 [H, W, 3] -> [height, width, 3] with torch's kernel (transformers' torchvision backend)."""
    with warnings.catch_warnings():  # decoded images are read-only arrays; nothing writes through this view
        warnings.simplefilter("ignore", UserWarning)
        frames = torch.from_numpy(image).permute(2, 0, 1)[None]  # [1, 3, H, W], channels-last in memory
    return torch_resize(frames, height, width, resample)[0].permute(1, 2, 0).numpy()


# ---------------------------------------------------------------------------------------------- videos


@dataclasses.dataclass
class Qwen2VLVideoProcessor(VideoLoaderMixin, _Qwen2VLOptions):
    """Videos -> `pixel_values_videos` float32 `[sum t*h*w, 1176]` and `video_grid_thw` int64 `[n, 3]`."""

    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 28 * 28 * 768
    do_sample_frames: bool = False  # transformers' default; apply_chat_template turns it on with fps
    fps: float | None = None  # frames per second to sample
    num_frames: int | None = None  # or a fixed number of frames to sample
    min_frames: int = 4
    max_frames: int = 768
    cap_pixels_per_frame: bool | None = None  # qwen-vl-utils' total pixel budget (off unless True)
    max_video_tokens: int = 128000  # the budget's context length when the cap is on
    return_metadata: bool = False

    model_input_names: ClassVar[list[str]] = ["pixel_values_videos", "video_grid_thw"]

    @classmethod
    def accepted_kwargs(cls) -> frozenset[str]:
        return cls.field_names() | {"size", "video_metadata"}

    # Frame sampling (decoding is VideoLoaderMixin.load) ------------------------------------------------

    def sample_indices(self, total_num_frames: int, video_fps: float | None) -> list[int]:
        """transformers' Qwen2-VL `sample_frames`: uniform indices for num_frames or fps * duration."""
        return qwen2_vl_indices(
            total_num_frames,
            video_fps,
            num_frames=self.num_frames,
            fps=self.fps,
            temporal_patch_size=self.temporal_patch_size,
            min_frames=self.min_frames,
            max_frames=self.max_frames,
        ).tolist()

    # Preprocessing -----------------------------------------------------------------------------------------

    def run(self, videos: list[Video], return_tensors: str | None = "pt", **kwargs: Any) -> dict[str, Any]:
        """Resize, normalise and patchify decoded videos (call-time overrides as keyword arguments)."""
        kwargs.pop("video_metadata", None)
        options = self.replace(**kwargs)
        table = options._table(fused=True)
        pixels, grids = [], []
        for clip in videos:
            frames = (
                torch.from_numpy(np.require(clip.frames, requirements="CW")).permute(0, 3, 1, 2).contiguous()
            )
            height, width = options._target(*frames.shape[-2:], options._max_pixels(len(frames)))
            frames = torch_resize(frames, height, width, options.resample).permute(0, 2, 3, 1)  # [T, H, W, 3]
            patches, grid = patch_values(
                frames.numpy(), table, options.patch_size, options.merge_size, options.temporal_patch_size
            )
            pixels.append(patches)
            grids.append(grid)
        return _pixels_out(pixels, grids, self.model_input_names, return_tensors or "pt")

    def _max_pixels(self, num_frames: int) -> int:
        """qwen-vl-utils' cap: each frame gets an even share of the whole video's pixel budget."""
        if not self.cap_pixels_per_frame:
            return self.max_pixels
        factor = self.patch_size * self.merge_size
        total = int(self.max_video_tokens * factor * factor * 0.9)
        return max(
            min(self.max_pixels, total * self.temporal_patch_size // num_frames), int(self.min_pixels * 1.05)
        )

    def __call__(self, videos: Any, return_tensors: str | None = None, **kwargs: Any) -> BatchFeature:
        loaded = self.load(videos, kwargs)
        kwargs.pop("video_metadata", None)
        return BatchFeature(
            self.run(loaded, return_tensors=return_tensors, **kwargs), tensor_type=return_tensors
        )

    preprocess = __call__

    def get_num_of_video_patches(self, num_frames: int, height: int, width: int, videos_kwargs=None) -> int:
        options = self.replace(**(videos_kwargs or {}))
        resized = options._target(height, width)
        grid_t = -(-num_frames // options.temporal_patch_size)
        return grid_t * (resized[0] // options.patch_size) * (resized[1] // options.patch_size)


# ------------------------------------------------------------------------------------------- processor


class Qwen2VLProcessor(ProcessorMixin):
    """Qwen2-VL's processor: the Qwen2 tokenizer, the two processors above and the chat template."""

    image_processor_class = Qwen2VLImageProcessor
    video_processor_class = Qwen2VLVideoProcessor
    default_image_token = "<|image_pad|>"
    default_video_token = "<|video_pad|>"
    return_mm_token_type_ids = True

    def item_tokens(self, outputs: dict, modality: str, index: int) -> int:
        processor = self.image_processor if modality == "image" else self.video_processor
        return int(np.prod(self.item_grid(outputs, modality, index))) // processor.merge_size**2

    def replace_image_token(self, image_outputs: dict, index: int) -> str:
        return self.image_token * self.item_tokens(image_outputs, "image", index)

    def replace_video_token(self, video_outputs: dict, index: int) -> str:
        return self.video_token * self.item_tokens(video_outputs, "video", index)

    def _get_num_multimodal_tokens(
        self, image_sizes=None, video_sizes=None, **kwargs: Any
    ) -> dict[str, list[int]]:
        """Placeholder tokens per image (height, width) / video (frames, height, width), without pixels."""
        options = self.split_kwargs(kwargs)
        out: dict[str, list[int]] = {}
        if image_sizes is not None:
            merge = options.images.get("merge_size") or self.image_processor.merge_size
            patches = [
                self.image_processor.get_number_of_image_patches(*s, options.images) for s in image_sizes
            ]
            out.update(num_image_tokens=[p // merge**2 for p in patches], num_image_patches=patches)
        if video_sizes is not None:
            merge = options.videos.get("merge_size") or self.video_processor.merge_size
            patches = [self.video_processor.get_num_of_video_patches(*s, options.videos) for s in video_sizes]
            out["num_video_tokens"] = [p // merge**2 for p in patches]
        return out
