"""Media inputs: images and video to RGB pixels, the shared pixel ops, and content hashes."""

from .fetch import decode_data_uri, download
from .hashing import media_hash
from .image import DEFAULT_MAX_PIXELS, array_to_rgb, load_image, pil_to_rgb
from .ops import normalize, pad, resample_filter, rescale, resize, resize_torch, to_chw_float
from .video import VideoMetadata, frames_to_array, load_video, qwen2_vl_indices, uniform_indices

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "VideoMetadata",
    "array_to_rgb",
    "decode_data_uri",
    "download",
    "frames_to_array",
    "load_image",
    "load_video",
    "media_hash",
    "normalize",
    "pad",
    "pil_to_rgb",
    "qwen2_vl_indices",
    "resample_filter",
    "rescale",
    "resize",
    "resize_torch",
    "to_chw_float",
    "uniform_indices",
]
