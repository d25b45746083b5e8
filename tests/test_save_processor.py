"""`processor.save_pretrained` / `tokenizer.save_pretrained`: the saved folder (transformers 5 layout) gives the
same prompt, token ids and pixels as the original, in ocula and in transformers, for every family and both
source layouts; load-time overrides and a changed pad token survive the round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import ocula
from ocula.errors import UnsupportedFeatureError

FIXTURES = ["qwen2_vl_ckpt", "qwen2_vl_ckpt_hub", "llava_onevision_ckpt", "llava_onevision_ckpt_hub",
            "idefics2_ckpt", "idefics2_ckpt_hub", "ovis2_ckpt", "ovis2_ckpt_hub"]


def _image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (61, 93, 3), dtype=np.uint8))


def _outputs(processor) -> dict[str, torch.Tensor]:
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    out = processor(text=[prompt], images=[_image()], return_tensors="pt")
    return {"prompt": prompt, **{k: v for k, v in out.items() if isinstance(v, torch.Tensor)}}


def _assert_same(a: dict, b: dict) -> None:
    assert a["prompt"] == b["prompt"]
    assert set(a) <= set(b) or set(b) <= set(a)
    for key in set(a) & set(b) - {"prompt"}:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("fixture", FIXTURES)
def test_saved_processor_round_trips_in_ocula_and_transformers(fixture, request, tmp_path):
    folder = request.getfixturevalue(fixture)
    processor = ocula.AutoProcessor.from_pretrained(folder)
    expected = _outputs(processor)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "processor_config.json").exists() and (tmp_path / "chat_template.jinja").exists()
    _assert_same(expected, _outputs(ocula.AutoProcessor.from_pretrained(tmp_path)))

    pytest.importorskip("transformers")
    from checkpoints import hf_processor  # transformers with its PIL image backend, whose pixels ocula gives

    _assert_same(_outputs(hf_processor(tmp_path)), expected)


def test_load_time_overrides_and_token_changes_are_saved(qwen2_vl_ckpt, tmp_path):
    processor = ocula.AutoProcessor.from_pretrained(qwen2_vl_ckpt, max_pixels=56 * 56)
    processor.tokenizer.padding_side = "left"
    processor.tokenizer.pad_token = processor.tokenizer.eos_token
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["image_processor"]["max_pixels"] == 56 * 56
    again = ocula.AutoProcessor.from_pretrained(tmp_path)
    assert again.image_processor.max_pixels == 56 * 56
    assert again.tokenizer.padding_side == "left"
    assert again.tokenizer.pad_token == processor.tokenizer.eos_token
    assert _outputs(again)["pixel_values"].shape == _outputs(processor)["pixel_values"].shape


def test_a_processor_built_by_hand_says_why_it_cannot_be_saved(qwen2_vl_ckpt, tmp_path):
    loaded = ocula.AutoProcessor.from_pretrained(qwen2_vl_ckpt)
    by_hand = type(loaded)(loaded.image_processor, loaded.tokenizer, loaded.video_processor)
    with pytest.raises(UnsupportedFeatureError, match="from_pretrained"):
        by_hand.save_pretrained(tmp_path)
