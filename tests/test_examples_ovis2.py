"""The Ovis2 documentation examples under examples/ run unchanged against the tiny checkpoint."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoints import hf_model, hf_processor
from PIL import Image

import ocula

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(name: str, model: Path, tmp_path: Path) -> str:
    env = {
        **os.environ,
        "OCULA_MODEL": str(model),
        "OCULA_EXAMPLE_ASSETS": str(tmp_path),
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        [sys.executable, name],
        cwd=EXAMPLES,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _answers(stdout: str) -> list[str]:
    """The example's last line: the printed list of generated strings."""
    return ast.literal_eval(stdout.strip().splitlines()[-1])


def test_api_reference_example(ovis2_ckpt, tmp_path):
    stdout = _run("ovis2_api_reference.py", ovis2_ckpt, tmp_path)
    prompt = "<|im_start|>user\n<image>\nDescribe the image.<|im_end|>\n<|im_start|>assistant\n"
    assert prompt in stdout
    # transformers on the same inputs (the example's image, pixels rounded to bfloat16) says the same
    processor, model = hf_processor(ovis2_ckpt), hf_model(ovis2_ckpt)
    messages = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}],
        add_generation_prompt=True,
    )
    inputs = processor(images=[Image.open(tmp_path / "image1.jpg")], text=messages, return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    with torch.inference_mode():
        output_ids = model.generate(**inputs, max_new_tokens=128, do_sample=False)
    expected = processor.batch_decode(output_ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert _answers(stdout) == expected


@pytest.mark.skipif(
    not hasattr(ocula, "infer_device"), reason="needs ocula.infer_device, which transformers' example imports"
)
def test_usage_example(ovis2_ckpt, tmp_path):
    answers = _answers(_run("ovis2_usage.py", ovis2_ckpt, tmp_path))
    assert len(answers) == 1 and isinstance(answers[0], str)
