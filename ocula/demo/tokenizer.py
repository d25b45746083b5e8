"""A small byte-level BPE tokenizer for the shapes world, with Qwen2-VL's special tokens and chat template.

Notable features:
- Same pipeline as Qwen2's tokenizer (NFC, Qwen2's split regex, byte-level BPE without prefix space), so
  transformers' `Qwen2Tokenizer`, which rebuilds that pipeline and keeps only vocab and merges, gives the
  same ids as the plain `tokenizers` load.
- Byte-level: any user text (other words, emoji, other scripts) still encodes and decodes losslessly; the
  closed vocabulary of the shapes world is mostly whole-word tokens.
- The special tokens of Qwen2-VL, in Qwen2-VL's order, after the BPE vocabulary.
- Qwen/Qwen2-VL-7B-Instruct's chat template, verbatim.
- Saved in the hub layout (tokenizer.json, tokenizer_config.json, chat_template.json).
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.trainers import BpeTrainer

from ocula.demo import shapes
from ocula.loading import write_json

# Qwen2's pre-tokenizer split (transformers models/qwen2/tokenization_qwen2.py, PRETOKENIZE_REGEX).
SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)

# Qwen2-VL's special tokens in their hub order (ids 151643..151656 there; here they follow the BPE vocab).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# The chat template of Qwen/Qwen2-VL-7B-Instruct (chat_template.json), verbatim.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

BPE_VOCAB_SIZE = 432  # 256 byte symbols + 176 merges: the closed vocabulary becomes mostly whole words
_CORPUS_SEEDS = range(4000)  # training seeds; the tokenizer sees no held-out question
# The chat template's own words come with every sample, so they are weighted like it: whole-word tokens
# for "system", "You are a helpful assistant." and "user" make every training sequence ~14 tokens shorter.
_TEMPLATE_TEXT = ("system\nYou are a helpful assistant.", "user\n", "assistant\n")
_EXTRA_TEXT = (
    "What is in the image? Describe this image. What can you see in the picture?",
    "Yes. No. I don't know. There is a shape. There are shapes. The answer is",
)


def corpus() -> list[str]:
    """Text the BPE merges are learnt from: every question type's questions and answers, a few phrases."""
    lines = list(_TEMPLATE_TEXT) * len(_CORPUS_SEEDS) + list(_EXTRA_TEXT)
    for seed in _CORPUS_SEEDS:
        s = shapes.sample(seed, shapes.QUESTION_TYPES[seed % len(shapes.QUESTION_TYPES)])
        lines += [s.question, s.answer]
    return lines


def build_tokenizer(vocab_size: int = BPE_VOCAB_SIZE) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                         show_progress=False, special_tokens=[])
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def tokenizer_config(tok: Tokenizer) -> dict:
    """tokenizer_config.json as Qwen/Qwen2-VL-7B-Instruct ships it (pre-v5 hub layout)."""
    decoder = {
        str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                  "single_word": False, "special": True}
        for t in SPECIAL_TOKENS
    }
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                                      "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
                                      "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                                      "<|image_pad|>", "<|video_pad|>"],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def save_tokenizer(tok: Tokenizer, folder: str | Path) -> None:
    """Write tokenizer.json, tokenizer_config.json and chat_template.json into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    write_json(folder / "tokenizer_config.json", tokenizer_config(tok))
    write_json(folder / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
