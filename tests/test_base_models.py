"""The base models (`Qwen2VLModel`, `LlavaOnevisionModel`, `Idefics2Model`, `Ovis2Model`): transformers'
towers + decoder without the lm_head. `from_pretrained` on a checkpoint folder and a forward that returns
`last_hidden_state` equal to transformers' base model on the same inputs, for all four families; the
`*ForConditionalGeneration`'s `.model` runs the same way."""

from __future__ import annotations

import pytest
import torch

import ocula
from ocula.errors import UnsupportedFeatureError
from tests.checkpoints import make_image

transformers = pytest.importorskip("transformers")

BASES = {"qwen2_vl": "Qwen2VLModel", "llava_onevision": "LlavaOnevisionModel", "idefics2": "Idefics2Model",
         "ovis2": "Ovis2Model"}


def _inputs(folder):
    processor = ocula.AutoProcessor.from_pretrained(folder)
    conversations = [
        [{"role": "user", "content": [{"type": "image", "image": make_image(64, 48, seed=1)},
                                      {"type": "text", "text": "What is in this picture?"}]}],
        [{"role": "user", "content": [{"type": "text", "text": "No picture here, only a longer question."}]}],
    ]
    processor.tokenizer.padding_side = "left"
    return dict(processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True,
                                              return_dict=True, return_tensors="pt", padding=True))


@pytest.mark.parametrize("family", list(BASES))
def test_base_model_hidden_states_equal_transformers(family, request):
    folder = request.getfixturevalue(f"{family}_ckpt")
    inputs = _inputs(folder)
    ours = getattr(ocula, BASES[family]).from_pretrained(folder)
    theirs = getattr(transformers, BASES[family]).from_pretrained(folder).eval()
    assert type(ours).__name__ == BASES[family] and not hasattr(ours, "lm_head")
    with torch.no_grad():
        got, want = ours(**inputs), theirs(**inputs)
    real = inputs["attention_mask"].bool()  # padding positions differ by convention, not by value
    torch.testing.assert_close(got.last_hidden_state[real], want.last_hidden_state[real], atol=1e-4, rtol=1e-4)
    assert got[0] is got["last_hidden_state"] is got.last_hidden_state


def test_the_full_models_base_runs_and_feeds_the_head(qwen2_vl_ckpt):
    model = ocula.Qwen2VLForConditionalGeneration.from_pretrained(qwen2_vl_ckpt)
    inputs = _inputs(qwen2_vl_ckpt)
    with torch.no_grad():
        hidden = model.model(**inputs).last_hidden_state
        logits = model(**inputs).logits
    torch.testing.assert_close(model.lm_head(hidden), logits)
    assert "model._owner" not in dict(model.named_modules())  # the back-reference is not a submodule
    assert len(list(model.model.parameters())) < len(list(model.parameters()))  # no lm_head inside


def test_hub_layout_and_a_standalone_base_model(make_ckpt):
    folder = make_ckpt("llava_onevision", "hub")
    base = ocula.LlavaOnevisionModel.from_pretrained(folder)
    inputs = _inputs(folder)
    with torch.no_grad():
        assert base(**inputs).last_hidden_state.shape[:2] == inputs["input_ids"].shape
    alone = ocula.LlavaOnevisionModel(base.config)
    with pytest.raises(UnsupportedFeatureError, match="from_pretrained"):
        alone(**inputs)
