"""Load any supported image input as an RGB `PIL.Image`, the way transformers' processors see it.

Notable features:
- inputs: PIL images (any mode), numpy arrays HWC / CHW / HW (uint8, or float in [0, 1]), torch
  tensors (same layouts), paths, `file://` and `http(s)://` URLs, `data:image/...;base64,` URIs, bytes;
- transparency (RGBA, LA, P or L/RGB with a transparency key) is composited onto white exactly as
  transformers' `convert_to_rgb` does (PIL `alpha_composite`; the numpy formula for arrays, which
  gives the same pixels);
- encoded sources get their EXIF orientation applied, as transformers' `load_image` does; in-memory
  PIL images are taken as they are (transformers' processors do not transpose them either);
- a pixel-count guard (`MediaTooLargeError`) checked from the header, before decoding; PIL
  decompression bombs, corrupt and truncated files raise `MediaError`.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch

from ..errors import MediaError, MediaTooLargeError
from .fetch import DEFAULT_MAX_BYTES, DEFAULT_TIMEOUT_S, describe, read_source

DEFAULT_MAX_PIXELS = PIL.Image.MAX_IMAGE_PIXELS or 89_478_485  # PIL's own bomb threshold


def load_image(
    image,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    timeout: float = DEFAULT_TIMEOUT_S,
    max_bytes: int = DEFAULT_MAX_BYTES,
    composite_alpha: bool = True,
) -> PIL.Image.Image:
    """Return `image` as an RGB PIL image (alpha composited onto white).

    `composite_alpha=False` drops transparency instead, as transformers' `load_image` (and the
    `decode_image(mode=RGB)` that its processors use for paths and URLs) does for decoded files.
    Arrays with 4 channels are always composited (transformers' numpy / torch paths do).
    """
    pil = _to_pil(image, max_pixels, timeout, max_bytes)
    _check_size(pil.width, pil.height, max_pixels)
    try:  # a lazily opened PIL image decodes here
        pil.load()
        return pil_to_rgb(pil) if composite_alpha else pil.convert("RGB")
    except (OSError, ValueError) as error:
        raise MediaError(
            f"Cannot decode the given PIL image: {error}. The file behind it is corrupt."
        ) from None


def _to_pil(image, max_pixels: int | None, timeout: float, max_bytes: int) -> PIL.Image.Image:
    if isinstance(image, PIL.Image.Image):
        return image
    if isinstance(image, (np.ndarray, torch.Tensor)):
        return PIL.Image.fromarray(array_to_rgb(to_numpy(image)))
    if isinstance(image, (str, os.PathLike)):
        data = read_source(image, timeout=timeout, max_bytes=max_bytes)
        return _decode(data, describe(os.fspath(image)), max_pixels)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _decode(bytes(image), "<bytes>", max_pixels)
    raise MediaError(
        f"Unsupported image input of type {type(image).__name__}: pass a PIL image, a numpy array or "
        "torch tensor (HWC or CHW), a path, an http(s):// or file:// URL, or a data: URI."
    )


def pil_to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """transformers' `convert_to_rgb` for PIL: transparency is composited onto opaque white."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if not has_alpha:
        return image if image.mode == "RGB" else image.convert("RGB")
    rgba = image.convert("RGBA")
    white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return PIL.Image.alpha_composite(white, rgba).convert("RGB")


def to_numpy(image: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        image = (image.float() if image.dtype == torch.bfloat16 else image).numpy()
    return image


def channels_last(array: np.ndarray, channels_first: bool | None = None) -> np.ndarray:
    """HW, HWC or CHW -> HWC; channels-first wins when ambiguous (and not given), as in transformers."""
    if channels_first is not None and array.ndim == 3:
        return np.moveaxis(array, 0, -1) if channels_first else array
    if array.ndim == 2:
        return array[..., None]
    if array.ndim != 3:
        raise MediaError(
            f"An image array must have 2 or 3 dimensions (HW, HWC or CHW), got shape {array.shape}."
        )
    if array.shape[0] in (1, 3, 4):
        return np.moveaxis(array, 0, -1)
    if array.shape[-1] in (1, 3, 4):
        return array
    raise MediaError(
        f"Cannot tell the channel axis of an image of shape {array.shape}: use 1, 3 or 4 channels."
    )


def array_to_uint8(array: np.ndarray) -> np.ndarray:
    """uint8 as is; floats in [0, 1] scaled by 255 and truncated (transformers' `to_pil_image`)."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_ or np.issubdtype(array.dtype, np.integer):
        if array.size and (array.min() < 0 or array.max() > 255):
            raise MediaError(
                f"Integer image values must lie in [0, 255], got [{array.min()}, {array.max()}]."
            )
        return array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.floating):
        raise MediaError(f"Unsupported image dtype {array.dtype}: use uint8, or floats in [0, 1].")
    if array.size and (not np.isfinite(array).all() or array.min() < 0 or array.max() > 1):
        raise MediaError("Float images must hold values in [0, 1] (multiply by 1/255 first, or pass uint8).")
    return (array.astype(np.float32) * 255).astype(np.uint8)


def array_to_rgb(array: np.ndarray, channels_first: bool | None = None) -> np.ndarray:
    """Any supported array -> uint8 [H, W, 3]; 4 channels composited onto white, 1 channel repeated."""
    hwc = channels_last(np.asarray(array), channels_first)
    if hwc.shape[0] == 0 or hwc.shape[1] == 0:
        raise MediaError(f"Empty image of shape {array.shape}: an image needs at least one pixel.")
    hwc = array_to_uint8(hwc)
    if hwc.shape[-1] == 1:
        return np.repeat(hwc, 3, axis=-1)
    if hwc.shape[-1] == 4:
        # transformers' numpy convert_to_rgb; equal to PIL's alpha_composite over opaque white
        alpha = hwc[..., 3:4] / 255
        return np.round(alpha * hwc[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return np.ascontiguousarray(hwc)


def _check_size(width: int, height: int, max_pixels: int | None) -> None:
    if width <= 0 or height <= 0:
        raise MediaError(f"Empty image ({width}x{height}): an image needs at least one pixel.")
    if max_pixels is not None and width * height > max_pixels:
        raise MediaTooLargeError(
            f"Image of {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels} pixels; "
            "downscale it first or raise max_pixels."
        )


def _decode(data: bytes | Path, name: str, max_pixels: int | None) -> PIL.Image.Image:
    """Open, check the header's size, decode fully (so truncation surfaces here), apply EXIF rotation."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)  # our own limit applies
            image = PIL.Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
            _check_size(image.width, image.height, max_pixels)
            image.load()
    except PIL.Image.DecompressionBombError as error:
        raise MediaTooLargeError(f"Image {name!r} is too large to decode safely: {error}") from None
    except (OSError, ValueError, SyntaxError, PIL.UnidentifiedImageError) as error:
        if isinstance(error, MediaError):
            raise
        raise MediaError(
            f"Cannot decode image {name!r}: {error}. The file is corrupt, truncated or "
            "not an image format Pillow reads."
        ) from None
    return PIL.ImageOps.exif_transpose(image)
