"""Pixel operations the image processors share, matching transformers' PIL backend bit for bit.

Notable features:
- `resize` runs Pillow's resampler once on the uint8 array (no float round trip), which is exactly
  what transformers' `image_transforms.resize` does after `to_pil_image`, so the pixels are identical;
- `resize_torch` reproduces transformers' default torchvision backend instead (`tvF.resize` with
  antialias on uint8 [.., C, H, W] tensors): native uint8 kernels where torchvision uses them, else
  float32 + clamp + round; its pixels differ from Pillow's (see docs), so pick the one the reference uses;
- `rescale` / `normalize` follow transformers' numpy order of operations and dtypes (float32 result);
- `to_chw_float` makes the channels-first float32 tensor the models consume;
- `lookup_pairs` maps uint8 pixels through a per-channel float32 table (rescale + normalise in one step)
  two pixels at a time: a 16-bit index into a table of all value pairs, half the indexing work of a
  per-pixel lookup and the same float32 values.
"""

from __future__ import annotations

import functools
import platform
from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch

from ..errors import MediaError

RESAMPLE = {
    "nearest": PIL.Image.Resampling.NEAREST,
    "bilinear": PIL.Image.Resampling.BILINEAR,
    "bicubic": PIL.Image.Resampling.BICUBIC,
    "lanczos": PIL.Image.Resampling.LANCZOS,
    "box": PIL.Image.Resampling.BOX,
    "hamming": PIL.Image.Resampling.HAMMING,
}


def resample_filter(resample: str | int) -> PIL.Image.Resampling:
    """A name ("bicubic") or a PIL / transformers `PILImageResampling` integer (3 = bicubic)."""
    if isinstance(resample, str):
        if resample.lower() not in RESAMPLE:
            raise MediaError(f"Unknown resample {resample!r}: use one of {', '.join(RESAMPLE)}.")
        return RESAMPLE[resample.lower()]
    try:
        return PIL.Image.Resampling(int(resample))
    except ValueError:
        raise MediaError(f"Unknown resample code {resample!r}: use 0-5 (PIL) or a name.") from None


def resize(
    image: np.ndarray | PIL.Image.Image,
    size: tuple[int, int],
    resample: str | int = "bicubic",
    reducing_gap: float | None = None,
) -> np.ndarray:
    """uint8 [H, W, C] (or a PIL image) -> uint8 [h, w, C] with `size = (h, w)`, as Pillow resizes."""
    height, width = size
    if height <= 0 or width <= 0:
        raise MediaError(f"Cannot resize to {height}x{width}: both sides must be positive.")
    pil = image if isinstance(image, PIL.Image.Image) else _uint8_pil(image)
    out = np.asarray(
        pil.resize((width, height), resample=resample_filter(resample), reducing_gap=reducing_gap)
    )
    return out[..., None] if out.ndim == 2 else out  # PIL drops a single channel axis


def _uint8_pil(image: np.ndarray) -> PIL.Image.Image:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise MediaError(
            f"resize expects uint8 [H, W, C] with C in 1, 3, 4; got {image.dtype} {image.shape}."
        )
    return PIL.Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def _native_uint8(mode: str, device: torch.device) -> bool:
    """torchvision's `_do_native_uint8_resize_on_cpu`: which uint8 inputs skip the float round trip."""
    if device.type != "cpu":
        return False
    if mode == "bilinear":
        simd = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
        return simd or platform.machine() in ("aarch64", "arm64")
    return mode == "bicubic"


def resize_torch(image: torch.Tensor, size: tuple[int, int], resample: str = "bicubic") -> torch.Tensor:
    """[..., C, H, W] -> [..., C, h, w] exactly as torchvision's `resize(antialias=True)`."""
    mode = resample if isinstance(resample, str) else resample_filter(resample).name.lower()
    if mode not in ("bilinear", "bicubic", "nearest"):
        raise MediaError(f"resize_torch supports bilinear, bicubic and nearest, not {resample!r}.")
    *batch, channels, height, width = image.shape
    if (height, width) == tuple(size):
        return image
    flat = image.reshape(-1, channels, height, width)  # [N, C, H, W]
    cast = image.dtype == torch.uint8 and mode != "nearest" and not _native_uint8(mode, image.device)
    smooth = mode != "nearest"
    out = torch.nn.functional.interpolate(
        flat.float() if cast else flat,
        size=list(size),
        mode=mode,
        align_corners=False if smooth else None,
        antialias=smooth,
    )
    if cast:
        out = out.clamp_(0, 255).round_().to(torch.uint8)
    return out.reshape(*batch, channels, *size)


def rescale(image: np.ndarray, scale: float) -> np.ndarray:
    """transformers' `rescale`: multiply in float64, return float32."""
    return (image.astype(np.float64) * scale).astype(np.float32)


def normalize(image: np.ndarray, mean: float | Sequence[float], std: float | Sequence[float]) -> np.ndarray:
    """(image - mean) / std over the last (channel) axis of [H, W, C], as transformers' numpy `normalize`.

    Integer images become float32; float images keep their dtype (mean / std are cast to it).
    """
    if not np.issubdtype(image.dtype, np.floating):
        image = image.astype(np.float32)
    channels = image.shape[-1]
    mean = np.broadcast_to(np.asarray(mean, dtype=image.dtype), (channels,))
    std = np.broadcast_to(np.asarray(std, dtype=image.dtype), (channels,))
    return (image - mean) / std


def pad(
    image: np.ndarray, size: tuple[int, int], value: float = 0, *, position: str = "bottom_right"
) -> np.ndarray:
    """Pad [H, W, C] to (h, w) with a constant: after the content ("bottom_right") or evenly ("center")."""
    height, width = image.shape[:2]
    extra_h, extra_w = size[0] - height, size[1] - width
    if extra_h < 0 or extra_w < 0:
        raise MediaError(f"Cannot pad an image of {height}x{width} to the smaller {size[0]}x{size[1]}.")
    top, left = (extra_h // 2, extra_w // 2) if position == "center" else (0, 0)
    widths = ((top, extra_h - top), (left, extra_w - left)) + ((0, 0),) * (image.ndim - 2)
    return np.pad(image, widths, mode="constant", constant_values=value)


def to_chw_float(image: np.ndarray) -> torch.Tensor:
    """[H, W, C] array -> contiguous float32 tensor [C, H, W]."""
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, -1, 0))).to(torch.float32)


def lookup_pairs(pixels: np.ndarray, table: np.ndarray, out: np.ndarray) -> np.ndarray:
    """`out[:, c] = table[c][pixels[:, c]]` (table [C, 256] float32), two neighbouring pixels per lookup.

    pixels uint8 [N, C, ..., L] and out float32 [N, C, ..., L] are C-contiguous with an even L; pixels may
    have size 1 on a middle axis where out has more (it is broadcast, e.g. an image repeated over time).
    Each pair of bytes is read as one little-endian 16-bit index into a [C, 65536] table of float32 pairs
    (512 KB per channel), so the values are exactly those of the per-pixel lookup.
    """
    if pixels.shape[-1] % 2 or not (pixels.flags.c_contiguous and out.flags.c_contiguous):
        raise MediaError("lookup_pairs needs C-contiguous arrays with an even last axis.")
    table = np.ascontiguousarray(table, dtype=np.float32)
    pairs = _pair_table(table.tobytes(), table.shape[0])  # [C, 65536] uint64: (value of lo, value of hi)
    index = pixels.view("<u2")  # [N, C, ..., L / 2]
    words = out.view(np.uint64)  # [N, C, ..., L / 2]
    for channel in range(table.shape[0]):
        words[:, channel] = pairs[channel][index[:, channel]]
    return out


@functools.lru_cache(maxsize=16)
def _pair_table(table_bytes: bytes, channels: int) -> np.ndarray:
    """[C, 256] float32 -> [C, 65536] uint64 whose entry lo + 256 * hi holds (table[lo], table[hi]).

    Cached by the table's bytes: a processor's options give the same table call after call.
    """
    table = np.frombuffer(table_bytes, dtype=np.float32).reshape(channels, 256)
    low = np.broadcast_to(table[:, None, :], (channels, 256, 256))  # [C, hi, lo] -> value of lo
    high = np.broadcast_to(table[:, :, None], (channels, 256, 256))  # [C, hi, lo] -> value of hi
    pairs = np.stack([low, high], axis=-1).view(np.uint64).reshape(channels, 65536)
    pairs.flags.writeable = False  # shared by every call with this table
    return pairs
