"""`model.save_pretrained`: what ocula writes loads back in ocula and in transformers with every weight equal,
for all four families and both source layouts, sharded or not; tied embeddings are written once."""

from __future__ import annotations

import json

import pytest
import torch

import ocula
from ocula.errors import ConfigError, UnsupportedFeatureError

FIXTURES = ["qwen2_vl_ckpt", "llava_onevision_ckpt", "idefics2_ckpt", "ovis2_ckpt", "qwen2_vl_ckpt_hub",
            "ovis2_ckpt_hub"]


def _perturbed(folder):
    """The checkpoint loaded by ocula with every weight moved, so a save that writes the original files'
    values (or skips a tensor) cannot pass."""
    model = ocula.AutoModelForImageTextToText.from_pretrained(folder)
    with torch.no_grad():
        for index, param in enumerate(model.parameters()):
            param.add_(0.001 * (index + 1))
    return model


@pytest.mark.parametrize("fixture", FIXTURES)
def test_saved_folder_loads_in_ocula_and_transformers(fixture, request, tmp_path):
    model = _perturbed(request.getfixturevalue(fixture))
    model.save_pretrained(tmp_path)
    expected = model.state_dict()

    again = ocula.AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert type(again) is type(model)
    assert again.config.to_dict() == {**model.config.to_dict()}
    for name, value in again.state_dict().items():
        assert torch.equal(value, expected[name]), name

    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path)
    theirs = reference.state_dict()
    assert set(theirs) == set(expected)
    for name, value in theirs.items():
        assert torch.equal(value, expected[name]), name


def test_sharded_save_writes_an_index_and_ties_once(qwen2_vl_ckpt, tmp_path):
    model = _perturbed(qwen2_vl_ckpt)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1 and all((tmp_path / f).exists() for f in files)
    assert not (tmp_path / "model.safetensors").exists()
    tied = model.config.tie_word_embeddings
    assert ("lm_head.weight" in index["weight_map"]) is not tied
    again = ocula.AutoModelForImageTextToText.from_pretrained(tmp_path)
    for name, value in again.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name
    if tied:
        assert again.lm_head.weight is again.get_input_embeddings().weight

    model.save_pretrained(tmp_path)  # saving again unsharded leaves no stale shard behind
    assert {p.name for p in tmp_path.glob("model*")} == {"model.safetensors"}


def test_save_options_are_checked(qwen2_vl_ckpt, tmp_path):
    model = ocula.AutoModelForImageTextToText.from_pretrained(qwen2_vl_ckpt)
    with pytest.raises(UnsupportedFeatureError, match="safetensors"):
        model.save_pretrained(tmp_path, safe_serialization=False)
    with pytest.raises(ConfigError, match="max_shard_size"):
        model.save_pretrained(tmp_path, max_shard_size="lots")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        model.save_pretrained(tmp_path / "file")
