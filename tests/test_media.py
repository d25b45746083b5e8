"""Media loading, pixel ops, frame sampling and hashing, against transformers as the oracle."""

import base64
import builtins
import functools
import http.server
import io
import threading
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import image_transforms as hf_transforms
from transformers import image_utils as hf_image_utils
from transformers import video_utils as hf_video_utils

from ocula.errors import MediaError, MediaTooLargeError
from ocula.media import (
    VideoMetadata,
    load_image,
    load_video,
    media_hash,
    normalize,
    pad,
    qwen2_vl_indices,
    rescale,
    resize,
    resize_torch,
    to_chw_float,
    uniform_indices,
)

RNG = np.random.default_rng(0)


def rand_u8(*shape) -> np.ndarray:
    return RNG.integers(0, 256, shape, dtype=np.uint8)


def png_bytes(image: PIL.Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def hf_rgb(image) -> np.ndarray:
    return hf_transforms.convert_to_rgb(image, return_numpy=True)


# ---- images: every input kind -------------------------------------------------------------------


def test_in_memory_inputs_give_the_same_pixels():
    hwc = rand_u8(5, 7, 3)
    expected = hwc
    inputs = [
        PIL.Image.fromarray(hwc),
        hwc,
        np.moveaxis(hwc, -1, 0),  # CHW
        torch.from_numpy(hwc),
        torch.from_numpy(np.moveaxis(hwc, -1, 0).copy()),
    ]
    for x in inputs:
        out = load_image(x)
        assert out.mode == "RGB" and out.size == (7, 5)
        np.testing.assert_array_equal(np.asarray(out), expected)


def test_float_and_gray_arrays_match_transformers_to_pil():
    f = RNG.random((6, 5, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(load_image(f)), np.asarray(hf_transforms.to_pil_image(f)))
    gray = rand_u8(6, 5)
    np.testing.assert_array_equal(np.asarray(load_image(gray)), np.repeat(gray[..., None], 3, axis=-1))
    np.testing.assert_array_equal(np.asarray(load_image(gray[None])), np.repeat(gray[..., None], 3, axis=-1))


@pytest.mark.parametrize(
    "mode", ["RGBA", "LA", "P_transparency", "L_transparency", "RGB_transparency", "L", "P"]
)
def test_alpha_compositing_matches_transformers(mode):
    rgba = rand_u8(9, 8, 4)
    base = PIL.Image.fromarray(rgba, "RGBA")
    if mode == "P_transparency":
        image = base.convert("RGB").quantize(16)
        image.info["transparency"] = 3
    elif mode == "L_transparency":
        image = base.convert("L")
        image.info["transparency"] = int(np.asarray(image)[0, 0])
    elif mode == "RGB_transparency":
        image = base.convert("RGB")
        image.info["transparency"] = tuple(int(v) for v in np.asarray(image)[1, 1])
    else:
        image = base.convert("RGB" if mode in ("L", "P") else mode).convert(mode)
    np.testing.assert_array_equal(np.asarray(load_image(image)), hf_rgb(image))
    # the same image through a PNG file keeps its transparency and gives the same pixels
    np.testing.assert_array_equal(np.asarray(load_image(png_bytes(image))), hf_rgb(image))


def test_rgba_arrays_match_transformers_numpy_path():
    rgba = rand_u8(6, 4, 4)
    np.testing.assert_array_equal(np.asarray(load_image(rgba)), hf_rgb(rgba))
    chw = np.moveaxis(rgba, -1, 0)
    np.testing.assert_array_equal(np.asarray(load_image(chw)), np.moveaxis(hf_rgb(chw), 0, -1))


def test_paths_file_urls_data_uris_and_bytes(tmp_path):
    image = PIL.Image.fromarray(rand_u8(4, 6, 3))
    data = png_bytes(image)
    (tmp_path / "a b.png").write_bytes(data)
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    raw_b64 = base64.b64encode(data).decode()  # a bare payload, as transformers accepts
    sources = [
        str(tmp_path / "a b.png"),
        tmp_path / "a b.png",
        f"file://{tmp_path}/a%20b.png",
        uri,
        data,
        raw_b64,
    ]
    for source in sources:
        np.testing.assert_array_equal(np.asarray(load_image(source)), np.asarray(image))


def test_exif_orientation_like_transformers_load_image(tmp_path):
    image = PIL.Image.fromarray(rand_u8(4, 6, 3))
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    (tmp_path / "r.jpg").write_bytes(png_bytes(image, "JPEG", exif=exif, quality=95))
    ours = load_image(str(tmp_path / "r.jpg"))
    assert ours.size == (4, 6)
    np.testing.assert_array_equal(
        np.asarray(ours), np.asarray(hf_image_utils.load_image(str(tmp_path / "r.jpg")))
    )


def test_alpha_can_be_dropped_like_transformers_load_image(tmp_path):
    rgba = PIL.Image.fromarray(rand_u8(5, 6, 4), "RGBA")
    rgba.save(tmp_path / "a.png")
    expected = np.asarray(hf_image_utils.load_image(str(tmp_path / "a.png")))
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "a.png", composite_alpha=False)), expected)
    assert not np.array_equal(np.asarray(load_image(tmp_path / "a.png")), expected)


def test_lazily_opened_truncated_pil_image(tmp_path):
    (tmp_path / "cut.png").write_bytes(png_bytes(PIL.Image.fromarray(rand_u8(32, 32, 3)))[:300])
    with pytest.raises(MediaError):
        load_image(PIL.Image.open(tmp_path / "cut.png"))


def test_bad_inputs_raise_media_error(tmp_path):
    truncated = png_bytes(PIL.Image.fromarray(rand_u8(32, 32, 3)))[:200]
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    (tmp_path / "cut.png").write_bytes(truncated)
    bad = [
        str(tmp_path / "junk.png"),
        str(tmp_path / "cut.png"),
        str(tmp_path / "missing.png"),
        "data:image/png;base64,AAAA",
        42,
        np.zeros((0, 4, 3), np.uint8),
        np.zeros((2, 2, 2, 3), np.uint8),
        np.full((2, 2, 3), 2.0),
        np.zeros((5, 5, 7), np.uint8),
    ]
    for x in bad:
        with pytest.raises(MediaError):
            load_image(x)
    with pytest.raises(MediaError, match="missing.png"):
        load_image(str(tmp_path / "missing.png"))


def test_pixel_limits(monkeypatch):
    data = png_bytes(PIL.Image.fromarray(rand_u8(20, 20, 3)))
    with pytest.raises(MediaTooLargeError, match="400 pixels"):
        load_image(data, max_pixels=399)
    with pytest.raises(MediaTooLargeError):
        load_image(np.zeros((20, 20, 3), np.uint8), max_pixels=100)
    assert load_image(data, max_pixels=400).size == (20, 20)
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 10)  # PIL's bomb check: error past 2x
    with pytest.raises(MediaTooLargeError):
        load_image(data, max_pixels=None)


# ---- URLs from a local server -------------------------------------------------------------------


@pytest.fixture
def server(tmp_path):
    handler = functools.partial(_QuietHandler, directory=str(tmp_path))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield tmp_path, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_http_urls(server):
    folder, base = server
    image = PIL.Image.fromarray(rand_u8(5, 3, 3))
    (folder / "x.png").write_bytes(png_bytes(image))
    np.testing.assert_array_equal(np.asarray(load_image(f"{base}/x.png", timeout=5)), np.asarray(image))
    with pytest.raises(MediaTooLargeError):
        load_image(f"{base}/x.png", max_bytes=10, timeout=5)
    with pytest.raises(MediaError, match="404"):
        load_image(f"{base}/absent.png", timeout=5)


# ---- pixel ops ----------------------------------------------------------------------------------

RESIZES = [((37, 53), (28, 56)), ((20, 30), (64, 84)), ((100, 80), (56, 42)), ((9, 9), (9, 9))]


@pytest.mark.parametrize("resample", [0, 2, 3, 1, "bicubic"])
@pytest.mark.parametrize(("src", "dst"), RESIZES)
def test_resize_matches_transformers_pil_backend(src, dst, resample):
    image = rand_u8(*src, 3)
    code = resample if isinstance(resample, int) else 3
    expected = hf_transforms.resize(image, dst, resample=code, input_data_format="channels_last")
    np.testing.assert_array_equal(resize(image, dst, resample), expected)


def test_resize_single_channel_and_pil_input():
    gray = rand_u8(11, 13, 1)
    expected = hf_transforms.resize(gray, (7, 5), resample=3, input_data_format="channels_last")
    np.testing.assert_array_equal(resize(gray, (7, 5)), expected)
    rgb = rand_u8(11, 13, 3)
    np.testing.assert_array_equal(resize(PIL.Image.fromarray(rgb), (7, 5)), resize(rgb, (7, 5)))


@pytest.mark.parametrize("mode", ["bicubic", "bilinear", "nearest"])
@pytest.mark.parametrize(("src", "dst"), RESIZES[:3])
def test_resize_torch_matches_torchvision(src, dst, mode):
    tvF = pytest.importorskip("torchvision.transforms.v2.functional")
    from torchvision.transforms import InterpolationMode

    batch = torch.from_numpy(rand_u8(2, 3, *src))
    for x in (batch, batch.float() / 255):
        expected = tvF.resize(x, list(dst), interpolation=InterpolationMode(mode), antialias=True)
        assert torch.equal(resize_torch(x, dst, mode), expected)


def test_rescale_normalize_pad_to_chw():
    image = rand_u8(4, 5, 3)
    scaled = rescale(image, 1 / 255)
    np.testing.assert_array_equal(scaled, hf_transforms.rescale(image, 1 / 255))
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    expected = hf_transforms.normalize(scaled, mean, std, input_data_format="channels_last")
    np.testing.assert_array_equal(normalize(scaled, mean, std), expected)
    np.testing.assert_array_equal(normalize(image, 0.5, 0.5), hf_transforms.normalize(image, 0.5, 0.5))
    padded = pad(image, (6, 8), value=7)
    expected = hf_transforms.pad(
        image, ((0, 2), (0, 3)), constant_values=7, input_data_format="channels_last"
    )
    np.testing.assert_array_equal(padded, expected)
    assert pad(image, (6, 7), position="center")[1:5, 1:6].tolist() == image.tolist()
    chw = to_chw_float(image)
    assert chw.dtype == torch.float32 and chw.shape == (3, 4, 5) and chw.is_contiguous()
    with pytest.raises(MediaError):
        pad(image, (3, 3))


# ---- video --------------------------------------------------------------------------------------


def write_mp4(path, num_frames: int = 14, fps: int = 6, size=(32, 48)):
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.height, stream.width = size
        stream.pix_fmt = "yuv420p"
        for i in range(num_frames):
            pixels = np.full((*size, 3), (i * 17) % 256, np.uint8)
            pixels[:, : 4 + i] = 255 - pixels[:, : 4 + i]
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


@pytest.fixture(scope="module")
def mp4(tmp_path_factory):
    return write_mp4(tmp_path_factory.mktemp("video") / "clip.mp4")


@pytest.mark.parametrize("kwargs", [{"num_frames": 4}, {"fps": 2}, {"fps": 1.5}, {}])
def test_video_file_matches_transformers_pyav(mp4, kwargs):
    frames, meta = load_video(mp4, **kwargs)
    hf_frames, hf_meta = hf_video_utils.load_video(mp4, backend="pyav", **kwargs)
    np.testing.assert_array_equal(frames, hf_frames)
    assert frames.dtype == np.uint8 and frames.shape[1:] == (32, 48, 3)
    assert meta.frames_indices == [int(i) for i in hf_meta.frames_indices]
    for name in ("total_num_frames", "fps", "duration", "width", "height"):
        assert getattr(meta, name) == getattr(hf_meta, name), name


def test_video_custom_sampler_and_url(mp4, server):
    folder, base = server
    (folder / "v.mp4").write_bytes(Path(mp4).read_bytes())

    def sampler(meta):
        return qwen2_vl_indices(meta.total_num_frames, meta.fps, fps=2)

    frames, meta = load_video(f"{base}/v.mp4", sample_indices_fn=sampler)
    local, _ = load_video(mp4, sample_indices_fn=sampler)
    np.testing.assert_array_equal(frames, local)
    assert meta.frames_indices == [0, 3, 7, 10] and meta.sampled_fps == pytest.approx(4 / 14 * 6)


def test_video_from_frames_and_arrays():
    video = rand_u8(6, 7, 5, 3)
    frames, meta = load_video(video, num_frames=3)
    np.testing.assert_array_equal(frames, video[[0, 2, 4]])
    assert (meta.total_num_frames, meta.width, meta.height, meta.fps) == (6, 5, 7, None)
    pil_frames = [PIL.Image.fromarray(f).convert("RGBA") for f in video]
    np.testing.assert_array_equal(load_video(pil_frames)[0], video)
    np.testing.assert_array_equal(load_video(torch.from_numpy(video).permute(0, 3, 1, 2))[0], video)
    frames, meta = load_video(video, fps=1, source_fps=2)
    assert meta.frames_indices == [0, 2, 4] and meta.timestamps == [0.0, 1.0, 2.0]
    with pytest.raises(MediaError, match="fps"):
        load_video(video, fps=1)
    with pytest.raises(MediaError):
        load_video([], num_frames=1)
    with pytest.raises(MediaError, match="same size"):
        load_video([video[0], video[0, :2]])


def test_video_errors(tmp_path, monkeypatch):
    (tmp_path / "bad.mp4").write_bytes(b"\x00" * 100)
    with pytest.raises(MediaError):
        load_video(str(tmp_path / "bad.mp4"))
    with pytest.raises(MediaError, match="No such"):
        load_video(str(tmp_path / "none.mp4"))
    real_import = builtins.__import__

    def no_av(name, *args, **kwargs):
        if name == "av":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_av)
    with pytest.raises(MediaError, match="pip install av"):
        load_video(str(tmp_path / "bad.mp4"))


@pytest.mark.parametrize("total", [1, 7, 16, 31, 300])
@pytest.mark.parametrize("video_fps", [6.0, 25.0, 29.97])
def test_uniform_indices_match_default_sample_indices_fn(total, video_fps):
    meta = hf_video_utils.VideoMetadata(total_num_frames=total, fps=video_fps)
    for kw in [
        {"num_frames": 1},
        {"num_frames": min(total, 5)},
        {"num_frames": total},
        {"fps": 1},
        {"fps": 2.5},
        {},
    ]:
        expected = hf_video_utils.default_sample_indices_fn(meta, **kw)
        np.testing.assert_array_equal(uniform_indices(total, video_fps=video_fps, **kw), expected)


@pytest.mark.parametrize("total", [4, 9, 16, 37, 301, 2000])
@pytest.mark.parametrize("video_fps", [6.0, 24.0, 29.97])
def test_qwen2_vl_indices_match_reference(total, video_fps):
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    processor = Qwen2VLVideoProcessor()
    meta = hf_video_utils.VideoMetadata(total_num_frames=total, fps=video_fps)
    for kw in [{"fps": 2}, {"fps": 0.5}, {"fps": 1}, {"num_frames": 4}, {"num_frames": 3}]:
        if kw.get("num_frames", 0) > total:
            continue
        expected = processor.sample_frames(meta, num_frames=kw.get("num_frames"), fps=kw.get("fps"))
        np.testing.assert_array_equal(qwen2_vl_indices(total, video_fps, **kw), expected.numpy())


def test_sampling_errors():
    with pytest.raises(MediaError):
        uniform_indices(3, num_frames=4)
    with pytest.raises(MediaError):
        uniform_indices(3, num_frames=1, fps=1, video_fps=1)
    with pytest.raises(MediaError):
        qwen2_vl_indices(3, 1.0, num_frames=4)


def test_video_metadata_fields():
    meta = VideoMetadata(10, 5.0, 2.0, 8, 6, [0, 5])
    assert meta.timestamps == [0.0, 1.0] and meta.sampled_fps == 1.0


# ---- hashing ------------------------------------------------------------------------------------


def test_media_hash():
    a = rand_u8(4, 4, 3)
    b = a.copy()
    b[0, 0, 0] ^= 1
    h = media_hash(a, max_pixels=100)
    assert h == media_hash(a.copy(), max_pixels=100) and len(h) == 32
    assert h != media_hash(b, max_pixels=100)
    assert h != media_hash(a, max_pixels=101)
    assert h != media_hash(a.reshape(2, 8, 3), max_pixels=100)
    assert media_hash(a, x=1, y=2) == media_hash(a, y=2, x=1)
    assert media_hash(PIL.Image.fromarray(a)) == media_hash(PIL.Image.fromarray(a.copy()))
    assert media_hash(torch.from_numpy(a)) != media_hash(torch.from_numpy(b))
    assert media_hash([a, a]) != media_hash([a]) and media_hash([a, b]) != media_hash([b, a])
    with pytest.raises(MediaError):
        media_hash(object())
