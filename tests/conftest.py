import os

import torch

# Deterministic, small and quiet: tests run on 2 CPU cores.
torch.set_num_threads(int(os.environ.get("OCULA_TEST_THREADS", "1")))
torch.manual_seed(0)


# ---- tiny random checkpoints of the four families (tests/checkpoints.py), built once per session ----
import sys
from pathlib import Path

import pytest

if str(Path(__file__).resolve().parent.parent) not in sys.path:  # `tests.checkpoints` under plain `pytest`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.checkpoints import build_checkpoint


@pytest.fixture(scope="session")
def make_ckpt(tmp_path_factory):
    """Factory: make_ckpt(family, layout="v5", **overrides) -> Path; each variant is built once."""
    built = {}

    def make(family: str, layout: str = "v5", **overrides):
        key = (family, layout, repr(sorted(overrides.items())))
        if key not in built:
            folder = tmp_path_factory.mktemp(f"{family}_{layout}")
            built[key] = build_checkpoint(family, folder, layout, **overrides)
        return built[key]

    return make


@pytest.fixture(scope="session")
def qwen2_vl_ckpt(make_ckpt):
    return make_ckpt("qwen2_vl", "v5")


@pytest.fixture(scope="session")
def qwen2_vl_ckpt_hub(make_ckpt):
    return make_ckpt("qwen2_vl", "hub")


@pytest.fixture(scope="session")
def llava_onevision_ckpt(make_ckpt):
    return make_ckpt("llava_onevision", "v5")


@pytest.fixture(scope="session")
def llava_onevision_ckpt_hub(make_ckpt):
    return make_ckpt("llava_onevision", "hub")


@pytest.fixture(scope="session")
def idefics2_ckpt(make_ckpt):
    return make_ckpt("idefics2", "v5")


@pytest.fixture(scope="session")
def idefics2_ckpt_hub(make_ckpt):
    return make_ckpt("idefics2", "hub")


@pytest.fixture(scope="session")
def ovis2_ckpt(make_ckpt):
    return make_ckpt("ovis2", "v5")


@pytest.fixture(scope="session")
def ovis2_ckpt_hub(make_ckpt):
    return make_ckpt("ovis2", "hub")
