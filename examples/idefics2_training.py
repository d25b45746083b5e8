"""Idefics2 documentation example: training labels (padding and image tokens masked), loss and backward.

Same code as the transformers documentation; only the import line differs, the two images are local files
(this machine may have no network) and the device comes from torch (the page imports `infer_device` from
transformers). Run it with OCULA_MODEL set to an Idefics2 checkpoint, e.g. HuggingFaceM4/idefics2-8b.
"""

import torch
from assets import MODEL, example_image
from PIL import Image

from ocula import Idefics2ForConditionalGeneration, Idefics2Processor

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
},
{
    "role": "assistant",
    "content": [
        {"type": "text", "text": "The difference is that one image is about dogs and the other one about cats."},
    ],
}]

device = "cuda" if torch.cuda.is_available() else "cpu"

processor = Idefics2Processor.from_pretrained(MODEL)
model = Idefics2ForConditionalGeneration.from_pretrained(MODEL)
model.to(device)

text = processor.apply_chat_template(messages, add_generation_prompt=False)
inputs = processor(images=images, text=text, return_tensors="pt").to(model.device)

labels = inputs.input_ids.clone()
labels[labels == processor.tokenizer.pad_token_id] = -100
labels[labels == model.config.image_token_id] = -100

inputs["labels"] = labels

outputs = model(**inputs)
loss = outputs.loss
loss.backward()
