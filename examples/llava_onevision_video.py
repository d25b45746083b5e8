"""LLaVA-OneVision documentation example: video inference with 8 sampled frames.

Same code as the transformers documentation; only the import line differs, the checkpoint id and the video
location point at local files (this machine may have no network), and the page's missing comma after
`num_frames=8` is added.
"""

import torch
from assets import MODEL, example_video

from ocula import AutoProcessor, LlavaOnevisionForConditionalGeneration

# Load the model in half-precision
model = LlavaOnevisionForConditionalGeneration.from_pretrained(MODEL, dtype=torch.float16, device_map="auto")
processor = AutoProcessor.from_pretrained(MODEL)

video_path = example_video("sample_demo_1.mp4", frames=16)
conversation = [
    {

        "role": "user",
        "content": [
            {"type": "video", "path": video_path},
            {"type": "text", "text": "Why is this video funny?"},
            ],
    },
]

inputs = processor.apply_chat_template(
    conversation,
    num_frames=8,
    add_generation_prompt=True,
    tokenize=True,
    return_dict=True,
    return_tensors="pt"
).to(model.device, torch.float16)

out = model.generate(**inputs, max_new_tokens=60)
print(processor.batch_decode(out, skip_special_tokens=True, clean_up_tokenization_spaces=True))
