"""The three LLaVA-OneVision examples of the transformers docs run unchanged (but for the import) on the tiny
checkpoint: single image, a multi-image batch, and a video with num_frames=8."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("name, expected", [
    ("llava_onevision_single_image.py", "What is shown in this image?"),
    ("llava_onevision_multi_image.py", "How many cats do you see?"),
    ("llava_onevision_video.py", "Why is this video funny?"),
])  # fmt: skip
def test_example_runs(name, expected, llava_onevision_ckpt, tmp_path):
    env = {
        **os.environ,
        "OCULA_MODEL": str(llava_onevision_ckpt),
        "OCULA_EXAMPLE_ASSETS": str(tmp_path),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(EXAMPLES.parent),
    }
    result = subprocess.run(
        [sys.executable, name],
        cwd=EXAMPLES,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert expected in result.stdout and "assistant" in result.stdout
