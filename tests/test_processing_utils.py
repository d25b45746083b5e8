"""The shared processor pieces: folder layouts, kwargs routing, chat media collection, pixel kernels."""

import base64
import io
import json
import shutil

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import image_transforms as hf_transforms

from ocula.image_processing_utils import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    flatten_images,
    normalize_table,
    pil_resize,
    to_rgb_array,
)
from ocula.models.qwen2_vl.processing import Qwen2VLImageProcessor, Qwen2VLProcessor
from ocula.processing_utils import ProcessorFiles, collect_media, normalize_conversations
from tests.checkpoints import hf_processor, make_image

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


# ------------------------------------------------------------------------------------------- layouts


def test_files_of_both_layouts_agree(make_ckpt):
    v5 = ProcessorFiles.read(make_ckpt("qwen2_vl", "v5"))
    hub = ProcessorFiles.read(make_ckpt("qwen2_vl", "hub"))
    assert v5.image["size"] == {
        "shortest_edge": hub.image["min_pixels"],
        "longest_edge": hub.image["max_pixels"],
    }
    assert v5.video["video_processor_type"] == hub.video["video_processor_type"] == "Qwen2VLVideoProcessor"
    assert isinstance(v5.chat_template, str) and v5.chat_template == hub.chat_template


def _bare_folder(src, dst, keep):
    dst.mkdir()
    for name in keep:
        shutil.copy(src / name, dst / name)
    return dst


def test_video_processor_falls_back_to_the_image_config(make_ckpt, tmp_path):
    """Hub folders without video_preprocessor_config.json configure the video processor from the image one."""
    src = make_ckpt("qwen2_vl", "hub")
    folder = _bare_folder(
        src, tmp_path / "ckpt", ["tokenizer.json", "tokenizer_config.json", "chat_template.json"]
    )
    config = json.loads((src / "preprocessor_config.json").read_text())
    config["max_pixels"] = 28 * 28 * 9
    (folder / "preprocessor_config.json").write_text(json.dumps(config))
    processor = Qwen2VLProcessor.from_pretrained(folder)
    assert processor.video_processor.max_pixels == processor.image_processor.max_pixels == 28 * 28 * 9


def test_chat_template_from_tokenizer_config(make_ckpt, tmp_path):
    src = make_ckpt("qwen2_vl", "hub")
    folder = _bare_folder(src, tmp_path / "ckpt", ["tokenizer.json", "preprocessor_config.json"])
    config = json.loads((src / "tokenizer_config.json").read_text())
    config["chat_template"] = json.loads((src / "chat_template.json").read_text())["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    processor = Qwen2VLProcessor.from_pretrained(folder)
    assert processor.chat_template == config["chat_template"]
    text = processor.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")


def test_unknown_config_keys_are_kept():
    processor = Qwen2VLImageProcessor.from_dict(
        {"patch_size": 14, "custom_flag": 3, "image_processor_type": "x"}
    )
    assert processor.extra == {"custom_flag": 3} and processor.to_dict()["custom_flag"] == 3


# ------------------------------------------------------------------------------------- kwargs routing


@pytest.fixture(scope="module")
def qwen(make_ckpt):
    folder = make_ckpt("qwen2_vl", "v5")
    return Qwen2VLProcessor.from_pretrained(folder), hf_processor(folder)


def test_call_kwargs_go_to_the_right_processor(qwen):
    ours, _ = qwen
    options = ours.split_kwargs(
        {
            "padding_side": "left",
            "min_pixels": 100,
            "fps": 2,
            "images_kwargs": {"merge_size": 2},
            "common_kwargs": {"return_tensors": "pt"},
            "video_fps": 1.5,
        }
    )
    assert options.text == {"padding_side": "left"}
    assert options.images == {"min_pixels": 100, "merge_size": 2}
    assert options.videos == {"min_pixels": 100, "fps": 1.5}  # the older video_fps spelling
    assert options.return_tensors == "pt" and options.return_mm_token_type_ids is True
    assert ours.split_kwargs({"return_mm_token_type_ids": False}).return_mm_token_type_ids is False


def test_mm_token_type_ids_can_be_turned_off(qwen):
    ours, theirs = qwen
    a = ours(text=["hi"], return_mm_token_type_ids=False, return_tensors="pt")
    b = theirs(text=["hi"], return_mm_token_type_ids=False, return_tensors="pt")
    assert sorted(a.keys()) == sorted(b.keys()) == ["attention_mask", "input_ids"]


# ------------------------------------------------------------------------------------- chat handling


def test_conversations_are_normalised_without_touching_the_input():
    message = {
        "role": "user",
        "name": None,
        "content": [
            {"type": "image_url", "image_url": {"url": "http://x/a.png"}},
            {"type": "text", "text": "hi"},
        ],
    }
    chats, batched = normalize_conversations([message])
    assert not batched and "name" not in chats[0][0]
    assert chats[0][0]["content"][0] == {"type": "image", "url": "http://x/a.png"}
    assert message["content"][0]["type"] == "image_url" and "name" in message
    assert normalize_conversations([[message], [message]])[1] is True
    with pytest.raises(ValueError, match="empty conversation"):
        normalize_conversations([])


def test_media_is_collected_per_conversation_in_order():
    conversation = [
        {
            "role": "user",
            "content": [
                {"type": "video", "path": "v.mp4"},
                {"type": "image", "url": "a.png"},
                {"type": "text", "text": "x"},
                {"type": "image", "base64": "b64"},
            ],
        },
        {"role": "assistant", "content": "plain text"},
        {"role": "user", "content": [{"type": "image", "image": "c.png"}]},
    ]
    images, videos = collect_media([conversation, conversation[1:]])
    assert images == [["a.png", "b64", "c.png"], ["c.png"]] and videos == [["v.mp4"], []]


def test_openai_image_url_with_a_data_uri(qwen):
    ours, theirs = qwen
    buffer = io.BytesIO()
    make_image(37, 51, seed=3).save(buffer, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    conversation = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": uri}},
                {"type": "text", "text": "What is it?"},
            ],
        }
    ]
    kw = {"add_generation_prompt": True, "tokenize": True, "return_dict": True, "return_tensors": "pt"}
    a, b = ours.apply_chat_template(conversation, **kw), theirs.apply_chat_template(conversation, **kw)
    assert sorted(a.keys()) == sorted(b.keys())
    for key in b:
        assert torch.allclose(a[key].double(), b[key].double(), atol=1e-5, rtol=0), key


def test_chat_template_options(qwen):
    ours, theirs = qwen
    conversation = [
        {"role": "user", "content": "Name a shape."},
        {"role": "assistant", "content": [{"type": "text", "text": "A cir"}]},
    ]
    for kw in ({"continue_final_message": True}, {"add_generation_prompt": False}):
        assert ours.apply_chat_template(conversation, **kw) == theirs.apply_chat_template(conversation, **kw)
    batch = [conversation[:1], conversation]
    assert ours.apply_chat_template(batch) == theirs.apply_chat_template(batch)
    ids = ours.apply_chat_template(conversation[:1], tokenize=True)
    assert ids == theirs.apply_chat_template(conversation[:1], tokenize=True)
    with pytest.raises(ValueError, match="exclusive"):
        ours.apply_chat_template(conversation, continue_final_message=True, add_generation_prompt=True)


# ---------------------------------------------------------------------------------------- pixel kernels


def test_normalize_table_is_transformers_numpy_path_bit_for_bit():
    pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16).repeat(3, axis=0)  # CHW, every value
    rescaled = hf_transforms.rescale(
        pixels, 1 / 255, data_format="channels_first", input_data_format="channels_first"
    )
    expected = hf_transforms.normalize(
        rescaled, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, input_data_format="channels_first"
    )
    table = normalize_table(True, 1 / 255, True, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    assert np.array_equal(table, expected.reshape(3, 256))


def test_fused_table_is_transformers_torch_path_bit_for_bit():
    pixels = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16).repeat(3, 1, 1).float()
    mean, std = torch.tensor(OPENAI_CLIP_MEAN) * 255.0, torch.tensor(OPENAI_CLIP_STD) * 255.0
    expected = (pixels - mean[:, None, None]) / std[:, None, None]
    table = normalize_table(True, 1 / 255, True, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, fused=True)
    assert np.array_equal(table, expected.reshape(3, 256).numpy())
    assert not np.array_equal(table, normalize_table(True, 1 / 255, True, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD))


@pytest.mark.parametrize("size", [(40, 30), (13, 77), (200, 120)])
def test_pil_resize_is_transformers_resize(size):
    image = np.asarray(make_image(61, 47, seed=size[0]))
    expected = hf_transforms.resize(
        image, (size[1], size[0]), resample=PIL.Image.BICUBIC, input_data_format="channels_last"
    )
    assert np.array_equal(pil_resize(image, size[1], size[0], PIL.Image.BICUBIC), expected)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "RGB"])
def test_to_rgb_array_matches_transformers_convert_to_rgb(mode):
    image = make_image(23, 19, mode=mode, seed=5)
    assert np.array_equal(to_rgb_array(image), hf_transforms.convert_to_rgb(image, return_numpy=True))


def test_to_rgb_array_array_layouts():
    rgb = np.asarray(make_image(20, 10, seed=6))
    assert np.array_equal(to_rgb_array(rgb.transpose(2, 0, 1)), rgb)
    assert np.array_equal(to_rgb_array(torch.from_numpy(rgb.copy())), rgb)
    gray = rgb[:, :, 0]
    assert np.array_equal(to_rgb_array(gray), np.repeat(gray[:, :, None], 3, axis=2))
    assert np.array_equal(
        to_rgb_array(rgb.astype(np.float32) / 255), (rgb.astype(np.float32) / 255 * 255).astype(np.uint8)
    )


def test_flatten_images_shapes():
    a, b = make_image(8, 8), np.zeros((8, 8, 3), np.uint8)
    assert len(flatten_images(a)) == 1 and len(flatten_images([[a], [b, a]])) == 3
    assert len(flatten_images(np.zeros((4, 8, 8, 3), np.uint8))) == 4
    with pytest.raises(ValueError, match="Cannot read images"):
        flatten_images(3)
