"""The library path on a CUDA device gives the CPU's tokens and logits (skipped without a GPU).

For each family's tiny checkpoint: a forward with labels (logits and loss), greedy `generate` on a batch of
two conversations of different lengths (left padding), in float32 on the GPU against the CPU; and in
bfloat16, the last logits of a single prompt close to float32's, and generate running.
"""

from __future__ import annotations

import pytest
import torch

from ocula import AutoModelForImageTextToText, AutoProcessor
from tests.checkpoints import make_image

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
FAMILIES = ["qwen2_vl", "llava_onevision", "idefics2", "ovis2"]


def _inputs(processor):
    conversations = [
        [{"role": "user", "content": [{"type": "image", "image": make_image(64, 48, seed=1)},
                                      {"type": "text", "text": "What is in this picture?"}]}],
        [{"role": "user", "content": [{"type": "image", "image": make_image(40, 40, seed=2)},
                                      {"type": "text", "text": "Describe it in many words, please, " * 3}]}],
    ]
    processor.tokenizer.padding_side = "left"
    return processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True,
                                         return_dict=True, return_tensors="pt", padding=True)


def _to(inputs, device):
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_library_on_cuda_equals_cpu(family, request, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # float32 convolutions, as on the CPU
    folder = request.getfixturevalue(f"{family}_ckpt")
    processor = AutoProcessor.from_pretrained(folder)
    inputs = dict(_inputs(processor))
    cpu = AutoModelForImageTextToText.from_pretrained(folder, device="cpu")
    gpu = AutoModelForImageTextToText.from_pretrained(folder, device="cuda")
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        ref = cpu(**inputs, labels=labels)
        out = gpu(**_to(inputs, "cuda"), labels=labels.cuda())
    torch.testing.assert_close(out.logits.cpu(), ref.logits, atol=2e-3, rtol=2e-3)
    assert float(out.loss) == pytest.approx(float(ref.loss), abs=1e-3)
    want = cpu.generate(**inputs, max_new_tokens=8, do_sample=False)
    got = gpu.generate(**_to(inputs, "cuda"), max_new_tokens=8, do_sample=False)
    assert got.device.type == "cuda"
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_on_cuda_is_close_to_float32(family, request):
    folder = request.getfixturevalue(f"{family}_ckpt")
    processor = AutoProcessor.from_pretrained(folder)
    conversation = [{"role": "user", "content": [{"type": "image", "image": make_image(64, 48, seed=1)},
                                                 {"type": "text", "text": "What is in this picture?"}]}]
    single = dict(processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                                return_dict=True, return_tensors="pt"))
    cpu = AutoModelForImageTextToText.from_pretrained(folder, device="cpu")
    gpu = AutoModelForImageTextToText.from_pretrained(folder, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ref = cpu(**single).logits[0, -1]
        out = gpu(**_to(single, "cuda")).logits[0, -1].float().cpu()
    assert torch.isfinite(out).all()
    assert float(torch.nn.functional.cosine_similarity(out, ref, dim=0)) > 0.99
    tokens = gpu.generate(**_to(single, "cuda"), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert tokens.shape[1] == single["input_ids"].shape[1] + 4
