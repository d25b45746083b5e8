"""Qwen2-VL documentation example: batch mixed media inference (image / two images / text / images + video).

Same code as the transformers documentation; only the import line differs (and local media paths).
"""

from assets import MODEL, example_image, example_video

from ocula import AutoProcessor, Qwen2VLForConditionalGeneration

model = Qwen2VLForConditionalGeneration.from_pretrained(MODEL, device_map="auto")
processor = AutoProcessor.from_pretrained(MODEL)

image1, image2 = example_image("image1.jpg", seed=1), example_image("image2.jpg", 300, 120, seed=2)
image3, image4 = example_image("image3.jpg", 120, 260, seed=3), example_image("image4.jpg", 64, 64, seed=4)

# Conversation for the first image
conversation1 = [
    {"role": "user", "content": [{"type": "image", "path": image1}, {"type": "text", "text": "Describe this image."}]}
]

# Conversation with two images
conversation2 = [
    {
        "role": "user",
        "content": [
            {"type": "image", "path": image2},
            {"type": "image", "path": image3},
            {"type": "text", "text": "What is written in the pictures?"},
        ],
    }
]

# Conversation with pure text
conversation3 = [{"role": "user", "content": "who are you?"}]

# Conversation with mixed media
conversation4 = [
    {
        "role": "user",
        "content": [
            {"type": "image", "path": image3},
            {"type": "image", "path": image4},
            {"type": "video", "path": example_video()},
            {"type": "text", "text": "What are the common elements in these medias?"},
        ],
    }
]

conversations = [conversation1, conversation2, conversation3, conversation4]
# Preparation for batch inference
inputs = processor.apply_chat_template(
    conversations,
    video_fps=1,
    add_generation_prompt=True,
    tokenize=True,
    return_dict=True,
    return_tensors="pt",
    padding=True,
).to(model.device)


# Batch Inference
output_ids = model.generate(**inputs, max_new_tokens=128)
generated_ids = [output_ids[len(input_ids):] for input_ids, output_ids in zip(inputs.input_ids, output_ids)]
output_text = processor.batch_decode(generated_ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)
print(output_text)
