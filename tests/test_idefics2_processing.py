"""Idefics2 preprocessing parity against transformers 5.23 (PIL image processor) on the tiny checkpoints.

Pinned: pixel values and masks bit-identical (splitting on and off, resizing by shortest / longest edge,
padding to the batch's largest image and image count), prompts and input_ids identical (fake-token merging,
spacing, BOS, the real chat template), both checkpoint layouts; and the two intended differences: numpy
images are accepted, and a call-time `do_image_splitting` changes the text together with the pixels.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from checkpoints import hf_processor, make_image

from ocula.errors import PlaceholderMismatchError
from ocula.models.idefics2.processing import Idefics2ImageProcessor, Idefics2Processor

SEQ_LEN = 4  # image_seq_len of the tiny checkpoints


def assert_same(expected, actual) -> None:
    assert set(actual.keys()) == set(expected.keys())
    for key, value in expected.items():
        got = actual[key]
        if isinstance(value, torch.Tensor):
            assert got.dtype == value.dtype and got.shape == value.shape, key
            assert torch.equal(got, value), f"{key} differs"
        else:
            np.testing.assert_array_equal(np.asarray(got), np.asarray(value), err_msg=key)


@pytest.fixture(scope="module")
def pair(idefics2_ckpt):
    return hf_processor(idefics2_ckpt), Idefics2Processor.from_pretrained(idefics2_ckpt)


@pytest.fixture(scope="module")
def pair_no_split(idefics2_ckpt):
    return (hf_processor(idefics2_ckpt, do_image_splitting=False),
            Idefics2Processor.from_pretrained(idefics2_ckpt, do_image_splitting=False))  # fmt: skip


def _chat(*turns: tuple[str, list[str]]) -> list[dict]:
    """turns: (role, parts) with parts "<image>" or text."""
    return [
        {
            "role": role,
            "content": [{"type": "image"} if p == "<image>" else {"type": "text", "text": p} for p in parts],
        }
        for role, parts in turns
    ]


# ----------------------------------------------------------------------------------------------- image processor


@pytest.mark.parametrize("split", [True, False])
def test_image_processor_pixels_identical(split):
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    options = {"do_image_splitting": split, "size": {"shortest_edge": 28, "longest_edge": 56}}
    ref, ours = Idefics2ImageProcessorPil(**options), Idefics2ImageProcessor.from_dict(options)
    batch = [  # longest edge capped (wide and tall), short side floored, odd sizes, alpha and grey modes
        [make_image(120, 45, seed=1), make_image(21, 33, seed=2, mode="RGBA")],
        [make_image(37, 90, seed=3, mode="L")],
    ]
    assert_same(ref(batch, return_tensors="pt"), ours(batch, return_tensors="pt"))
    assert_same(ref(batch), ours(batch))  # numpy outputs without return_tensors


def test_image_processor_call_time_options():
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    ref, ours = Idefics2ImageProcessorPil(), Idefics2ImageProcessor()
    images = [make_image(50, 70, seed=4), make_image(64, 30, seed=5)]
    kwargs = {"size": {"shortest_edge": 14, "longest_edge": 42}, "do_image_splitting": True, "resample": 3}
    assert_same(ref(images, return_tensors="pt", **kwargs), ours(images, return_tensors="pt", **kwargs))


def test_image_processor_defaults_match_transformers():
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    ref, ours = Idefics2ImageProcessorPil(), Idefics2ImageProcessor()
    assert ours.size == dict(ref.size) and ours.resample == ref.resample
    assert ours.do_image_splitting == ref.do_image_splitting and ours.do_pad == ref.do_pad
    assert list(ours.image_mean) == list(ref.image_mean) and list(ours.image_std) == list(ref.image_std)


@pytest.mark.parametrize("layout", ["v5", "hub"])
def test_image_processor_from_pretrained(layout, idefics2_ckpt, idefics2_ckpt_hub):
    from transformers import AutoImageProcessor

    folder = idefics2_ckpt if layout == "v5" else idefics2_ckpt_hub
    ref = AutoImageProcessor.from_pretrained(str(folder), backend="pil", do_image_splitting=False)
    ours = Idefics2ImageProcessor.from_pretrained(folder, do_image_splitting=False)
    images = [make_image(70, 40, seed=1), make_image(25, 30, seed=2)]
    assert_same(ref(images, return_tensors="pt"), ours(images, return_tensors="pt"))


# ----------------------------------------------------------------------------------------------- processor


@pytest.mark.parametrize("layout", ["v5", "hub"])
def test_two_samples_of_different_sizes_and_counts(layout, idefics2_ckpt, idefics2_ckpt_hub):
    folder = idefics2_ckpt if layout == "v5" else idefics2_ckpt_hub
    ref, ours = hf_processor(folder), Idefics2Processor.from_pretrained(folder)
    images = [[make_image(40, 30, seed=1), make_image(70, 50, seed=2)], [make_image(30, 60, seed=3)]]
    text = ["<image>Describe this<image> image, please.", "What is shown in the picture?<image>"]
    expected = ref(images=images, text=text, return_tensors="pt", padding=True)
    assert_same(expected, ours(images=images, text=text, return_tensors="pt", padding=True))
    assert expected["pixel_values"].shape == (2, 10, 3, 56, 56)  # 2 images x 5 crops; sample 2 padded


def test_flat_image_list_split_by_text(pair):
    ref, ours = pair
    images = [make_image(40, 30, seed=1), make_image(90, 20, seed=2), make_image(33, 33, seed=3, mode="RGBA")]
    text = ["A <image> and <image>.", "<image> alone"]
    assert_same(ref(images=images, text=text, return_tensors="pt", padding=True),
                ours(images=images, text=text, return_tensors="pt", padding=True))  # fmt: skip


@pytest.mark.parametrize(
    "text", ["<image><image>Two adjacent images", "Before <image>, after", "<image>\nNewline"]
)
def test_fake_token_merging_and_spacing(pair, text):
    ref, ours = pair
    images = [make_image(50, 40, seed=i) for i in range(text.count("<image>"))]
    expected = ref(images=images, text=text, return_tensors="pt")
    assert_same(expected, ours(images=images, text=text, return_tensors="pt"))
    tokens = ours.tokenizer.convert_ids_to_tokens(expected["input_ids"][0])
    assert tokens[0] == "<s>" and "<fake_token_around_image><fake_token_around_image>" not in "".join(tokens)


def test_text_only_and_left_padding(pair):
    ref, ours = pair
    text = ["Hello, how are you today?", "Hi"]
    expected = ref(text=text, return_tensors="pt", padding=True)
    assert_same(expected, ours(text=text, return_tensors="pt", padding=True))
    assert expected["attention_mask"][1, 0] == 0  # left padding


def test_splitting_off_at_load_time(pair_no_split):
    ref, ours = pair_no_split
    images = [[make_image(40, 30, seed=1)], [make_image(70, 50, seed=2)]]
    text = ["<image>One.", "Two<image>"]
    expected = ref(images=images, text=text, return_tensors="pt", padding=True)
    assert_same(expected, ours(images=images, text=text, return_tensors="pt", padding=True))
    assert expected["pixel_values"].shape[1] == 1


def test_call_time_splitting_changes_text_and_pixels_together(pair, pair_no_split):
    """transformers expands the text for 5 crops but returns 1 image; ocula keeps both at 1 (compatibility.md)."""
    ref, ours = pair
    images, text = [make_image(40, 30, seed=1)], "<image>What is this?"
    broken = ref(images=images, text=text, return_tensors="pt", do_image_splitting=False)
    assert int((broken["input_ids"] == ours.image_token_id).sum()) == 5 * SEQ_LEN  # text says 5 crops
    assert broken["pixel_values"].shape[1] == 1  # pixels say 1
    actual = ours(images=images, text=text, return_tensors="pt", do_image_splitting=False)
    assert (
        int((actual["input_ids"] == ours.image_token_id).sum()) == SEQ_LEN * actual["pixel_values"].shape[1]
    )
    # identical to what transformers gives when splitting is off at load time
    assert_same(pair_no_split[0](images=images, text=text, return_tensors="pt"), actual)
    # and the other way round: splitting turned on at call time
    turned_on = pair_no_split[1](images=images, text=text, return_tensors="pt", do_image_splitting=True)
    assert_same(ref(images=images, text=text, return_tensors="pt"), turned_on)


def test_numpy_images_accepted(pair):
    """transformers' processor refuses arrays; ocula reads them like the PIL image with the same pixels."""
    ref, ours = pair
    image = make_image(45, 35, seed=7)
    hwc = np.array(image)
    chw = torch.from_numpy(hwc).permute(2, 0, 1)
    expected = ref(images=[image], text="<image>Hi", return_tensors="pt")
    assert_same(expected, ours(images=[hwc], text="<image>Hi", return_tensors="pt"))
    assert_same(expected, ours(images=[chw], text="<image>Hi", return_tensors="pt"))
    with pytest.raises(TypeError):
        ref(images=[hwc], text="<image>Hi", return_tensors="pt")


def test_chat_template_prompts_and_ids(pair):
    ref, ours = pair
    chat = _chat(("user", ["What is the difference?", "<image>", "<image>"]), ("assistant", ["One is red."]),
                 ("user", ["<image>", "And this?"]))  # fmt: skip
    for generation in (True, False):
        prompt = ref.apply_chat_template(chat, add_generation_prompt=generation)
        assert ours.apply_chat_template(chat, add_generation_prompt=generation) == prompt
    assert prompt.startswith("User: What is the difference?<image><image><end_of_utterance>\nAssistant:")
    images = [make_image(40, 30, seed=i) for i in range(3)]
    assert_same(ref(images=images, text=prompt, return_tensors="pt"),
                ours(images=images, text=prompt, return_tensors="pt"))  # fmt: skip


def test_chat_template_tokenize_adds_bos_once(pair):
    ref, ours = pair
    chat = [{"role": "user", "content": [{"type": "image", "image": make_image(50, 40)},
                                         {"type": "text", "text": "What is this?"}]}]  # fmt: skip
    kwargs = {"add_generation_prompt": True, "tokenize": True, "return_dict": True, "return_tensors": "pt"}
    expected = ref.apply_chat_template(chat, **kwargs)
    assert_same(expected, ours.apply_chat_template(chat, **kwargs))
    assert int((expected["input_ids"][0] == ours.tokenizer.bos_token_id).sum()) == 1


def test_decode_skips_image_tokens(pair):
    ref, ours = pair
    ids = ref(images=[make_image(40, 40)], text="<image>The cat<end_of_utterance>")["input_ids"][0]
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)


def test_placeholder_count_mismatch_raises(pair):
    _, ours = pair
    with pytest.raises(PlaceholderMismatchError, match="2 <image> placeholder"):
        ours(images=[make_image(30, 30)], text="<image><image>")
    with pytest.raises(PlaceholderMismatchError, match="images per sample"):
        ours(images=[[make_image(30, 30)], []], text=["<image>", "<image>"])


def test_media_report_one_item_per_crop(pair):
    """Each crop is a contiguous run of image_seq_len tokens (crops are separated by fake tokens)."""
    _, ours = pair
    images = [[make_image(40, 30, seed=1), make_image(70, 50, seed=2)], [make_image(40, 30, seed=1)]]
    out = ours.process(images=images, text=["<image>A<image>", "B <image>"], padding=True)
    ids = out.features["input_ids"]
    assert len(out.media) == 15 and {m.num_tokens for m in out.media} == {SEQ_LEN}
    assert [m.rows for m in out.media] == [(i, i + 1) for i in range(15)]  # flat [B * max_images] rows
    assert [m.grid_thw for m in out.media[:6]] == [(k % 5, 5) for k in range(6)]
    for item in out.media:
        run = ids[item.sample][item.offset - 1 : item.offset + SEQ_LEN + 1]
        assert run == [ours.fake_image_token_id] + [ours.image_token_id] * SEQ_LEN + [
            ours.fake_image_token_id
        ]
    hashes = [m.content_hash for m in out.media]
    assert hashes[:5] == hashes[10:] and len(set(hashes[:10])) == 10  # same image, same crops
    assert ours._get_num_multimodal_tokens(image_sizes=[(10, 10)])["num_image_tokens"] == [5 * SEQ_LEN]
