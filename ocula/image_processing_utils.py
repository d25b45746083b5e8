"""Shared pieces of the image and video processors: input coercion, resizing and normalisation tables.

Notable features:
- every image input (PIL in any mode, numpy HWC/CHW, torch CHW/HWC, path, URL, data URI) becomes one uint8
  RGB array `[H, W, 3]`; transparency is composited onto white, as transformers does;
- `pil_resize` is PIL itself on uint8 (what transformers' PIL image processors run), so resized pixels are
  bit-identical; `torch_resize` is the `interpolate(uint8, antialias=True)` call transformers' torchvision
  video processors run, so video frames are bit-identical too (the two kernels differ by up to a few levels);
- rescale + normalise is one table lookup: every uint8 value maps to the exact float32 the reference computes
  (`normalize_table` reproduces both transformers' unfused NumPy path and its fused torchvision path);
- `ProcessorOptions`: processors are typed dataclasses built from their JSON config; unknown keys are kept in
  `extra`, call-time overrides go through `replace`, `options_key` is a call's effective options (for
  content hashes); `ImageOptions` adds the rescale / normalise fields.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import PIL.Image
import torch

from .errors import MediaError

__all__ = [
    "IMAGENET_STANDARD_MEAN",
    "IMAGENET_STANDARD_STD",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "ImageOptions",
    "ProcessorOptions",
    "flatten_images",
    "is_image",
    "lookup",
    "normalize_table",
    "pil_resize",
    "to_rgb_array",
    "torch_resize",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)


# ------------------------------------------------------------------------------------------- options


@dataclasses.dataclass
class ProcessorOptions:
    """Base of the typed image / video processor configs (subclasses add their fields)."""

    extra: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)  # unknown config keys, kept

    # Config keys that are bookkeeping, not options (never reported as unknown).
    _ignored_keys: ClassVar[frozenset[str]] = frozenset(
        {
            "image_processor_type",
            "video_processor_type",
            "processor_class",
            "feature_extractor_type",
            "auto_map",
        }
    )

    @classmethod
    def field_names(cls) -> frozenset[str]:
        return frozenset(f.name for f in dataclasses.fields(cls) if f.name != "extra")

    @classmethod
    def accepted_kwargs(cls) -> frozenset[str]:
        """Names this processor takes at load and call time (fields plus aliases such as `size`)."""
        return cls.field_names()

    @classmethod
    def normalize_kwargs(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Map aliases onto fields (e.g. `size` -> `min_pixels`/`max_pixels`); subclasses override."""
        return dict(kwargs)

    @classmethod
    def from_dict(cls, config: dict[str, Any] | None, **overrides: Any) -> ProcessorOptions:
        """Build from a JSON config; overrides win over the file, unknown config keys land in `extra`."""
        config = {k: v for k, v in (config or {}).items() if k not in cls._ignored_keys}
        config = cls.normalize_kwargs(config)
        config.update(
            cls.normalize_kwargs({k: v for k, v in overrides.items() if k in cls.accepted_kwargs()})
        )
        names = cls.field_names()
        known = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items() if k in names}
        return cls(**known, extra={k: v for k, v in config.items() if k not in names})

    def replace(self, **kwargs: Any) -> ProcessorOptions:
        """A copy with call-time overrides applied (None means: keep the configured value)."""
        kwargs = self.normalize_kwargs({k: v for k, v in kwargs.items() if v is not None})
        names = self.field_names()
        known = {k: (tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items() if k in names}
        return dataclasses.replace(self, **known) if known else self

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **{k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}}

    def options_key(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The effective options of a call (what a content hash must include)."""
        options = self.replace(**{k: v for k, v in kwargs.items() if k != "return_tensors"})
        return {k: v for k, v in options.to_dict().items() if k in self.field_names()}


@dataclasses.dataclass
class ImageOptions(ProcessorOptions):
    """The resize / rescale / normalise options of transformers' image processors (CLIP defaults)."""

    do_resize: bool = True
    resample: int = 3  # PIL code; 3 = bicubic
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    do_convert_rgb: bool = True  # inputs always become RGB; kept for config round trips


# -------------------------------------------------------------------------------------------- inputs


def is_image(x: Any) -> bool:
    """One image: a PIL image, or a 2-D / 3-D array or tensor (a 4-D one is a batch or a video)."""
    return isinstance(x, PIL.Image.Image) or (isinstance(x, (np.ndarray, torch.Tensor)) and x.ndim in (2, 3))


def _is_image_like(x: Any) -> bool:
    return is_image(x) or isinstance(x, (str, bytes))


def flatten_images(images: Any) -> list[Any]:
    """transformers' `make_flat_list_of_images`: an image, a list, per-sample lists, a 4-D batch."""
    if _is_image_like(images):
        return [images]
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images)
    if isinstance(images, (list, tuple)):
        flat: list[Any] = []
        for item in images:
            flat.extend(
                flatten_images(item) if isinstance(item, (list, tuple, np.ndarray, torch.Tensor)) else [item]
            )
        return flat
    raise MediaError(
        f"Cannot read images from a {type(images).__name__}: pass a PIL image, an array / tensor "
        "(HWC or CHW), a path, a URL, or a (nested) list of them."
    )


def _composite_on_white(image: PIL.Image.Image) -> PIL.Image.Image:
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        white = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, image).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _array_to_hwc(array: np.ndarray) -> np.ndarray:
    """Channels last. Like transformers, a leading axis of 1, 3 or 4 means channels-first (CHW)."""
    if array.ndim == 2:
        return array[:, :, None]
    return np.moveaxis(array, 0, -1) if array.shape[0] in (1, 3, 4) else array


def _array_to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating) and array.size and array.min() >= 0 and array.max() <= 1:
        # transformers converts [0, 1] floats to PIL with `(x * 255).astype(uint8)` before resizing
        return (array * 255).astype(np.uint8)
    return np.clip(array, 0, 255).astype(np.uint8)


def _channels_to_rgb(array: np.ndarray) -> np.ndarray:
    channels = array.shape[-1]
    if channels == 3:
        return array
    if channels == 1:
        return np.repeat(array, 3, axis=-1)
    if channels == 4:
        return np.asarray(_composite_on_white(PIL.Image.fromarray(np.ascontiguousarray(array), "RGBA")))
    raise MediaError(f"An image array must have 1, 3 or 4 channels, got shape {array.shape}.")


def to_rgb_array(image: Any, channels_last: bool = False) -> np.ndarray:
    """Any supported image input -> uint8 RGB `[H, W, 3]` (paths / URLs / data URIs via `ocula.media`).

    Arrays are read as CHW when their first axis has 1, 3 or 4 entries (transformers' rule), unless
    `channels_last` says they are HWC.
    """
    if isinstance(image, (str, bytes)):
        from .media import load_image  # files, URLs and data URIs

        # transformers drops the alpha channel of decoded files (its load_image converts to RGB)
        return np.asarray(load_image(image, composite_alpha=False))
    if isinstance(image, PIL.Image.Image):
        return np.asarray(_composite_on_white(image))
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray) and image.ndim in (2, 3):
        hwc = image if channels_last and image.ndim == 3 else _array_to_hwc(image)
        return np.ascontiguousarray(_channels_to_rgb(_array_to_uint8(hwc)))
    raise MediaError(
        f"Cannot read an image from {type(image).__name__}"
        f"{' of shape ' + str(tuple(image.shape)) if hasattr(image, 'shape') else ''}: pass a PIL image, an "
        "HWC/CHW array or tensor, a path, a URL or a data URI."
    )


# ------------------------------------------------------------------------------------------- kernels


def pil_resize(image: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """Resize uint8 `[H, W, 3]` with PIL (transformers' PIL backend resizes exactly like this)."""
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(PIL.Image.fromarray(image).resize((width, height), resample=resample))


# PIL resample codes -> torch interpolate modes (transformers' `pil_torch_interpolation_mapping`).
_TORCH_MODES = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}


def torch_resize(frames: torch.Tensor, height: int, width: int, resample: int) -> torch.Tensor:
    """Resize uint8 `[T, C, H, W]` the way torchvision's `resize(antialias=True)` does on CPU."""
    if frames.shape[-2:] == (height, width):
        return frames
    mode = _TORCH_MODES.get(int(resample))
    if mode is None:
        raise MediaError(
            f"resample={resample} is not supported for video: use 0 (nearest), 2 (bilinear), 3 (bicubic)"
        )
    antialias = mode != "nearest-exact"
    align = None if mode == "nearest-exact" else False
    return torch.nn.functional.interpolate(
        frames, size=(height, width), mode=mode, align_corners=align, antialias=antialias
    )


def normalize_table(
    do_rescale: bool,
    rescale_factor: float,
    do_normalize: bool,
    mean: Sequence[float],
    std: Sequence[float],
    fused: bool = False,
) -> np.ndarray:
    """The float32 value of every uint8 input, per channel: `[C, 256]`.

    Unfused: transformers' NumPy path (`float32(float64(x) * scale)`, then `(x - mean) / std` in float32).
    Fused: its torchvision path (`(float32(x) - mean / scale) / (std / scale)`), used by video processors.
    """
    values = torch.arange(256, dtype=torch.float64)[:, None].expand(256, len(mean))
    if do_rescale and do_normalize and fused:
        mean_t = torch.tensor(list(mean)) * (1.0 / rescale_factor)
        std_t = torch.tensor(list(std)) * (1.0 / rescale_factor)
        out = (values.float() - mean_t) / std_t
    else:
        out = (values * rescale_factor).float() if do_rescale else values.float()
        if do_normalize:
            out = (out - torch.tensor(list(mean), dtype=torch.float32)) / torch.tensor(
                list(std), dtype=torch.float32
            )
    return np.ascontiguousarray(out.numpy().T)


def lookup(pixels: np.ndarray, table: np.ndarray, out: np.ndarray) -> np.ndarray:
    """`out[:, c] = table[c][pixels[:, c]]`: channel axis 1, `pixels` uint8 (broadcast into `out`)."""
    for channel in range(table.shape[0]):
        out[:, channel] = table[channel][pixels[:, channel]]
    return out
