"""Video decoding (PyAV) and frame sampling, index for index as transformers samples.

Notable features:
- sources: a path, `file://` / `http(s)://` URL, a list of frames (PIL images / arrays) or an array
  [T, H, W, C]; output is always uint8 [T, H, W, 3] plus a `VideoMetadata`;
- sampling is a pure function of the metadata: `uniform_indices` is transformers'
  `default_sample_indices_fn` (also LLaVA-OneVision's `sample_frames`), `qwen2_vl_indices` is
  Qwen2-VL's `sample_frames` (frame counts rounded to the temporal patch size);
- decoding follows transformers' `read_video_pyav`: frame count and `average_rate` from the stream
  header, decode from the start up to the last wanted index;
- `av` is imported lazily; without it, a `MediaError` says `pip install av`.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import PIL.Image
import torch

from ..errors import MediaError
from .fetch import DEFAULT_MAX_BYTES, DEFAULT_TIMEOUT_S, describe, read_source
from .image import array_to_rgb, pil_to_rgb, to_numpy


@dataclass
class VideoMetadata:
    """What is known about a video and which of its frames were kept."""

    total_num_frames: int  # frames in the source (before sampling)
    fps: float | None = None  # source frame rate; None for frame lists without one
    duration: float | None = None  # seconds: total_num_frames / fps
    width: int | None = None
    height: int | None = None
    frames_indices: list[int] = field(default_factory=list)  # source indices of the returned frames
    video_backend: str | None = None

    @property
    def timestamps(self) -> list[float]:
        """Seconds of each returned frame."""
        if not self.fps:
            raise MediaError("This video has no fps, so its frames have no timestamps; pass source_fps.")
        return [i / self.fps for i in self.frames_indices]

    @property
    def sampled_fps(self) -> float:
        """Frame rate after sampling (transformers' default of 24 when unknown)."""
        if not self.frames_indices or not self.total_num_frames or not self.fps:
            return self.fps or 24
        return len(self.frames_indices) / self.total_num_frames * self.fps


SampleFn = Callable[[VideoMetadata], Sequence[int]]


def uniform_indices(
    total_num_frames: int,
    *,
    num_frames: int | None = None,
    fps: float | None = None,
    video_fps: float | None = None,
) -> np.ndarray:
    """transformers' `default_sample_indices_fn`: `num_frames` evenly spaced, or `fps` per second, or all."""
    if num_frames is not None and fps is not None:
        raise MediaError("num_frames and fps are mutually exclusive: pass one of them.")
    if num_frames is None and fps is not None:
        if not video_fps:
            raise MediaError("Sampling by fps needs the video's own fps; pass num_frames or source_fps.")
        num_frames = max(1, int(total_num_frames / video_fps * fps))
    if num_frames is None:
        return np.arange(total_num_frames, dtype=int)
    if num_frames > total_num_frames:
        raise MediaError(
            f"Asked for {num_frames} frames but the video has {total_num_frames}; lower num_frames or fps."
        )
    return np.arange(num_frames, dtype=int) * total_num_frames // num_frames


def qwen2_vl_indices(
    total_num_frames: int,
    video_fps: float | None,
    *,
    num_frames: int | None = None,
    fps: float | None = None,
    temporal_patch_size: int = 2,
    min_frames: int = 4,
    max_frames: int = 768,
) -> np.ndarray:
    """Qwen2-VL's `sample_frames`: a frame count rounded to `temporal_patch_size`, spread evenly."""
    if num_frames is not None and fps is not None:
        raise MediaError("num_frames and fps are mutually exclusive: pass one of them.")
    if num_frames is not None:
        num_frames = round(num_frames / temporal_patch_size) * temporal_patch_size
    elif fps is not None:
        if not video_fps:
            raise MediaError("Sampling by fps needs the video's own fps; pass num_frames or source_fps.")
        max_frames = math.floor(min(max_frames, total_num_frames) / temporal_patch_size) * temporal_patch_size
        wanted = min(max(total_num_frames / video_fps * fps, min_frames), max_frames, total_num_frames)
        num_frames = math.floor(wanted / temporal_patch_size) * temporal_patch_size
    if num_frames is not None and num_frames > total_num_frames:
        raise MediaError(
            f"Asked for {num_frames} frames but the video has {total_num_frames}; lower num_frames or fps."
        )
    if num_frames is not None and num_frames < temporal_patch_size:
        raise MediaError(
            f"Frame sampling kept {num_frames} frames, fewer than temporal_patch_size={temporal_patch_size}: "
            "raise num_frames or fps."
        )
    if num_frames is None:
        return np.arange(total_num_frames, dtype=int)
    # the float32 arange of the reference, truncated: spacing errors must round the same way
    return torch.arange(0, total_num_frames, total_num_frames / num_frames).int().numpy().astype(int)


def load_video(
    video,
    *,
    num_frames: int | None = None,
    fps: float | None = None,
    sample_indices_fn: SampleFn | None = None,
    source_fps: float | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    max_bytes: int = 8 * DEFAULT_MAX_BYTES,
) -> tuple[np.ndarray, VideoMetadata]:
    """Decode / stack `video` and keep the sampled frames: (uint8 [T, H, W, 3], metadata).

    `sample_indices_fn(metadata)` overrides `num_frames` / `fps` (e.g. a partial of `qwen2_vl_indices`);
    `source_fps` gives frame lists and arrays a frame rate so that `fps` sampling works for them too.
    """
    if sample_indices_fn is None:

        def sample_indices_fn(meta: VideoMetadata) -> np.ndarray:
            return uniform_indices(meta.total_num_frames, num_frames=num_frames, fps=fps, video_fps=meta.fps)

    if isinstance(video, (str, os.PathLike)):
        return _decode_pyav(
            read_source(video, timeout=timeout, max_bytes=max_bytes), describe(str(video)), sample_indices_fn
        )
    frames = frames_to_array(video)
    meta = _array_metadata(frames, source_fps)
    indices = _checked_indices(sample_indices_fn(meta), meta.total_num_frames)
    meta.frames_indices = indices
    return frames[indices], meta


def frames_to_array(video) -> np.ndarray:
    """Frames (PIL images / arrays) or an array / tensor [T, H, W, C] or [T, C, H, W] -> uint8 [T, H, W, 3]."""
    if isinstance(video, (np.ndarray, torch.Tensor)):
        array = to_numpy(video)
        if array.ndim != 4:
            raise MediaError(f"A video array must be [T, H, W, C] or [T, C, H, W], got shape {array.shape}.")
        # one layout for the whole video; channels-first wins when ambiguous, as in transformers
        first = array.shape[1] in (1, 3, 4) or array.shape[-1] not in (1, 3, 4)
        frames, layout = list(array), first
    elif isinstance(video, (list, tuple)):
        frames, layout = list(video), None
    else:
        raise MediaError(
            f"Unsupported video input {type(video).__name__}: pass a path, URL, frame list or array."
        )
    if not frames:
        raise MediaError("Empty video: it needs at least one frame.")
    rgb = [_frame_to_rgb(frame, layout) for frame in frames]
    if len({f.shape for f in rgb}) != 1:
        raise MediaError("All frames of a video must have the same size.")
    return np.stack(rgb)


def _frame_to_rgb(frame, channels_first: bool | None) -> np.ndarray:
    if isinstance(frame, PIL.Image.Image):
        return np.asarray(pil_to_rgb(frame))
    return array_to_rgb(to_numpy(frame), channels_first)


def _array_metadata(frames: np.ndarray, source_fps: float | None) -> VideoMetadata:
    total, height, width = frames.shape[:3]
    duration = total / source_fps if source_fps else None
    return VideoMetadata(total, source_fps, duration, width, height)


def _checked_indices(indices, total: int) -> list[int]:
    indices = [int(i) for i in indices]
    if not indices:
        raise MediaError("Frame sampling selected no frames; raise num_frames or fps.")
    if min(indices) < 0 or max(indices) >= total:
        raise MediaError(f"Frame indices {indices} fall outside the video's {total} frames.")
    return indices


def _import_av():
    try:
        import av
    except ImportError:
        raise MediaError(
            "Decoding video files needs PyAV: `pip install av` (or pass decoded frames)."
        ) from None
    return av


def _decode_pyav(source, name: str, sample_indices_fn: SampleFn) -> tuple[np.ndarray, VideoMetadata]:
    av = _import_av()
    try:
        with av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source)) as container:
            meta = _stream_metadata(container)
            indices = _checked_indices(sample_indices_fn(meta), meta.total_num_frames)
            frames = _decode_frames(container, set(indices), max(indices))
    except av.FFmpegError as error:
        raise MediaError(
            f"Cannot decode video {name!r}: {error}. The file is corrupt or not a video."
        ) from None
    if not frames:
        raise MediaError(f"Video {name!r} has no decodable frames at {indices[:8]}.")
    meta.frames_indices = indices
    return np.stack(frames), meta


def _stream_metadata(container) -> VideoMetadata:
    if not container.streams.video:
        raise MediaError("The file has no video stream.")
    stream = container.streams.video[0]
    rate = float(stream.average_rate) if stream.average_rate else None
    total = int(stream.frames) or _count_frames(container)
    container.seek(0)
    duration = total / rate if rate else 0.0
    return VideoMetadata(total, rate, duration, stream.width, stream.height, video_backend="pyav")


def _count_frames(container) -> int:
    """Containers without a frame count in the header: count by demuxing (no decoding)."""
    count = sum(1 for packet in container.demux(video=0) if packet.size)
    container.seek(0)
    return count


def _decode_frames(container, wanted: set[int], last: int) -> list[np.ndarray]:
    frames = []
    for i, frame in enumerate(container.decode(video=0)):
        if i > last:
            break
        if i in wanted:
            frames.append(frame.to_ndarray(format="rgb24"))
    return frames
