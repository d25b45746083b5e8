"""Qwen2-VL documentation usage tips: min/max pixels at load time, and `add_vision_id` for several media.

Same code as the transformers documentation; only the import line differs.
"""

from assets import MODEL

from ocula import AutoProcessor

min_pixels = 224 * 224
max_pixels = 2048 * 2048
processor = AutoProcessor.from_pretrained(MODEL, min_pixels=min_pixels, max_pixels=max_pixels)

min_pixels = 256 * 28 * 28
max_pixels = 1024 * 28 * 28
processor = AutoProcessor.from_pretrained(MODEL, min_pixels=min_pixels, max_pixels=max_pixels)

conversation = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hello, how are you?"}]},
    {"role": "assistant", "content": "I'm doing well, thank you for asking. How can I assist you today?"},
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "Can you describe these images and video?"},
            {"type": "image"},
            {"type": "image"},
            {"type": "video"},
            {"type": "text", "text": "These are from my vacation."},
        ],
    },
    {
        "role": "assistant",
        "content": "I'd be happy to describe the images and video for you. Could you please provide more context "
        "about your vacation?",
    },
    {"role": "user", "content": "It was a trip to the mountains. Can you see the details in the images and video?"},
]

# default:
prompt_without_id = processor.apply_chat_template(conversation, add_generation_prompt=True)
print(prompt_without_id)

# add ids
prompt_with_id = processor.apply_chat_template(conversation, add_generation_prompt=True, add_vision_id=True)
print(prompt_with_id)
