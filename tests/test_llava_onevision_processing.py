"""LLaVA-OneVision preprocessing against transformers 5.23 (PIL image processor, torch video processor).

Parity: prompt strings and input_ids identical, every tensor of the same shape and dtype and within 1e-5,
for images hitting many pinpoints (and the anyres_max_9 downsampling), odd modes, multi-image samples,
images across turns, mixed left-padded batches, videos (frames, sampled, from a file) and both layouts.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ocula.errors import PlaceholderMismatchError
from ocula.models.llava_onevision.processing import (
    LlavaOnevisionProcessor,
    best_resolution,
    feature_grid,
    image_num_tokens,
)
from tests.checkpoints import LLAVA_TILE, hf_processor, make_image, make_video_frames, write_mp4

PATCHES = LLAVA_TILE // 14


@pytest.fixture(scope="module")
def procs(llava_onevision_ckpt):
    return LlavaOnevisionProcessor.from_pretrained(llava_onevision_ckpt), hf_processor(llava_onevision_ckpt)


def assert_same(ours, ref) -> None:
    assert sorted(ours.keys()) == sorted(ref.keys())
    for key in ref:
        a, b = ours[key], ref[key]
        assert a.shape == b.shape and a.dtype == b.dtype, (key, a.shape, b.shape, a.dtype, b.dtype)
        if a.dtype.is_floating_point:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=key)
        else:
            assert torch.equal(a, b), key


def both(procs, **kwargs):
    ours, ref = procs
    out, expected = ours(**kwargs, return_tensors="pt"), ref(**kwargs, return_tensors="pt")
    assert_same(out, expected)
    return out


# Sizes (width, height): tiny, wide, tall, square, odd, and large ones that need downsampling.
SIZES = [(13, 7), (100, 70), (40, 130), (61, 59), (500, 31), (59, 400), (300, 200), (360, 360), (1000, 900)]


@pytest.mark.parametrize("size", SIZES)
def test_single_image_sizes(procs, size):
    out = both(procs, text=["Look: <image> what?"], images=[make_image(*size, seed=sum(size))])
    width, height = size
    grid = feature_grid(height, width, procs[0].image_processor.image_grid_pinpoints, LLAVA_TILE, PATCHES, 9)
    assert int((out["input_ids"] == procs[0].image_token_id).sum()) == image_num_tokens(grid, PATCHES)


def test_sizes_cover_pinpoints_and_downsampling(procs):
    pinpoints = procs[0].image_processor.image_grid_pinpoints
    hit = {best_resolution(h, w, pinpoints) for w, h in SIZES}
    assert len(hit) >= 6
    grids = [feature_grid(h, w, pinpoints, LLAVA_TILE, PATCHES, 9) for w, h in SIZES]
    assert any(g.final is not None for g in grids) and any(g.final is None for g in grids)


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P"])
def test_image_modes(procs, mode):
    both(procs, text=["<image>"], images=[make_image(90, 50, mode=mode, seed=3)])


def test_array_inputs(procs):
    image = np.array(make_image(70, 45, seed=5))
    both(
        procs,
        text=["<image>", "<image>"],
        images=[image, torch.from_numpy(image).permute(2, 0, 1)],
        padding=True,
    )


def test_multi_image_sample_and_mixed_batch(procs):
    images = [
        [make_image(100, 70, "RGBA")],
        [],
        [make_image(40, 130, "L", seed=1), make_image(300, 200, seed=2)],
    ]
    texts = ["<image> one", "text only", "<image><image> two"]
    out = both(procs, text=texts, images=images, padding=True, padding_side="left")
    assert out["batch_num_images"].tolist() == [1, 2]
    # each image of a multi-image sample: one tile + one newline
    assert int((out["input_ids"][2] == procs[0].image_token_id).sum()) == 2 * (PATCHES**2 + 1)


def test_flat_list_of_images_is_one_per_sample(procs):
    both(procs, text=["<image> a <image>"], images=[make_image(80, 50), make_image(50, 80, seed=3)])


CONVERSATION = [
    {"role": "user", "content": [{"type": "image", "image": make_image(100, 70)},
                                 {"type": "text", "text": "What?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]},
    {"role": "user", "content": [{"type": "image", "image": make_image(50, 90, seed=4)},
                                 {"type": "text", "text": "And this one?"}]},
]  # fmt: skip


def test_chat_template_prompt_and_tokens(procs):
    ours, ref = procs
    text = ours.apply_chat_template(CONVERSATION, add_generation_prompt=True)
    assert text == ref.apply_chat_template(CONVERSATION, add_generation_prompt=True)
    assert text.count("<image>") == 2 and text.endswith("<|im_start|>assistant\n")
    kwargs = {"add_generation_prompt": True, "tokenize": True, "return_dict": True, "return_tensors": "pt"}
    out = ours.apply_chat_template(CONVERSATION, **kwargs)
    assert_same(out, ref.apply_chat_template(CONVERSATION, **kwargs))


def test_chat_batch_mixed(procs):
    ours, ref = procs
    text_only = [{"role": "user", "content": [{"type": "text", "text": "Hello, how are you?"}]}]
    single = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": make_image(200, 120, seed=7)},
                {"type": "text", "text": "Describe."},
            ],
        }
    ]
    kwargs = {
        "add_generation_prompt": True,
        "tokenize": True,
        "return_dict": True,
        "padding": True,
        "padding_side": "left",
        "return_tensors": "pt",
    }
    batch = [CONVERSATION, text_only, single]
    assert_same(ours.apply_chat_template(batch, **kwargs), ref.apply_chat_template(batch, **kwargs))


def test_video_frames(procs):
    videos = [make_video_frames(4, 50, 40), make_video_frames(4, 30, 80, seed=1)]
    out = both(procs, text=["<video> x", "<video> y"], videos=videos, padding=True)
    assert out["pixel_values_videos"].shape == (2, 4, 3, LLAVA_TILE, LLAVA_TILE)
    assert int((out["input_ids"][0] == procs[0].video_token_id).sum()) == 4 * 2 * 2 + 1


def test_video_sampled_frames_and_array(procs):
    frames = np.stack([np.asarray(f) for f in make_video_frames(10, 50, 40, seed=2)])
    both(procs, text=["<video>"], videos=[frames], num_frames=4, do_sample_frames=True)


def test_video_file(procs, tmp_path):
    from transformers.video_utils import load_video

    path = write_mp4(tmp_path / "clip.mp4", 12, 64, 48)
    ours, ref = procs
    conversation = [
        {"role": "user", "content": [{"type": "video", "path": str(path)}, {"type": "text", "text": "Why?"}]}
    ]
    out = ours.apply_chat_template(
        conversation,
        num_frames=8,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    frames, meta = load_video(str(path), backend="pyav")  # transformers wants torchcodec for paths
    prompt = ref.apply_chat_template(conversation, add_generation_prompt=True)
    expected = ref(
        text=prompt,
        videos=[frames],
        video_metadata=[meta],
        num_frames=8,
        do_sample_frames=True,
        return_tensors="pt",
    )
    assert_same(out, expected)
    assert out["pixel_values_videos"].shape[1] == 8


def test_hub_layout_matches(llava_onevision_ckpt_hub, procs):
    hub = LlavaOnevisionProcessor.from_pretrained(llava_onevision_ckpt_hub)
    kwargs = {"text": ["<image> hi"], "images": [make_image(120, 45)], "return_tensors": "pt"}
    assert_same(hub(**kwargs), procs[0](**kwargs))
    assert hub.num_image_tokens == PATCHES**2 and hub.chat_template == procs[0].chat_template


def test_num_multimodal_tokens(procs):
    ours, ref = procs
    sizes = [(h, w) for w, h in SIZES]
    a = ours._get_num_multimodal_tokens(image_sizes=sizes, video_sizes=[(8, 40, 50)])
    b = ref._get_num_multimodal_tokens(image_sizes=sizes, video_sizes=[(8, 40, 50)])
    assert a["num_image_tokens"] == b["num_image_tokens"] and a["num_video_tokens"] == b["num_video_tokens"]


def test_placeholder_mismatch(procs):
    with pytest.raises(PlaceholderMismatchError, match="1 <image>"):
        procs[0](text=["<image> one"], images=[make_image(30, 30), make_image(40, 40)])


def test_media_report(procs):
    result = procs[0].process(
        text=["<image> a", "<video> b"],
        images=[make_image(90, 60)],
        videos=[make_video_frames(4, 30, 30)],
        padding=True,
        return_tensors="pt",
    )
    ids = result.features["input_ids"]
    image, video = result.media
    assert (image.modality, image.rows, video.modality, video.rows) == ("image", (0, 1), "video", (0, 1))
    assert int((ids[0] == image.token_id).sum()) == image.num_tokens
    assert int(ids[1, video.offset]) == video.token_id and video.num_tokens == 4 * 4 + 1
    assert image.content_hash and image.content_hash != video.content_hash


def test_media_hash_tells_tiling_apart(procs):
    image = make_image(90, 60)
    alone = procs[0].process(text=["<image>"], images=[[image]]).media[0]
    paired = procs[0].process(text=["<image><image>"], images=[[image, make_image(30, 30)]]).media[0]
    assert alone.num_tokens != paired.num_tokens and alone.content_hash != paired.content_hash
    again = procs[0].process(text=["<image> again"], images=[image]).media[0]
    assert again.content_hash == alone.content_hash


def test_real_checkpoint_geometry():
    """The hub checkpoints' 384-pixel tiles, 27 x 27 patches and default pinpoints (REFERENCE.md counts)."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    from ocula.models.llava_onevision.processing import LlavaOnevisionImageProcessor

    pinpoints = LlavaOnevisionImageProcessor().image_grid_pinpoints
    tokens = [
        image_num_tokens(feature_grid(h, w, pinpoints, 384, 27, 9), 27) for h, w in [(480, 640), (1080, 1920)]
    ]
    assert tokens == [2929, 7269]
    image = make_image(640, 480, seed=9)
    ours = LlavaOnevisionImageProcessor()(image, return_tensors="pt")
    ref = LlavaOnevisionImageProcessorPil()(image, return_tensors="pt")
    assert_same(ours, ref)
    assert ours["pixel_values"].shape == (1, 5, 3, 384, 384)
