"""LLaVA-OneVision documentation example: single image inference in half precision.

Same code as the transformers documentation; only the import line differs, the checkpoint id and the image
location point at local files (this machine may have no network), and the device is picked explicitly
(the page's `f"{infer_device}:0"` formats a function, not a device name).
"""

import torch
from assets import MODEL, example_image

from ocula import AutoProcessor, LlavaOnevisionForConditionalGeneration

device = "cuda:0" if torch.cuda.is_available() else "cpu"

processor = AutoProcessor.from_pretrained(MODEL)
model = LlavaOnevisionForConditionalGeneration.from_pretrained(
    MODEL,
    dtype=torch.float16,
    device_map=device
)

# prepare image and text prompt, using the appropriate prompt template
url = example_image("radar.jpg", 320, 240, seed=7)
conversation = [
    {
        "role": "user",
        "content": [
            {"type": "image", "url": url},
            {"type": "text", "text": "What is shown in this image?"},
        ],
    },
]
inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
inputs = inputs.to(model.device, torch.float16)

# autoregressively complete prompt
output = model.generate(**inputs, max_new_tokens=100)
print(processor.decode(output[0], skip_special_tokens=True))
