"""Bad input through the public API gets a clear, typed error (never a bare traceback from deep inside)."""

import json
import shutil

import pytest
import torch
from PIL import Image

from ocula import AutoConfig, AutoModelForImageTextToText, AutoProcessor
from ocula.errors import (
    CheckpointNotFoundError,
    ConfigError,
    MediaError,
    MediaTooLargeError,
    OculaError,
    PlaceholderMismatchError,
    UnknownModelTypeError,
    WeightsError,
)
from ocula.media import load_image


def _copy(src, tmp_path, name="ckpt"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _conversation(image):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "hi"}]}]


def test_missing_path_says_what_to_do(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="does not exist|not found|No such"):
        AutoProcessor.from_pretrained(tmp_path / "nope")


def test_unknown_model_type_lists_supported(qwen2_vl_ckpt, tmp_path):
    folder = _copy(qwen2_vl_ckpt, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="gpt_vision_9000", architectures=["GptVision9000"])
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnknownModelTypeError, match="gpt_vision_9000.*qwen2_vl"):
        AutoModelForImageTextToText.from_pretrained(folder)


def test_malformed_config_names_the_file(qwen2_vl_ckpt, tmp_path):
    folder = _copy(qwen2_vl_ckpt, tmp_path)
    (folder / "config.json").write_text('{"model_type": "qwen2_vl",')
    with pytest.raises(ConfigError, match="config.json"):
        AutoConfig.from_pretrained(folder)


def test_bad_config_value_names_the_key(qwen2_vl_ckpt, tmp_path):
    folder = _copy(qwen2_vl_ckpt, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    section = config.get("text_config", config)
    section["num_attention_heads"] = 3  # does not divide hidden_size
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="num_attention_heads|hidden_size"):
        AutoModelForImageTextToText.from_pretrained(folder)


def test_missing_weight_is_named(qwen2_vl_ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy(qwen2_vl_ckpt, tmp_path)
    weights = load_file(folder / "model.safetensors")
    dropped = next(k for k in weights if "layers.1.mlp.down_proj" in k)
    del weights[dropped]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightsError, match="down_proj") as info:
        AutoModelForImageTextToText.from_pretrained(folder)
    assert any("layers.1.mlp.down_proj" in name for name in info.value.missing)


def test_misshapen_weight_is_named(qwen2_vl_ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy(qwen2_vl_ckpt, tmp_path)
    weights = load_file(folder / "model.safetensors")
    key = next(k for k in weights if k.endswith("layers.0.self_attn.q_proj.weight"))
    weights[key] = weights[key][:-1]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightsError, match="q_proj") as info:
        AutoModelForImageTextToText.from_pretrained(folder)
    assert info.value.mismatched


def test_corrupt_image_file(qwen2_vl_ckpt, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    processor = AutoProcessor.from_pretrained(qwen2_vl_ckpt)
    with pytest.raises(MediaError, match="broken.png"):
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image", "path": str(bad)}, {"type": "text", "text": "x"}]}],
            add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
        )


def test_huge_image_is_refused_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (3000, 2000)).save(path)
    with pytest.raises(MediaTooLargeError, match="pixels"):
        load_image(str(path), max_pixels=1_000_000)


def test_wrong_placeholder_count(qwen2_vl_ckpt):
    processor = AutoProcessor.from_pretrained(qwen2_vl_ckpt)
    text = "<|vision_start|><|image_pad|><|vision_end|> one placeholder, two images"
    images = [Image.new("RGB", (56, 56), "red"), Image.new("RGB", (56, 56), "blue")]
    with pytest.raises(PlaceholderMismatchError, match="1.*2|2.*1"):
        processor(text=[text], images=images, return_tensors="pt")


def test_model_rejects_features_without_placeholders(qwen2_vl_ckpt):
    processor = AutoProcessor.from_pretrained(qwen2_vl_ckpt)
    model = AutoModelForImageTextToText.from_pretrained(qwen2_vl_ckpt)
    inputs = processor.apply_chat_template(
        _conversation(Image.new("RGB", (56, 56), "red")),
        add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
    )
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    inputs["input_ids"][inputs["input_ids"] == image_pad] = 0  # the text lost its placeholders
    with pytest.raises(PlaceholderMismatchError), torch.no_grad():
        model(**inputs)


def test_all_errors_share_a_base():
    for error in (CheckpointNotFoundError, ConfigError, MediaError, WeightsError, PlaceholderMismatchError):
        assert issubclass(error, OculaError)
