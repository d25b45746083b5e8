"""Ovis2 documentation example (the transformers 5 API-reference page): describe an image.

Same code as the transformers documentation; only the import line differs, and the checkpoint id and the
image location point at local files. One fix: the page calls `.eval().to(model.device, device_map="auto")`
before `model` exists (a NameError with any library), so the device map moves into `from_pretrained`.
"""

import torch
from assets import MODEL, example_image
from PIL import Image

from ocula import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained(
    MODEL, device_map="auto",
).eval()
processor = AutoProcessor.from_pretrained(MODEL)

messages = [
    {
        "role": "user",
        "content": [
            {"type": "image"},
            {"type": "text", "text": "Describe the image."},
        ],
    },
]
image = Image.open(example_image())
messages = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
print(messages)

inputs = processor(
    images=[image],
    text=messages,
    return_tensors="pt",
)
inputs = inputs.to(model.device)
inputs['pixel_values'] = inputs['pixel_values'].to(torch.bfloat16)

with torch.inference_mode():
    output_ids = model.generate(**inputs, max_new_tokens=128, do_sample=False)
    generated_ids = [output_ids[len(input_ids):] for input_ids, output_ids in zip(inputs.input_ids, output_ids)]
    output_text = processor.batch_decode(generated_ids, skip_special_tokens=True)
    print(output_text)
