"""The Idefics2 examples of the transformers docs run unchanged (but for the import) on the tiny checkpoint:
the two-image chat, and the training snippet, whose loss and gradients must equal transformers'."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch
from checkpoints import hf_model, hf_processor

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def run_example(idefics2_ckpt, tmp_path, monkeypatch):
    """Run examples/<name> in this process (OCULA_MODEL = the tiny checkpoint); return its globals."""
    monkeypatch.setenv("OCULA_MODEL", str(idefics2_ckpt))
    monkeypatch.setenv("OCULA_EXAMPLE_ASSETS", str(tmp_path))
    monkeypatch.syspath_prepend(str(EXAMPLES))
    sys.modules.pop("assets", None)  # assets reads the environment when imported
    yield lambda name: runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    sys.modules.pop("assets", None)


def test_two_image_chat(run_example, capsys):
    scope = run_example("idefics2_chat.py")
    out = capsys.readouterr().out
    assert (
        "User: What’s the difference between these two images?<image><image><end_of_utterance>\nAssistant:"
        in out
    )
    assert "Generated text: User: What’s the difference between these two images?\nAssistant:" in out
    assert scope["inputs"]["pixel_values"].shape[:2] == (1, 10)  # 2 images x 5 crops


def test_training_snippet_matches_transformers(run_example, idefics2_ckpt):
    scope = run_example("idefics2_training.py")
    model, inputs, loss = scope["model"], scope["inputs"], scope["loss"]
    ref = hf_model(idefics2_ckpt)
    expected_inputs = hf_processor(idefics2_ckpt)(
        images=scope["images"], text=scope["text"], return_tensors="pt"
    )
    for key, value in expected_inputs.items():
        assert torch.equal(inputs[key], value), key
    expected = ref(**expected_inputs, labels=inputs["labels"]).loss
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=0)
    expected.backward()
    ref_params = dict(ref.named_parameters())
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, ref_params[name].grad, atol=1e-5, rtol=0, msg=name)
