"""Idefics2 documentation example: a chat about two images (processor.apply_chat_template, then generate).

Same code as the transformers documentation; only the import line differs, the two images are local files
(this machine may have no network) and the device comes from torch (the page imports `infer_device` from
transformers). Run it with OCULA_MODEL set to an Idefics2 checkpoint, e.g. HuggingFaceM4/idefics2-8b.
"""

import torch
from assets import MODEL, example_image
from PIL import Image

from ocula import Idefics2ForConditionalGeneration, Idefics2Processor

device = "cuda" if torch.cuda.is_available() else "cpu"

image_1 = Image.open(example_image("two_cats.jpg", 320, 240, seed=3))
image_2 = Image.open(example_image("skier.jpg", 240, 320, seed=4))
images = [image_1, image_2]

messages = [{
    "role": "user",
    "content": [
        {"type": "text", "text": "What’s the difference between these two images?"},
        {"type": "image"},
        {"type": "image"},
    ],
}]

processor = Idefics2Processor.from_pretrained(MODEL)
model = Idefics2ForConditionalGeneration.from_pretrained(MODEL)
model.to(device)

# at inference time, one needs to pass `add_generation_prompt=True` in order to make sure the model completes the prompt
text = processor.apply_chat_template(messages, add_generation_prompt=True)
print(text)
# 'User: What’s the difference between these two images?\nAssistant:'

inputs = processor(images=images, text=text, return_tensors="pt").to(model.device)

generated_text = model.generate(**inputs, max_new_tokens=500)
generated_text = processor.batch_decode(generated_text, skip_special_tokens=True)[0]
print("Generated text:", generated_text)
