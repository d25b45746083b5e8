"""ocula's runtime never imports transformers, torchvision or torchcodec."""

import subprocess
import sys

SCRIPT = r"""
import sys
import torch
from PIL import Image
from ocula import AutoProcessor, AutoModelForImageTextToText
path = sys.argv[1]
processor = AutoProcessor.from_pretrained(path)
model = AutoModelForImageTextToText.from_pretrained(path)
conversation = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (56, 84), "red")},
                                             {"type": "text", "text": "hi"}]}]
inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                       return_dict=True, return_tensors="pt")
model.generate(**inputs, max_new_tokens=3)
model(**inputs, labels=inputs["input_ids"]).loss.backward()
banned = [m for m in sys.modules if m.split(".")[0] in {"transformers", "torchvision", "torchcodec"}]
print("BANNED", banned)
"""


def test_running_a_model_imports_no_transformers(qwen2_vl_ckpt):
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(qwen2_vl_ckpt)], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "BANNED []" in result.stdout
