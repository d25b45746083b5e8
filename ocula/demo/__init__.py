"""The shapes demo: a synthetic world of coloured shapes and a tiny Qwen2-VL-architecture model trained on it.

Notable features:
- `shapes`: a seeded generator of images with questions and exact-match answers (shape, colour, count,
  position, caption), with disjoint train and held-out seed ranges.
- `tokenizer`: a byte-level BPE tokenizer of a few hundred tokens with Qwen2-VL's special tokens and the
  real Qwen2-VL chat template.
- `write_skeleton(folder)`: everything of a hub-style Qwen2-VL checkpoint folder except the weights
  (config.json, generation_config.json, preprocessor_config.json, tokenizer and chat template files), so
  the trained model loads with `from_pretrained` in ocula and in transformers alike.

Training and evaluation live in scripts/train_demo.py and scripts/eval_demo.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ocula.demo import shapes
from ocula.demo.tokenizer import build_tokenizer, save_tokenizer
from ocula.loading import write_json

__all__ = ["DEMO_SIZE", "DemoSize", "model_config", "shapes", "write_skeleton"]

IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]  # Qwen2-VL's (CLIP's) normalisation
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class DemoSize:
    """The tiny model's dimensions: small enough to train on two CPU cores in under half an hour."""

    vision_depth: int = 2  # ViT blocks
    vision_embed_dim: int = 96  # ViT width
    vision_heads: int = 4  # ViT heads (head dim 24: 2-D rotary needs a multiple of 4)
    text_hidden: int = 128  # decoder width; the patch merger projects into it
    text_layers: int = 3  # decoder layers
    # Eight heads of 16 and four key/value heads: the same projections as four heads of 32 with two key/value
    # heads, but twice the look-ups. With four heads all runs tried but one learnt to find a shape by its place
    # or by its kind, not both (docs/demo-model.md); with eight, both runs tried learnt both.
    text_heads: int = 8
    text_kv_heads: int = 4
    text_intermediate: int = 384  # SwiGLU width
    # (t, h, w) halves of the rotary dims: sums to head_dim/2. A question word looking for "the circle" among
    # the image tokens must score them alike wherever they are, and only the t band does that (every image
    # token shares its t position; h and w turn with the token's row and column). Half the pairs go to t;
    # with four heads, Qwen2-VL's own proportions (a quarter) never learnt both look-ups, 8/4/4 once in eight.
    mrope_section: tuple[int, int, int] = (4, 2, 2)
    # M-RoPE gives the image rows and columns the slowest rotary frequencies: with the usual base (10000)
    # neighbouring cells of a 4x4 token grid differ by under 0.1 radian there, and a two-layer decoder cannot
    # tell "top left" from "top right". Base 2 puts every frequency between 0.5 and 1 radian per position.
    rope_theta: float = 2.0
    # The processor's pixel budget is image_side**2: a 112-pixel shapes image gives (112 / 28)**2 = 16 image
    # tokens, four per shape; 56 shrinks it to 4 tokens, one per grid cell.
    image_side: int = 112
    # Patches merged into one image token per side (Qwen2-VL: 2). 4 makes each token a whole grid cell.
    merge_size: int = 2

    def __post_init__(self):
        head_dim = self.text_hidden // self.text_heads
        if sum(self.mrope_section) * 2 != head_dim:
            raise ValueError(f"mrope_section {self.mrope_section} must sum to head_dim/2 = {head_dim // 2}")


DEMO_SIZE = DemoSize()


def model_config(vocab_size: int, ids: dict[str, int], size: DemoSize = DEMO_SIZE) -> dict:
    """config.json in the flat hub layout of Qwen/Qwen2-VL-*-Instruct."""
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "hidden_act": "silu",
        "hidden_size": size.text_hidden,
        "initializer_range": 0.02,
        "intermediate_size": size.text_intermediate,
        "max_position_embeddings": 4096,
        "max_window_layers": size.text_layers,
        "num_attention_heads": size.text_heads,
        "num_hidden_layers": size.text_layers,
        "num_key_value_heads": size.text_kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_theta": size.rope_theta,
        "rope_scaling": {"type": "mrope", "mrope_section": list(size.mrope_section)},
        "sliding_window": 4096,
        "use_sliding_window": False,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": vocab_size,
        "vision_config": {
            "depth": size.vision_depth,
            "embed_dim": size.vision_embed_dim,
            "mlp_ratio": 4,
            "num_heads": size.vision_heads,
            "in_chans": 3,
            "hidden_size": size.text_hidden,
            "patch_size": 14,
            "spatial_merge_size": size.merge_size,
            "spatial_patch_size": 14,
            "temporal_patch_size": 2,
        },
    }


def preprocessor_config(image_size: int = shapes.IMAGE_SIZE, merge_size: int = 2) -> dict:
    """preprocessor_config.json: pixel bounds keep a shapes image as it is and shrink larger ones to it."""
    return {
        "min_pixels": 56 * 56,
        "max_pixels": image_size * image_size,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": merge_size,
        "image_mean": IMAGE_MEAN,
        "image_std": IMAGE_STD,
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor",
    }


def generation_config(ids: dict[str, int]) -> dict:
    """Greedy by default: the demo answers are exact, sampling would only add mistakes."""
    return {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"],
        "do_sample": False,
    }


def write_skeleton(folder: str | Path, size: DemoSize = DEMO_SIZE) -> Path:
    """Write every file of the demo checkpoint except model.safetensors into `folder`; returns the folder."""
    folder = Path(folder)
    tok = build_tokenizer()
    save_tokenizer(tok, folder)
    ids = tok.get_vocab()
    vocab_size = -(-tok.get_vocab_size() // 64) * 64  # rows past the tokenizer are never produced
    write_json(folder / "config.json", model_config(vocab_size, ids, size))
    write_json(folder / "generation_config.json", generation_config(ids))
    write_json(folder / "preprocessor_config.json", preprocessor_config(size.image_side, size.merge_size))
    return folder
