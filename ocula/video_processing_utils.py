"""Video inputs shared by the video processors: batching, frame arrays, metadata, decoding and sampling.

Notable features:
- `flatten_videos`: transformers' `make_batched_videos` (paths, [T, H, W, C] / [T, C, H, W] arrays and
  tensors, lists of frames or of frame paths, nested per sample);
- `frames_array`: any of those -> uint8 RGB [T, H, W, 3] (a second axis of 1 or 3 is the channel axis,
  as in transformers); `metadata_list`: `video_metadata` as one dict per video;
- `VideoLoaderMixin.load`: decodes paths with PyAV reading only the sampled frames, takes arrays and
  frame lists as given, and samples them with the processor's own `sample_indices` when
  `do_sample_frames` (each family keeps its own sampling rule).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import PIL.Image
import torch

from .errors import MediaError
from .image_processing_utils import is_image, to_rgb_array
from .media import load_video

__all__ = ["Video", "VideoLoaderMixin", "flatten_videos", "frames_array", "metadata_list"]


@dataclasses.dataclass
class Video:
    """Decoded (and sampled) frames of one video with what is known about its source."""

    frames: np.ndarray  # uint8 [T, H, W, 3]
    total_num_frames: int  # frames in the source before sampling
    fps: float | None  # source frame rate (None when unknown)
    frames_indices: list[int]  # source index of each kept frame


def _is_frame(x: Any) -> bool:
    return isinstance(x, PIL.Image.Image) or (isinstance(x, (np.ndarray, torch.Tensor)) and x.ndim == 3)


def _is_video(x: Any) -> bool:
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return x.ndim == 4
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(_is_frame(f) for f in x)


def flatten_videos(videos: Any) -> list[Any]:
    """transformers' `make_batched_videos`: a flat list of videos (paths, arrays, frame lists)."""
    try:  # per-sample lists of videos given as lists of frame paths
        if isinstance(videos[0][0], (list, tuple)) and isinstance(videos[0][0][0], str):
            return [paths for sample in videos for paths in sample]
    except (IndexError, TypeError, KeyError):
        pass
    if isinstance(videos, (np.ndarray, torch.Tensor)) and videos.ndim == 5:
        return list(videos)
    if isinstance(videos, str) or _is_video(videos):
        return [videos]
    if is_image(videos):
        return [[videos]]
    if not isinstance(videos, (list, tuple)):
        raise MediaError(
            f"Cannot read videos from a {type(videos).__name__}: pass a path, a [T, H, W, C] "
            "array, a list of frames, or a (nested) list of them."
        )
    flat: list[Any] = []
    for item in videos:
        if isinstance(item, str) or _is_video(item):
            flat.append(item)
        elif isinstance(item, (list, tuple)) and item:
            flat.extend(flatten_videos(item))
    return flat


def frames_array(video: Any) -> np.ndarray:
    """A 4-D array / tensor (TCHW or THWC) or a list of frames -> uint8 RGB [T, H, W, 3]."""
    if isinstance(video, (list, tuple)):
        return np.stack([to_rgb_array(frame) for frame in video])
    array = video.detach().cpu().numpy() if isinstance(video, torch.Tensor) else np.asarray(video)
    if array.shape[1] in (1, 3):  # like transformers, a second axis of 1 or 3 is the channel axis
        array = array.transpose(0, 2, 3, 1)
    if array.dtype == np.uint8 and array.shape[-1] == 3:
        return array
    return np.stack([to_rgb_array(frame, channels_last=True) for frame in array])


def metadata_list(video_metadata: Any, count: int) -> list[dict[str, Any]] | None:
    """`video_metadata` (one, a list, or per-sample lists; dicts or objects) -> one dict per video."""
    if video_metadata is None:
        return None
    if not isinstance(video_metadata, (list, tuple)):
        video_metadata = [video_metadata]
    if video_metadata and isinstance(video_metadata[0], (list, tuple)):
        video_metadata = [m for sample in video_metadata for m in sample]
    if len(video_metadata) != count:
        raise MediaError(
            f"Got {count} videos but {len(video_metadata)} video_metadata entries: pass one per video."
        )
    return [
        m if isinstance(m, dict) else dict(m) if isinstance(m, Mapping) else vars(m) for m in video_metadata
    ]


class VideoLoaderMixin:
    """`load` for a video processor dataclass with `do_sample_frames`, `replace` and `sample_indices`."""

    def load(self, videos: Any, kwargs: dict[str, Any] | None = None) -> list[Video]:
        """Decode every video and sample its frames as the call's options say."""
        kwargs = dict(kwargs or {})
        metadata = kwargs.pop("video_metadata", None)
        options = self.replace(**kwargs)
        flat = flatten_videos(videos)
        metas = metadata_list(metadata, len(flat))
        return [options._load_one(video, metas[i] if metas else None) for i, video in enumerate(flat)]

    def _load_one(self, video: Any, meta: dict[str, Any] | None) -> Video:
        if isinstance(video, str):  # decode only the sampled frames, as transformers does
            sample = (
                (lambda m: self.sample_indices(m.total_num_frames, m.fps)) if self.do_sample_frames else None
            )
            frames, info = load_video(video, sample_indices_fn=sample)
            return Video(frames, info.total_num_frames, info.fps, list(info.frames_indices))
        if isinstance(video, (list, tuple)) and video and isinstance(video[0], str):
            if self.do_sample_frames:
                raise MediaError("Frames given as image paths cannot be sampled: pass do_sample_frames=False.")
            frames = np.stack([to_rgb_array(f) for f in video])
            return Video(frames, len(frames), None, list(range(len(frames))))
        frames, meta = frames_array(video), meta or {}
        total = int(meta.get("total_num_frames") or len(frames))
        clip = Video(frames, total, meta.get("fps"), list(range(len(frames))))
        return self._sample(clip) if self.do_sample_frames else clip

    def _sample(self, clip: Video) -> Video:
        indices = self.sample_indices(clip.total_num_frames, clip.fps)
        if indices and max(indices) >= len(clip.frames):
            raise MediaError(
                f"The video says it has {clip.total_num_frames} frames but {len(clip.frames)} were "
                "decoded: pass video_metadata with the right total_num_frames."
            )
        return Video(clip.frames[indices], clip.total_num_frames, clip.fps, indices)
