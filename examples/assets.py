"""Small media for the examples, made procedurally (no downloads): images and a short mp4.

Each example imports `example_image` / `example_video` and `MODEL`: the checkpoint to run, a local folder or
a hub id, from the OCULA_MODEL environment variable (default: the tiny model that ships with ocula).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

OUT = Path(os.environ.get("OCULA_EXAMPLE_ASSETS", Path(tempfile.gettempdir()) / "ocula-example-assets"))
MODEL = os.environ.get("OCULA_MODEL") or str(Path(__file__).resolve().parent.parent / "ocula" / "assets" / "shapes-qwen2-vl")

_COLOURS = [(220, 40, 40), (40, 90, 220), (40, 170, 60), (240, 200, 30)]


def _scene(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height), (245, 245, 240))
    draw = ImageDraw.Draw(image)
    for i in range(int(rng.integers(1, 4))):
        r = int(min(width, height) * rng.uniform(0.1, 0.2))
        x, y = int(rng.uniform(r, width - r)), int(rng.uniform(r, height - r))
        colour = _COLOURS[(seed + i) % len(_COLOURS)]
        if i % 2:
            draw.rectangle([x - r, y - r, x + r, y + r], fill=colour)
        else:
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    return image


def example_image(name: str = "image1.jpg", width: int = 224, height: int = 168, seed: int = 0) -> str:
    """Write a small JPEG scene once and return its path."""
    path = OUT / name
    if not path.exists():
        OUT.mkdir(parents=True, exist_ok=True)
        _scene(width, height, seed).save(path, quality=92)
    return str(path)


def example_video(name: str = "video.mp4", frames: int = 8, fps: int = 4, width: int = 112, height: int = 84) -> str:
    """Write a short mp4 (a square moving across the frame) with PyAV once and return its path."""
    import av

    path = OUT / name
    if path.exists():
        return str(path)
    OUT.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            image = Image.new("RGB", (width, height), (250, 250, 250))
            x = int(i * (width - 20) / max(frames - 1, 1))
            ImageDraw.Draw(image).rectangle([x, 30, x + 20, 50], fill=(200, 30, 30))
            for packet in stream.encode(av.VideoFrame.from_image(image)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)
