"""Ovis2 preprocessing parity against transformers 5.23 (PIL image backend) on the tiny checkpoints.

Pinned: tile grids (covering-area grid with its transposition, closest-aspect canvas), thumbnails, pixel
values, the `<image>` expansion, chat prompts, input_ids (also left-padded batches) in both folder layouts,
and the per-image report the engine uses.
"""

from __future__ import annotations

import pytest
import torch
from checkpoints import hf_processor, make_image, token_id

from ocula import AutoProcessor
from ocula.errors import PlaceholderMismatchError
from ocula.models.ovis2.processing import Ovis2ImageProcessor, Ovis2Processor, covering_grid, tile_grid

SIZES = [(300, 100), (100, 300), (84, 84), (20, 30), (500, 60), (200, 150)]  # (width, height)


@pytest.fixture(scope="module", params=["v5", "hub"])
def folder(request, ovis2_ckpt, ovis2_ckpt_hub):
    return ovis2_ckpt if request.param == "v5" else ovis2_ckpt_hub


@pytest.fixture(scope="module")
def processors(folder):
    return hf_processor(folder), Ovis2Processor.from_pretrained(folder)


def _chat(*turns) -> list[dict]:
    """turns: (role, [images...], text) -> a conversation with image blocks before the text."""
    messages = []
    for role, images, text in turns:
        content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": text}]
        messages.append({"role": role, "content": content})
    return messages


# ------------------------------------------------------------------------------------------ image processor


@pytest.mark.parametrize("covering", [True, False])
@pytest.mark.parametrize("crop", [True, False])
def test_image_processor_pixels_and_grids(processors, covering, crop):
    ref, ours = processors[0].image_processor, processors[1].image_processor
    for width, height in SIZES:
        image = make_image(width, height, seed=width)
        options = {"use_covering_area_grid": covering, "crop_to_patches": crop, "return_tensors": "pt"}
        expected, actual = ref(image, **options), ours(image, **options)
        assert actual["grids"].tolist() == expected["grids"].tolist(), (width, height)
        assert actual["pixel_values"].dtype == torch.float32
        torch.testing.assert_close(actual["pixel_values"], expected["pixel_values"], atol=1e-5, rtol=0)


def test_covering_grid_is_transposed_like_transformers():
    # A wide 300x100 image is covered by 2 rows x 4 columns of 84-pixel tiles; transformers tiles it 4 x 2.
    assert covering_grid(100, 300, 84, 12) == (2, 4)
    assert tile_grid(100, 300, (84, 84), 1, 12, covering=True) == (4, 2)
    assert tile_grid(100, 300, (84, 84), 1, 12, covering=False) == (1, 3)  # the canvas is not transposed


def test_image_processor_options_and_inputs(processors):
    ref, ours = processors[0].image_processor, processors[1].image_processor
    image = make_image(150, 70, mode="RGBA", seed=3)
    options = {"max_patches": 4, "min_patches": 2, "use_covering_area_grid": False, "return_tensors": "pt"}
    expected, actual = ref(image, **options), ours(image, **options)
    assert actual["grids"].tolist() == expected["grids"].tolist()
    torch.testing.assert_close(actual["pixel_values"], expected["pixel_values"], atol=1e-5, rtol=0)
    assert ours(image, max_patches=1, return_tensors="pt")["pixel_values"].shape == (1, 3, 84, 84)
    ip = Ovis2ImageProcessor.from_dict({"size": {"height": 28, "width": 28}, "crop_to_patches": True})
    assert ip(make_image(60, 20), return_tensors="pt")["grids"].tolist() == [[3, 1]]


# ------------------------------------------------------------------------------------------- processor


def test_prompts_and_input_ids(processors):
    ref, ours = processors
    wide, tall, tiny = make_image(300, 100, seed=1), make_image(90, 260, seed=2), make_image(12, 9, seed=3)
    conversations = [
        _chat(("user", [wide], "Describe this image.")),
        _chat(("user", [tall, tiny], "What is shown in the picture?")),
        _chat(("user", [tiny], "What?"), ("assistant", [], "A cat."), ("user", [wide], "And here?")),
        _chat(("user", [], "Hello, how are you today?")),
    ]
    for conversation in conversations:
        expected = ref.apply_chat_template(conversation, add_generation_prompt=True)
        assert ours.apply_chat_template(conversation, add_generation_prompt=True) == expected
        kw = {"add_generation_prompt": True, "tokenize": True, "return_dict": True, "return_tensors": "pt"}
        want, got = ref.apply_chat_template(conversation, **kw), ours.apply_chat_template(conversation, **kw)
        assert sorted(got.keys()) == sorted(want.keys())
        assert torch.equal(got["input_ids"], want["input_ids"])
        assert torch.equal(got["attention_mask"], want["attention_mask"])
        if "pixel_values" in want:
            torch.testing.assert_close(got["pixel_values"], want["pixel_values"], atol=1e-5, rtol=0)


def test_left_padded_batch_and_closest_canvas(processors):
    ref, ours = processors
    images = [make_image(30, 20, seed=4), make_image(84, 84, seed=5), make_image(200, 60, seed=6)]
    texts = ["<image>\nDescribe this image.", "Count them: <image> and <image>"]
    kw = {"padding": True, "padding_side": "left", "use_covering_area_grid": False, "return_tensors": "pt"}
    want, got = ref(images=images, text=texts, **kw), ours(images=images, text=texts, **kw)
    assert list(got.keys()) == ["input_ids", "attention_mask", "pixel_values"]
    assert torch.equal(got["input_ids"], want["input_ids"])
    assert torch.equal(got["attention_mask"], want["attention_mask"])
    torch.testing.assert_close(got["pixel_values"], want["pixel_values"], atol=1e-5, rtol=0)
    assert got["pixel_values"].shape[0] > len(images)  # the tiny first image is tiled too


def test_expansion_layout_and_media_report(ovis2_ckpt):
    processor = Ovis2Processor.from_pretrained(ovis2_ckpt)
    assert processor.image_seq_length == 9
    assert processor.image_token_id == token_id(ovis2_ckpt, "<IMG_ATOM>")
    out = processor.process(
        images=[make_image(300, 100), make_image(40, 40)], text=["<image>A", "B<image>"], padding=True
    )
    ids = out.features["input_ids"]
    text = processor.tokenizer.decode(ids[0])
    atoms = "<IMG_ATOM>" * 9
    tiles = "<IMG_ROW>".join([f"{atoms}<IMG_COL>{atoms}"] * 4)  # 4 rows x 2 columns (transformers' order)
    assert text.startswith(f"<IMG_START>{atoms}<IMG_GRID>{tiles}<IMG_END>A")
    first, second = out.media
    # each item covers its contiguous span <IMG_START> ... <IMG_END> (atoms and indicators)
    assert (first.num_tokens, first.rows, first.grid_thw) == (3 + 9 * 9 + 7, (0, 9), (4, 2))
    assert (second.num_tokens, second.rows, second.grid_thw) == (3 + 9, (9, 10), (1, 1))
    start, end = token_id(ovis2_ckpt, "<IMG_START>"), token_id(ovis2_ckpt, "<IMG_END>")
    for item in out.media:
        span = ids[item.sample][item.offset : item.offset + item.num_tokens]
        assert (span[0], span[-1]) == (start, end) and item.token_id == processor.image_token_id
    assert first.content_hash and first.content_hash != second.content_hash
    counts = processor._get_num_multimodal_tokens(image_sizes=[(100, 300), (40, 40)])
    assert counts == {"num_image_tokens": [91, 12], "num_image_patches": [9, 1]}


def test_auto_processor_and_errors(ovis2_ckpt_hub):
    processor = AutoProcessor.from_pretrained(ovis2_ckpt_hub, image_seq_length=4)
    assert isinstance(processor, Ovis2Processor) and processor.image_seq_length == 4
    with pytest.raises(PlaceholderMismatchError):
        processor(images=[make_image(20, 20)], text="no placeholder here")
