"""Qwen2-VL processors against transformers' Qwen2VLProcessor (PIL image backend, torchvision video path).

Every case compares the prompt string, input_ids, attention_mask, mm_token_type_ids (exactly), the grids
(exactly) and the pixel tensors (max |diff| <= 1e-5), on tiny checkpoints in both folder layouts.
"""

import dataclasses

import numpy as np
import pytest
import torch

from ocula.errors import PlaceholderMismatchError
from ocula.models.qwen2_vl.processing import (
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    smart_resize,
)
from tests.checkpoints import hf_processor, make_image, make_video_frames, write_mp4

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers: min_pixels deprecation

INT_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw", "video_grid_thw")
PIXEL_KEYS = ("pixel_values", "pixel_values_videos")


def assert_same(ours, theirs):
    assert sorted(ours.keys()) == sorted(theirs.keys())
    for key in theirs:
        a, b = ours[key], theirs[key]
        assert a.dtype == b.dtype and a.shape == b.shape, (key, a.dtype, b.dtype, a.shape, b.shape)
        if key in PIXEL_KEYS:
            assert (a - b).abs().max().item() <= 1e-5, key
        else:
            assert torch.equal(a, b), key


@pytest.fixture(scope="module", params=["v5", "hub"])
def pair(request, make_ckpt):
    """(ocula processor, transformers processor) for the same checkpoint, in both layouts."""
    folder = make_ckpt("qwen2_vl", request.param)
    return Qwen2VLProcessor.from_pretrained(folder), hf_processor(folder)


def chat(*content, text="Describe this.", system=None):
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": [*content, {"type": "text", "text": text}]}]


def check_chat(pair, conversation, **kwargs):
    ours, theirs = pair
    for tokenize in (False, True):
        kw = dict(add_generation_prompt=True, tokenize=tokenize, **kwargs)
        if tokenize:
            kw.update(return_dict=True, return_tensors="pt")
        a, b = ours.apply_chat_template(conversation, **kw), theirs.apply_chat_template(conversation, **kw)
        if tokenize:
            assert_same(a, b)
        else:
            assert a == b
    return a


def test_text_only(pair):
    out = check_chat(pair, [{"role": "user", "content": "Hello there"}])
    assert set(out.keys()) == {"input_ids", "attention_mask", "mm_token_type_ids"}


@pytest.mark.parametrize(
    "size,mode",
    [((9, 7), "RGB"), ((300, 40), "RGB"), ((30, 250), "RGB"), ((64, 48), "L"), ((50, 70), "RGBA")],
)
def test_one_image(pair, size, mode):
    out = check_chat(pair, chat({"type": "image", "image": make_image(*size, mode=mode, seed=sum(size))}))
    grid = out["image_grid_thw"][0]
    assert int((out["mm_token_type_ids"] == 1).sum()) == int(grid.prod()) // 4


def test_several_images_and_vision_ids(pair):
    images = [{"type": "image", "image": make_image(40 + 9 * i, 60 - 7 * i, seed=i)} for i in range(3)]
    check_chat(pair, chat(*images))
    check_chat(pair, chat(*images), add_vision_id=True)


def test_multi_turn(pair):
    conversation = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {
            "role": "user",
            "content": [
                {"type": "image", "image": make_image(80, 40, seed=1)},
                {"type": "text", "text": "What is it?"},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "A shape."}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "And this?"},
                {"type": "image", "image": make_image(33, 66, seed=2)},
            ],
        },
    ]
    check_chat(pair, conversation)


def test_video_from_frames(pair):
    frames = make_video_frames(6, 64, 48, seed=3)
    out = check_chat(pair, chat({"type": "video", "video": frames}))
    assert out["video_grid_thw"][0, 0].item() == 3  # 6 frames / temporal patch 2
    check_chat(pair, chat({"type": "video", "video": frames}), num_frames=4)
    odd = make_video_frames(5, 40, 40, seed=4)  # padded with its last frame to 6
    check_chat(pair, chat({"type": "video", "video": odd}))


def test_video_file_with_fps(pair, tmp_path):
    from transformers.video_utils import load_video as hf_load_video

    path = write_mp4(tmp_path / "clip.mp4", n_frames=12, w=64, h=48, fps=4)
    ours, theirs = pair
    conversation = chat({"type": "video", "path": str(path)}, text="What happens?")
    for fps_key in ("fps", "video_fps"):
        a = ours.apply_chat_template(
            conversation,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            **{fps_key: 2},
        )
        # transformers wants torchcodec for files: decode with PyAV and pass frames + metadata instead
        frames, metadata = hf_load_video(str(path), backend="pyav")
        prompt = theirs.apply_chat_template(conversation, add_generation_prompt=True)
        b = theirs(
            text=prompt,
            videos=[frames],
            video_metadata=[metadata],
            do_sample_frames=True,
            fps=2,
            return_tensors="pt",
        )
        assert_same(a, b)
        assert a["video_grid_thw"][0, 0].item() == 3  # 12 frames at 4 fps, sampled at 2 fps = 6 frames


def test_image_and_video(pair):
    content = [
        {"type": "video", "video": make_video_frames(4, 56, 56, seed=5)},
        {"type": "image", "image": make_image(70, 30, seed=6)},
    ]
    out = check_chat(pair, chat(*content))
    assert {0, 1, 2} == set(out["mm_token_type_ids"].unique().tolist())


def test_left_padded_batch_of_mixed_conversations(pair):
    ours, theirs = pair
    batch = [
        chat({"type": "image", "image": make_image(50, 50, seed=7)}, text="One image."),
        [{"role": "user", "content": "Only text, and a longer one than the others, to pad them."}],
        chat(
            {"type": "video", "video": make_video_frames(4, 40, 60, seed=8)},
            {"type": "image", "image": make_image(20, 90, seed=9)},
        ),
    ]
    kw = {
        "add_generation_prompt": True,
        "tokenize": True,
        "return_dict": True,
        "return_tensors": "pt",
        "padding": True,
    }
    a = ours.apply_chat_template(batch, padding_side="left", **kw)
    b = theirs.apply_chat_template(batch, padding_side="left", **kw)
    assert_same(a, b)
    assert a["attention_mask"][0, 0] == 0 and a["attention_mask"][:, -1].all()


def test_pixel_overrides_at_call_time(pair):
    ours, theirs = pair
    image = make_image(200, 150, seed=10)
    prompt = theirs.apply_chat_template(chat({"type": "image"}), add_generation_prompt=True)
    for kwargs in (
        {"max_pixels": 28 * 28 * 4},
        {"min_pixels": 28 * 28 * 30, "max_pixels": 28 * 28 * 40},
        {"size": {"shortest_edge": 28 * 28 * 8, "longest_edge": 28 * 28 * 9}},
    ):
        a = ours(text=prompt, images=[image], return_tensors="pt", **kwargs)
        b = theirs(text=prompt, images=[image], return_tensors="pt", **kwargs)
        assert_same(a, b)


@pytest.mark.parametrize("layout", ["v5", "hub"])
def test_pixel_overrides_at_load_time(make_ckpt, layout):
    folder = make_ckpt("qwen2_vl", layout)
    kwargs = {"min_pixels": 28 * 28 * 20, "max_pixels": 28 * 28 * 24}
    ours, theirs = Qwen2VLProcessor.from_pretrained(folder, **kwargs), hf_processor(folder, **kwargs)
    assert ours.image_processor.size == {"shortest_edge": 28 * 28 * 20, "longest_edge": 28 * 28 * 24}
    assert ours.video_processor.max_pixels == 28 * 28 * 24
    check_chat(
        (ours, theirs),
        chat(
            {"type": "image", "image": make_image(120, 90, seed=11)},
            {"type": "video", "video": make_video_frames(2, 90, 120, seed=12)},
        ),
    )


def test_padding_side_goes_to_the_tokenizer(make_ckpt):
    ours = Qwen2VLProcessor.from_pretrained(make_ckpt("qwen2_vl", "hub"), padding_side="right")
    assert ours.tokenizer.padding_side == "right"


def test_both_layouts_give_the_same_processor(make_ckpt):
    v5 = Qwen2VLProcessor.from_pretrained(make_ckpt("qwen2_vl", "v5"))
    hub = Qwen2VLProcessor.from_pretrained(make_ckpt("qwen2_vl", "hub"))
    assert v5.image_processor.to_dict() == hub.image_processor.to_dict()
    assert v5.video_processor.to_dict() == hub.video_processor.to_dict()
    assert v5.chat_template == hub.chat_template


def test_numpy_and_tensor_images_match_pil(pair):
    ours, _ = pair
    image = make_image(45, 35, seed=13)
    array = np.asarray(image)
    outs = [
        ours.image_processor(x, return_tensors="pt")["pixel_values"]
        for x in (image, array, array.transpose(2, 0, 1), torch.from_numpy(array.transpose(2, 0, 1).copy()))
    ]
    for out in outs[1:]:
        assert torch.equal(out, outs[0])


def test_placeholder_mismatch_names_both_counts(pair):
    ours, _ = pair
    with pytest.raises(PlaceholderMismatchError, match="2 <\\|image_pad\\|>.*1 image"):
        ours(text="<|image_pad|> and <|image_pad|>", images=[make_image(30, 30)])
    with pytest.raises(PlaceholderMismatchError, match="0 <\\|video_pad\\|>.*1 video"):
        ours(text="no video here", videos=[make_video_frames(2, 28, 28)])


def test_media_items_report(pair):
    ours, _ = pair
    image_a, image_b = make_image(60, 40, seed=14), make_image(30, 90, seed=15)
    video = make_video_frames(4, 56, 56, seed=16)
    texts = ["<|vision_start|><|image_pad|><|vision_end|> hi", "x <|video_pad|> y <|image_pad|><|image_pad|>"]
    result = ours.process(
        text=texts, images=[[image_a], [image_b, image_a]], videos=[video], padding=True, return_tensors="pt"
    )
    ids, media = result.features["input_ids"], result.media
    assert [(m.modality, m.index, m.sample) for m in media] == [
        ("image", 0, 0),
        ("image", 1, 1),
        ("image", 2, 1),
        ("video", 0, 1),
    ]
    rows = 0
    for item in media[:3]:
        span = ids[item.sample, item.offset : item.offset + item.num_tokens]
        assert (span == ours.image_token_id).all() and item.num_tokens == int(np.prod(item.grid_thw)) // 4
        assert item.rows == (rows, rows + int(np.prod(item.grid_thw)))
        rows = item.rows[1]
    assert rows == result.features["pixel_values"].shape[0]
    assert media[0].content_hash == media[2].content_hash != media[1].content_hash
    video_item = media[3]
    assert (
        ids[1, video_item.offset : video_item.offset + video_item.num_tokens] == ours.video_token_id
    ).all()
    # the options are part of the hash: the same image at another resolution is another item
    other = ours.process(text=texts[0], images=[image_a], max_pixels=28 * 28 * 4).media[0]
    assert other.content_hash != media[0].content_hash


def test_smart_resize_and_token_counts(pair):
    ours, theirs = pair
    assert smart_resize(480, 640) == (476, 644)
    counts = ours._get_num_multimodal_tokens(image_sizes=[[480, 640], [20, 20]], video_sizes=[[5, 100, 80]])
    expected = theirs._get_num_multimodal_tokens(
        image_sizes=[[480, 640], [20, 20]], video_sizes=[[5, 100, 80]]
    )
    assert counts["num_image_tokens"] == expected.num_image_tokens
    assert counts["num_image_patches"] == expected.num_image_patches
    assert counts["num_video_tokens"] == expected.num_video_tokens


def test_standalone_processors_and_decode(pair):
    ours, theirs = pair
    images = [make_image(28, 28, seed=17), make_image(100, 60, seed=18)]
    a = ours.image_processor(images, return_tensors="pt")
    b = theirs.image_processor(images, return_tensors="pt")
    assert_same(a, b)
    frames = make_video_frames(4, 30, 50, seed=19)
    assert_same(
        ours.video_processor([frames], return_tensors="pt"),
        theirs.video_processor([frames], return_tensors="pt"),
    )
    ids = ours(text=["hello <|im_end|>"], return_tensors="pt")["input_ids"]
    assert ours.batch_decode(ids) == theirs.batch_decode(ids)
    assert ours.post_process_image_text_to_text(ids) == theirs.post_process_image_text_to_text(ids)
    assert ours.decode(ids[0], skip_special_tokens=True) == theirs.decode(ids[0], skip_special_tokens=True)
    assert ours.model_input_names == theirs.model_input_names


def test_defaults_match_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor as HFVideo

    assert Qwen2VLImageProcessor().size == dict(Qwen2VLImageProcessorPil().size)
    assert Qwen2VLVideoProcessor().size == dict(HFVideo().size)
    assert Qwen2VLVideoProcessor().min_frames == HFVideo().min_frames


def test_video_call_options(pair):
    """video_metadata + fps sampling of frame arrays, num_frames, and the per-frame pixel cap."""
    ours, theirs = pair
    prompt = "<|vision_start|><|video_pad|><|vision_end|>"
    frames = np.stack([np.asarray(f) for f in make_video_frames(10, 84, 56, seed=20)])
    cases = [
        {"video_metadata": [{"total_num_frames": 10, "fps": 5.0}], "do_sample_frames": True, "fps": 1},
        {"do_sample_frames": True, "num_frames": 5},
    ]
    for kwargs in cases:
        a = ours(text=prompt, videos=[frames], return_tensors="pt", **kwargs)
        b = theirs(text=prompt, videos=[frames], return_tensors="pt", **kwargs)
        assert_same(a, b)
    # the cap: transformers reads max_video_tokens from the processor only, so set it there on both
    ours_video, theirs_budget = ours.video_processor, theirs.video_processor.max_video_tokens
    try:
        ours.video_processor = dataclasses.replace(ours_video, max_video_tokens=12)
        theirs.video_processor.max_video_tokens = 12
        a = ours(text=prompt, videos=[frames], return_tensors="pt", cap_pixels_per_frame=True)
        b = theirs(text=prompt, videos=[frames], return_tensors="pt", cap_pixels_per_frame=True)
        assert_same(a, b)
        assert a["video_grid_thw"].tolist() == [[5, 2, 4]]  # capped below the 4x6 grid of the uncapped call
    finally:
        ours.video_processor, theirs.video_processor.max_video_tokens = ours_video, theirs_budget


def test_unpadded_batch_lists_and_truncated_placeholders(pair):
    ours, theirs = pair
    texts = ["short", "<|image_pad|> a longer text"]
    image = make_image(40, 40, seed=21)
    a, b = ours(text=texts, images=[image]), theirs(text=texts, images=[image])
    assert a["input_ids"] == b["input_ids"] and a["mm_token_type_ids"] == b["mm_token_type_ids"]
    with pytest.raises(PlaceholderMismatchError, match="truncation"):
        ours.process(text=texts[1], images=[image], truncation=True, max_length=3)


def test_video_tensor_tchw_with_ocula_metadata(pair):
    from ocula.media import VideoMetadata

    ours, theirs = pair
    prompt = "<|vision_start|><|video_pad|><|vision_end|>"
    frames = np.stack([np.asarray(f) for f in make_video_frames(8, 60, 44, seed=22)])
    tchw = torch.from_numpy(frames).permute(0, 3, 1, 2)
    kw = {"do_sample_frames": True, "fps": 2, "return_tensors": "pt"}
    a = ours(text=prompt, videos=[tchw], video_metadata=[VideoMetadata(total_num_frames=8, fps=4.0)], **kw)
    b = theirs(text=prompt, videos=[frames], video_metadata=[{"total_num_frames": 8, "fps": 4.0}], **kw)
    assert_same(a, b)
