"""The Qwen2-VL documentation examples under examples/ run unchanged (but for the import) on a tiny checkpoint."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = ["qwen2_vl_single_media.py", "qwen2_vl_batch_mixed_media.py", "qwen2_vl_usage_tips.py"]


def run_example(name: str, model: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OCULA_MODEL=str(model), OCULA_EXAMPLE_ASSETS=str(tmp_path), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, name], cwd=EXAMPLES, env=env, capture_output=True, text=True, timeout=300, check=False
    )


@pytest.mark.parametrize("name", SCRIPTS)
def test_example_runs(name, qwen2_vl_ckpt, tmp_path):
    result = run_example(name, qwen2_vl_ckpt, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip()


def test_examples_import_only_ocula():
    """The examples differ from the documentation only in the import line: they never use transformers."""
    for name in SCRIPTS:
        tree = ast.parse((EXAMPLES / name).read_text())
        modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        modules |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert "ocula" in modules
        assert not any(m and m.split(".")[0] in {"transformers", "torchvision"} for m in modules)


def test_usage_tips_prompts_match_the_documentation(qwen2_vl_ckpt, tmp_path):
    out = run_example("qwen2_vl_usage_tips.py", qwen2_vl_ckpt, tmp_path).stdout
    assert "Picture 1: <|vision_start|><|image_pad|><|vision_end|>Hello, how are you?" in out
    assert "Video 1: <|vision_start|><|video_pad|><|vision_end|>These are from my vacation." in out
