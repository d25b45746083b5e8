"""Tiny random-weight checkpoints of the four families, written by transformers (the test oracle).

Notable features:
- Small real tokenizers: byte-level BPE (Qwen2 style) or Metaspace + byte-fallback BPE (Llama style, BOS
  `<s>`), trained with `tokenizers` on a built-in English corpus, carrying each family's real special
  tokens at the end of the vocabulary (same order as the hub checkpoint) and its real chat template.
- Tiny but structurally complete models: every switch the family has is on (biases, norms, M-RoPE,
  perceiver resampler, sliding window, hidden stride, image newline, ...).
- Weights redrawn after init from a seed (linear weights normal(0, std), norms around 1, biases around 0,
  all with noise) so a dropped bias or norm makes parity fail, while activations stay O(1).
- Two folder layouts: `v5` (exactly what transformers 5 `save_pretrained` writes) and `hub` (the pre-v5
  layout of most real checkpoints: preprocessor_config.json, video_preprocessor_config.json,
  chat_template.json, additional_special_tokens, `torch_dtype`, `rope_theta`, Qwen2-VL's flat config.json,
  LLaVA-OV's `vision_tower.vision_model.*` weights, a legacy sentencepiece-style Llama tokenizer.json).
- Trap worth knowing: transformers 5 `save_pretrained` writes the ORIGINAL weight names (it reverses its
  load-time renaming): Qwen2-VL `visual.*` / `model.layers.*` / `lm_head`, LLaVA-OV
  `language_model.model.*` / `language_model.lm_head` / `vision_tower.*`. `save_original_format=False`
  writes the v5 in-memory names instead (`model.visual.*`, `model.language_model.*`).
- Media helpers (`make_image`, `make_video_frames`, `write_mp4`) and oracle loaders (`hf_processor`,
  `hf_model`) for parity tests.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

FAMILIES = ("qwen2_vl", "llava_onevision", "idefics2", "ovis2")
LAYOUTS = ("v5", "hub")
TEMPLATES = Path(__file__).parent / "fixtures" / "templates"

CORPUS = """\
The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.
Describe this image in one sentence. What is shown in the picture? What happens in this video?
There is a red square, a blue circle and a green line on a white background.
The cat sat on the mat and looked out of the window at the birds in the garden.
Please answer the question about the image. How many objects can you see? Count them.
The man is riding a bicycle down the street while the sun sets behind the old houses.
A small boat sails across the calm lake in the morning; two children wave from the shore.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024. Colors: red, orange, yellow, green, blue, violet.
You are a helpful assistant. The user asks a question and the assistant answers it politely.
Hello, how are you today? I am fine, thank you. Where is the train station? It is near the park.
The video shows a dog running on the beach, then a wave comes in and the dog jumps back.
This is a photo of a kitchen with a table, four chairs, a lamp and a bowl of apples and pears.
"""

QWEN_PRETOKENIZE = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"""
    r"""\s+(?!\S)|\s+"""
)
QWEN2_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip
QWEN25_EXTRA = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]  # fmt: skip
OVIS2_IMAGE_TOKENS = ["<IMG_ATOM>", "<IMG_START>", "<IMG_GRID>", "<IMG_COL>", "<IMG_ROW>", "<IMG_END>"]


@dataclass(frozen=True)
class TokenizerSpec:
    """The special tokens of one family, in hub vocabulary order (appended after the trained vocab)."""

    kind: str  # "qwen2" (byte-level BPE) or "llama" (Metaspace + byte fallback, BOS <s>)
    specials: list[str]  # added tokens, in id order
    extra: list[str]  # `extra_special_tokens` (v5) / `additional_special_tokens` (hub)
    eos: str
    pad: str
    bos: str | None = None
    unk: str | None = None


SPECS = {
    "qwen2_vl": TokenizerSpec("qwen2", QWEN2_SPECIALS, QWEN2_SPECIALS[1:], eos="<|im_end|>", pad="<|endoftext|>"),
    "llava_onevision": TokenizerSpec(
        "qwen2", ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"],
        ["<|im_start|>", "<|im_end|>", "<image>", "<video>"], eos="<|im_end|>", pad="<|endoftext|>",
    ),
    "idefics2": TokenizerSpec(
        "llama", ["<fake_token_around_image>", "<image>", "<end_of_utterance>"],
        ["<fake_token_around_image>", "<image>", "<end_of_utterance>"], eos="</s>", pad="<unk>", bos="<s>",
        unk="<unk>",
    ),
    "ovis2": TokenizerSpec(
        "qwen2", QWEN2_SPECIALS + QWEN25_EXTRA + OVIS2_IMAGE_TOKENS,
        QWEN2_SPECIALS[1:] + OVIS2_IMAGE_TOKENS, eos="<|im_end|>", pad="<|endoftext|>",
    ),
}  # fmt: skip


# ----------------------------------------------------------------------------------------------- tokenizers


@cache
def _trained_bpe(kind: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a small BPE on CORPUS with the pre-tokenizer of `kind`; return (vocab, merges)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    if kind == "qwen2":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=alphabet, show_progress=False)
    else:
        tok = Tokenizer(models.BPE(byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        # The byte tokens <0x00>..<0xFF> and <unk> <s> </s> come first, like a sentencepiece Llama vocab.
        base = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
        trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=base, show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return dict(model["vocab"]), merges


def _tokenizer(family: str):
    """A transformers tokenizer of `family` (the class the hub checkpoint names), built in memory."""
    from tokenizers import AddedToken
    from transformers import LlamaTokenizer, Qwen2Tokenizer

    spec = SPECS[family]
    vocab, merges = _trained_bpe(spec.kind)
    vocab = dict(vocab)
    for token in spec.specials:
        vocab[token] = len(vocab)
    kw: dict[str, Any] = {
        "vocab": vocab,
        "merges": list(merges),
        "eos_token": spec.eos,
        "pad_token": spec.pad,
        "extra_special_tokens": list(spec.extra),
    }
    if spec.kind == "qwen2":
        tok = Qwen2Tokenizer(unk_token=None, bos_token=None, **kw)
    else:
        tok = LlamaTokenizer(unk_token=spec.unk, bos_token=spec.bos, add_bos_token=True, **kw)
    plain = [t for t in spec.specials if t not in spec.extra and t not in (spec.eos, spec.pad, spec.bos)]
    if plain:  # Qwen2.5's <tool_call>, <|fim_*|> ...: added tokens that are not special
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])
    tok.chat_template = chat_template(family)
    tok.model_max_length = 32768
    return tok


def chat_template(family: str) -> str:
    """The real chat template of the family's reference hub checkpoint."""
    return (TEMPLATES / f"{family}.jinja").read_text()


def build_tokenizer(family: str, folder: Path) -> None:
    """Save the family's small real tokenizer (transformers 5 layout) into `folder`."""
    _check_family(family)
    _tokenizer(family).save_pretrained(str(folder))


def token_id(folder: Path | str, token: str) -> int:
    """The id of `token` in the checkpoint's tokenizer.json (added tokens included)."""
    data = json.loads((Path(folder) / "tokenizer.json").read_text())
    for added in data["added_tokens"]:
        if added["content"] == token:
            return added["id"]
    return data["model"]["vocab"][token]


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; use one of {FAMILIES}")


# ----------------------------------------------------------------------------------------------- configs


def _ids(tok, *tokens: str) -> list[int]:
    return [tok.convert_tokens_to_ids(t) for t in tokens]


def _qwen2_text(vocab_size: int, **extra) -> dict:
    """A tiny Qwen2 decoder: hidden 64, 2 layers, 4 heads / 2 kv heads, head_dim 16."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        **extra,
    )


def _qwen2_vl_config(tok) -> dict:
    image, video, start, end = _ids(
        tok, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"
    )
    eos, bos = _ids(tok, "<|im_end|>", "<|endoftext|>")
    text = _qwen2_text(
        len(tok),
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
        bos_token_id=bos,
        eos_token_id=eos,
        max_window_layers=2,
        use_sliding_window=False,
    )
    vision = {
        "depth": 2,
        "embed_dim": 32,
        "hidden_size": 64,
        "num_heads": 2,
        "mlp_ratio": 2,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "in_channels": 3,
        "hidden_act": "quick_gelu",
    }
    return {
        "model_type": "qwen2_vl",
        "text_config": text,
        "vision_config": vision,
        "image_token_id": image,
        "video_token_id": video,
        "vision_start_token_id": start,
        "vision_end_token_id": end,
        "tie_word_embeddings": False,
    }


def _pinpoints(tile: int) -> list[list[int]]:
    """LLaVA-OneVision's 6x6 anyres grid (384 * {1..6}^2 on the hub), scaled to the tile size."""
    return [[tile * i, tile * j] for i in range(1, 7) for j in range(1, 7)]


LLAVA_TILE = 60  # like 384 / 14, not a multiple of the patch: the vision conv drops the last 4 pixels


def _llava_onevision_config(tok) -> dict:
    image, video, eos, bos = _ids(tok, "<image>", "<video>", "<|im_end|>", "<|endoftext|>")
    text = _qwen2_text(
        len(tok),
        model_type="qwen2",
        rope_theta=1000000.0,
        bos_token_id=bos,
        eos_token_id=eos,
        tie_word_embeddings=False,
    )
    vision = {
        "model_type": "siglip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": LLAVA_TILE,
        "patch_size": 14,
        "vision_use_head": False,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
    }
    return {
        "model_type": "llava_onevision",
        "text_config": text,
        "vision_config": vision,
        "image_token_index": image,
        "video_token_index": video,
        "projector_hidden_act": "gelu",
        "vision_feature_select_strategy": "full",
        "vision_feature_layer": -1,
        "image_grid_pinpoints": _pinpoints(LLAVA_TILE),
        "vision_aspect_ratio": "anyres_max_9",
        "use_image_newline_parameter": True,
        "tie_word_embeddings": False,
        "multimodal_projector_bias": True,
    }


IDEFICS2_LATENTS = 4


def _idefics2_config(tok) -> dict:
    image, pad, bos, eos = _ids(tok, "<image>", "<unk>", "<s>", "</s>")
    text = {
        "model_type": "mistral",
        "vocab_size": len(tok),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "sliding_window": 32,
        "pad_token_id": pad,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "tie_word_embeddings": False,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 56,
        "patch_size": 14,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
    }
    perceiver = {
        "hidden_act": "silu",
        "hidden_size": 64,
        "rms_norm_eps": 1e-5,
        "resampler_n_latents": IDEFICS2_LATENTS,
        "resampler_depth": 2,
        "resampler_n_heads": 2,
        "resampler_head_dim": 16,
        "num_key_value_heads": 1,
    }
    return {
        "model_type": "idefics2",
        "text_config": text,
        "vision_config": vision,
        "perceiver_config": perceiver,
        "image_token_id": image,
        "tie_word_embeddings": False,
        "use_cache": True,
    }


OVIS2_TILE, OVIS2_STRIDE = 84, 2  # 6x6 patches per tile, merged 2x2 -> 9 visual tokens per tile


def _ovis2_config(tok) -> dict:
    atom, *indicators = _ids(tok, *OVIS2_IMAGE_TOKENS)
    eos, bos = _ids(tok, "<|im_end|>", "<|endoftext|>")
    text = _qwen2_text(
        len(tok),
        model_type="qwen2",
        rope_theta=1000000.0,
        bos_token_id=bos,
        eos_token_id=eos,
        tie_word_embeddings=True,
    )
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": OVIS2_TILE,
        "patch_size": 14,
        "rms_norm_eps": 1e-5,
        "qkv_bias": True,
        "mlp_bias": True,
        "hidden_act": "silu",
        "vocab_size": 64,
        "hidden_stride": OVIS2_STRIDE,
        "num_visual_indicator_tokens": 5,
        "tokenize_function": "softmax",
    }
    return {
        "model_type": "ovis2",
        "text_config": text,
        "vision_config": vision,
        "image_token_id": atom,
        "visual_indicator_token_ids": indicators,
        "vocab_size": len(tok),
        "hidden_size": 64,
        "tie_word_embeddings": True,
    }


CONFIG_BUILDERS = {
    "qwen2_vl": _qwen2_vl_config,
    "llava_onevision": _llava_onevision_config,
    "idefics2": _idefics2_config,
    "ovis2": _ovis2_config,
}


def _merge(base: dict, overrides: dict) -> dict:
    """Recursive dict update: nested dicts (text_config={...}) are merged key by key."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def tiny_config(family: str, tokenizer=None, **overrides):
    """The transformers config of the tiny `family` model (`overrides` merged into the dict first)."""
    from transformers import AutoConfig

    _check_family(family)
    tok = tokenizer if tokenizer is not None else _tokenizer(family)
    data = _merge(CONFIG_BUILDERS[family](tok), overrides)
    return AutoConfig.for_model(data.pop("model_type"), **data)


# ----------------------------------------------------------------------------------------------- processors


def _qwen2_vl_processor(tok, **overrides):
    from transformers import Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    # 4..16 merged tokens per image, 4..16 per frame pair: tiny sequences whatever the input size.
    size = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 16}
    image = Qwen2VLImageProcessorPil(size=size, **overrides)
    video = Qwen2VLVideoProcessor(size=dict(size), **overrides)
    return Qwen2VLProcessor(
        image_processor=image, tokenizer=tok, video_processor=video, chat_template=chat_template("qwen2_vl")
    )


def _llava_onevision_processor(tok, **overrides):
    from transformers import LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )
    from transformers.models.llava_onevision.video_processing_llava_onevision import (
        LlavaOnevisionVideoProcessor,
    )

    size = {"height": LLAVA_TILE, "width": LLAVA_TILE}
    image = LlavaOnevisionImageProcessorPil(
        size=size, image_grid_pinpoints=_pinpoints(LLAVA_TILE), **overrides
    )
    video = LlavaOnevisionVideoProcessor(size=dict(size), **overrides)
    return LlavaOnevisionProcessor(
        image_processor=image,
        tokenizer=tok,
        video_processor=video,
        num_image_tokens=(LLAVA_TILE // 14) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        chat_template=chat_template("llava_onevision"),
    )


def _idefics2_processor(tok, **overrides):
    from transformers import Idefics2Processor
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    options = {"do_image_splitting": True, "size": {"shortest_edge": 28, "longest_edge": 56}, **overrides}
    image = Idefics2ImageProcessorPil(**options)
    return Idefics2Processor(
        image_processor=image,
        tokenizer=tok,
        image_seq_len=IDEFICS2_LATENTS,
        chat_template=chat_template("idefics2"),
    )


def _ovis2_processor(tok, **overrides):
    from transformers import Ovis2Processor
    from transformers.models.ovis2.image_processing_pil_ovis2 import Ovis2ImageProcessorPil

    options = {"crop_to_patches": True, "size": {"height": OVIS2_TILE, "width": OVIS2_TILE}, **overrides}
    image = Ovis2ImageProcessorPil(**options)
    seq = (OVIS2_TILE // 14 // OVIS2_STRIDE) ** 2
    return Ovis2Processor(
        image_processor=image, tokenizer=tok, image_seq_length=seq, chat_template=chat_template("ovis2")
    )


PROCESSOR_BUILDERS = {
    "qwen2_vl": _qwen2_vl_processor,
    "llava_onevision": _llava_onevision_processor,
    "idefics2": _idefics2_processor,
    "ovis2": _ovis2_processor,
}


# ----------------------------------------------------------------------------------------------- weights


def redraw_(model: torch.nn.Module, seed: int = 0) -> None:
    """Resample every parameter in place, deterministically from `seed` (names sorted).

    Norm weights ~ 1 + N(0, 0.1), biases ~ N(0, 0.05), token embeddings ~ N(0, 0.15), everything else
    ~ N(0, min(0.1, 1 / sqrt(fan_in))): far from the init constants, yet activations stay O(1).
    """
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
        with torch.no_grad():
            param.copy_(_redrawn(name, param, noise))


def _redrawn(name: str, param: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    is_norm = re.search(r"norm|ln_|\.ln\d?\.", name) is not None
    if name.endswith("bias"):
        return 0.05 * noise
    if is_norm and param.dim() == 1:
        return 1.0 + 0.1 * noise
    if param.dim() == 1:  # e.g. a learned newline / pad vector: O(1)
        return 0.5 * noise
    if "embed_tokens" in name or "embedding_table" in name or "embeddings_table" in name:
        return 0.15 * noise  # also the tied lm_head: logits ~ 0.15 * sqrt(hidden) ~ 1
    fan_in = int(np.prod(param.shape[1:])) if param.dim() > 1 else 1
    return min(0.1, fan_in**-0.5) * noise


# ----------------------------------------------------------------------------------------------- building


def build_checkpoint(
    family: str,
    folder: Path,
    layout: str = "v5",
    *,
    seed: int = 0,
    shards: bool = False,
    max_shard_size: str | int | None = None,
    processor: dict | None = None,
    save_original_format: bool = True,
    **config_overrides,
) -> Path:
    """Write a tiny random-weight checkpoint of `family` into `folder` and return it.

    layout "v5" is exactly what transformers 5 `save_pretrained` writes; "hub" rewrites it into the pre-v5
    hub layout (see the module docstring). `shards=True` (or `max_shard_size`) writes sharded safetensors
    with an index. `processor` overrides image/video processor settings (e.g. do_image_splitting=False).
    transformers 5 saves weights under their original (pre-v5) names by default: Qwen2-VL `visual.*` and
    `model.layers.*`, LLaVA-OV `language_model.model.*`; `save_original_format=False` keeps the v5 in-memory
    names (`model.visual.*`, `model.language_model.*`) in the v5 layout.
    Config overrides are merged into the config dict (nested dicts key by key), e.g.
    `tie_word_embeddings=True` or `text_config={"num_hidden_layers": 3}`.
    """
    from transformers import AutoModelForImageTextToText, GenerationConfig

    _check_family(family)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; use one of {LAYOUTS}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(family)
    config = tiny_config(family, tok, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config).eval()
    redraw_(model, seed)
    model.generation_config = _generation_config(GenerationConfig, config, tok)
    shard = max_shard_size if max_shard_size is not None else ("200KB" if shards else "5GB")
    original_names = save_original_format or layout == "hub"  # the hub files have the original names
    model.save_pretrained(str(folder), max_shard_size=shard, save_original_format=original_names)
    PROCESSOR_BUILDERS[family](tok, **(processor or {})).save_pretrained(str(folder))
    if layout == "hub":
        to_hub_layout(family, folder)
    return folder


def _generation_config(cls, config, tok):
    text = config.get_text_config()
    eos = [tok.convert_tokens_to_ids(tok.eos_token)]
    if tok.pad_token is not None and tok.pad_token_id not in eos and tok.bos_token is None:
        eos.append(tok.pad_token_id)  # Qwen checkpoints stop on <|im_end|> and <|endoftext|>
    bos = tok.bos_token_id if tok.bos_token is not None else getattr(text, "bos_token_id", None)
    return cls(bos_token_id=bos, eos_token_id=eos if len(eos) > 1 else eos[0], pad_token_id=tok.pad_token_id)


# ----------------------------------------------------------------------------------------------- hub layout


def to_hub_layout(family: str, folder: Path) -> None:
    """Rewrite a v5 folder in place into the pre-v5 hub layout of the family's real checkpoints."""
    folder = Path(folder)
    _split_processor_config(folder)
    _template_to_json(folder)
    _tokenizer_config_to_hub(folder, family)
    if SPECS[family].kind == "llama":
        _legacy_llama_tokenizer_json(folder)
    if family == "qwen2_vl":
        _flatten_qwen2_vl_config(folder)
    else:
        _config_to_hub(folder)
    renames = HUB_WEIGHT_RENAMES.get(family)
    if renames:
        _rename_weights(folder, renames)


def _read(folder: Path, name: str) -> dict:
    return json.loads((folder / name).read_text())


def _write(folder: Path, name: str, data: dict) -> None:
    (folder / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _split_processor_config(folder: Path) -> None:
    """processor_config.json {image_processor, video_processor, ...} -> preprocessor_config.json (+ video)."""
    data = _read(folder, "processor_config.json")
    processor_class = data.get("processor_class")
    image = data.pop("image_processor")
    video = data.pop("video_processor", None)
    image.pop("backend", None)
    image["image_processor_type"] = image["image_processor_type"].removesuffix("Pil")
    image.update(_hub_size_keys(image))
    _write(folder, "preprocessor_config.json", {**image, "processor_class": processor_class})
    if video is not None:
        video.update(_hub_size_keys(video))
        _write(folder, "video_preprocessor_config.json", {**video, "processor_class": processor_class})
    rest = {k: v for k, v in data.items() if k != "processor_class"}
    (folder / "processor_config.json").unlink()
    if rest:  # processor-level options (num_image_tokens, image_seq_len, ...) kept as the hub has them
        _write(folder, "processor_config.json", {**rest, "processor_class": processor_class})


def _hub_size_keys(proc: dict) -> dict:
    """Qwen2-VL hub files spell the pixel budget min_pixels / max_pixels."""
    size = proc.get("size") or {}
    if proc.get("image_processor_type", proc.get("video_processor_type", "")).startswith("Qwen2VL"):
        proc.pop("size")
        return {"min_pixels": size["shortest_edge"], "max_pixels": size["longest_edge"]}
    return {}


def _template_to_json(folder: Path) -> None:
    path = folder / "chat_template.jinja"
    _write(folder, "chat_template.json", {"chat_template": path.read_text()})
    path.unlink()


def _tokenizer_config_to_hub(folder: Path, family: str) -> None:
    data = _read(folder, "tokenizer_config.json")
    data.pop("extra_special_tokens", None)
    # The spec's list, not the saved one: Idefics2's processor replaces the list with <end_of_utterance>.
    data["additional_special_tokens"] = list(SPECS[family].extra)
    data.pop("backend", None)
    tok = json.loads((folder / "tokenizer.json").read_text())
    data["added_tokens_decoder"] = {
        str(t["id"]): {
            k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
        }
        for t in tok["added_tokens"]
    }
    _write(folder, "tokenizer_config.json", data)


def _legacy_llama_tokenizer_json(folder: Path) -> None:
    """The sentencepiece-converted tokenizer.json of real Llama/Mistral checkpoints (idefics2-8b's too).

    A Prepend("▁") + Replace(" ", "▁") normalizer and no pre-tokenizer, instead of the Metaspace
    pre-tokenizer transformers 5 writes. transformers 5 ignores the pipeline and rebuilds it, but a plain
    `tokenizers` load of this file prepends "▁" to every segment between added tokens ("<image>Hi").
    """
    data = json.loads((folder / "tokenizer.json").read_text())
    data["normalizer"] = {
        "type": "Sequence",
        "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        ],
    }
    data["pre_tokenizer"] = None
    data["model"]["unk_token"] = "<unk>"
    (folder / "tokenizer.json").write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    config = _read(folder, "tokenizer_config.json")
    config.update(add_bos_token=True, add_eos_token=False, legacy=False, tokenizer_class="LlamaTokenizer")
    _write(folder, "tokenizer_config.json", config)


def _flatten_qwen2_vl_config(folder: Path) -> None:
    """Qwen2-VL hub config.json: text fields at top level, rope_scaling {type: mrope}, vision nested."""
    data = _read(folder, "config.json")
    text = data.pop("text_config")
    rope = text.pop("rope_parameters")
    for key in ("model_type", "architectures", "dtype", "layer_types"):
        text.pop(key, None)
    flat = {**text, **data}
    flat["rope_theta"] = rope["rope_theta"]
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    flat["torch_dtype"] = flat.pop("dtype", "float32")
    flat["sliding_window"] = 32768  # the hub files carry it with use_sliding_window false
    flat["vision_token_id"] = flat["vision_start_token_id"] + 2  # <|vision_pad|>, unused, as on the hub
    vision = flat["vision_config"]
    vision["in_chans"] = vision.pop("in_channels")
    for key in ("model_type", "rope_parameters", "initializer_range"):
        vision.pop(key, None)
    _write(folder, "config.json", flat)


def _config_to_hub(folder: Path) -> None:
    """Pre-v5 spelling: `torch_dtype`, and a text config with `rope_theta` instead of `rope_parameters`."""
    data = _read(folder, "config.json")
    data["torch_dtype"] = data.pop("dtype", "float32")
    text = data["text_config"]
    text["torch_dtype"] = text.pop("dtype", None) or data["torch_dtype"]
    rope = text.pop("rope_parameters", None)
    if rope:
        text["rope_theta"] = rope["rope_theta"]
    text.pop("layer_types", None)
    _write(folder, "config.json", data)


# (regex on v5 names, replacement): the weight names of the family's real hub checkpoints.
HUB_WEIGHT_RENAMES: dict[str, list[tuple[str, str]]] = {
    # transformers 5 writes `vision_tower.embeddings...`; the hub files (4.45) have the SigLIP model prefix.
    "llava_onevision": [(r"^vision_tower\.(?!vision_model\.)", "vision_tower.vision_model.")],
}


def _rename_weights(folder: Path, renames: list[tuple[str, str]]) -> None:
    from safetensors.torch import load_file, save_file

    def rename(key: str) -> str:
        for pattern, repl in renames:
            key = re.sub(pattern, repl, key)
        return key

    index_path = folder / "model.safetensors.index.json"
    files = sorted(folder.glob("model*.safetensors"))
    for path in files:
        tensors = load_file(str(path))
        save_file({rename(k): v for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    if index_path.exists():
        index = json.loads(index_path.read_text())
        index["weight_map"] = {rename(k): v for k, v in index["weight_map"].items()}
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------------------------- media


def make_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Deterministic noise plus a few shapes (so resizing and crops change the pixels measurably)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, x1 = sorted(rng.integers(0, max(width, 2), size=2).tolist())
        y0, y1 = sorted(rng.integers(0, max(height, 2), size=2).tolist())
        color = tuple(int(c) for c in rng.integers(0, 256, size=3))
        draw.rectangle([x0, y0, x1, y1], fill=color)
        draw.ellipse([x0, y0, x1, y1], outline=(255 - color[0], 255 - color[1], 255 - color[2]))
    if mode == "RGB":
        return image
    if mode in ("RGBA", "LA"):
        alpha = Image.fromarray(rng.integers(0, 256, size=(height, width), dtype=np.uint8), "L")
        converted = image.convert(mode)
        converted.putalpha(alpha)
        return converted
    return image.convert(mode)


def make_video_frames(n: int, width: int, height: int, seed: int = 0) -> list[Image.Image]:
    """`n` RGB frames: a shared background with a square that moves, plus per-frame noise."""
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    frames = []
    for i in range(n):
        pixels = background.copy()
        side = max(2, min(width, height) // 3)
        x = (i * max(1, width // max(n, 1))) % max(1, width - side)
        y = (i * max(1, height // max(n, 1))) % max(1, height - side)
        pixels[y : y + side, x : x + side] = (255 - 20 * i % 256, 40 * i % 256, 128)
        noise = rng.integers(-8, 9, size=pixels.shape)
        frames.append(Image.fromarray(np.clip(pixels.astype(int) + noise, 0, 255).astype(np.uint8), "RGB"))
    return frames


def write_mp4(path: Path, n_frames: int, w: int, h: int, fps: int = 4, seed: int = 0) -> Path:
    """Encode `make_video_frames(n_frames, w, h, seed)` as an H.264 (or mpeg4) .mp4 with PyAV."""
    import av

    path = Path(path)
    with av.open(str(path), mode="w") as container:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for frame in make_video_frames(n_frames, w, h, seed):
            for packet in stream.encode(av.VideoFrame.from_image(frame)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# ----------------------------------------------------------------------------------------------- oracle


def hf_processor(folder: Path | str, **kwargs):
    """transformers' processor for the checkpoint, with the PIL image backend (`kwargs` go to both)."""
    from transformers import AutoImageProcessor, AutoProcessor

    processor = AutoProcessor.from_pretrained(str(folder), **kwargs)
    # The video processor has only the torch backend; the image processor is swapped for the PIL one,
    # which is the reference the other backend is checked against.
    processor.image_processor = AutoImageProcessor.from_pretrained(str(folder), backend="pil", **kwargs)
    return processor


def hf_load_video(path: Path | str, **kwargs):
    """(frames uint8 [T, H, W, 3], VideoMetadata) decoded by transformers with PyAV (no torchcodec).

    Pass both to the oracle: `processor(videos=[frames], videos_kwargs={"video_metadata": [metadata]})`.
    """
    from transformers.video_utils import load_video

    return load_video(str(path), backend="pyav", **kwargs)


def hf_model(folder: Path | str, **kwargs):
    """transformers' model for the checkpoint (float32, eval mode, eager-free SDPA attention)."""
    from transformers import AutoModelForImageTextToText

    kwargs.setdefault("dtype", torch.float32)
    return AutoModelForImageTextToText.from_pretrained(str(folder), **kwargs).eval()
