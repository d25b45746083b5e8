"""LLaVA-OneVision, Idefics2 and Ovis2 side by side with transformers: preprocessing and batch-1 decode.

    python benchmarks/bench_families.py                            # every family whose ocula code exists
    python benchmarks/bench_families.py --families ovis2 --text-layers 2

Notable features:
- each checkpoint has the real widths of the family's reference hub model (REFERENCE.md: LLaVA-OV-0.5B,
  Idefics2-8B, Ovis2-1B) with random weights and fewer layers (stated in the output; defaults 4 text
  layers, 2 vision layers, 1 text layer for Idefics2's 4096-wide Mistral), written once by transformers'
  `save_pretrained` with the hub's processor settings (LLaVA-OV anyres_max_9 over 384 px tiles, Idefics2
  980 px with splitting, Ovis2 448 px tiles);
- figures: processor call on one 640x480 and one 1920x1080 image (against transformers' PIL and
  torchvision backends), batch-1 decode tokens/s and each library's share of the memory-bandwidth bound;
- a family whose ocula modules do not import yet is skipped with a note; so is one that fails to load.
"""

from __future__ import annotations

import argparse
import gc
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from bench_qwen2_vl import _pixel_diff, decode_rates, generate, test_image
from common import (
    DEFAULT_CACHE,
    DTYPES,
    Table,
    build_checkpoint,
    decode_bound,
    decode_weight_bytes,
    machine_info,
    measure_pair,
    read_bandwidth,
    set_threads,
    write_json,
)

TEXT_PROMPT = (
    "User: The quick brown fox jumps over the lazy dog. Describe the picture in one sentence.\nAssistant:"
)


@dataclass
class Family:
    name: str
    reference: str  # the hub checkpoint whose widths are used
    text_layers: int  # real count
    vision_layers: int
    image_prompt: str

    def config(self, text_layers: int, vision_layers: int) -> dict[str, Any]:
        from tests.checkpoints import CONFIG_BUILDERS, _merge, _tokenizer

        base = CONFIG_BUILDERS[self.name](_tokenizer(self.name))
        return _merge(base, REAL_WIDTHS[self.name](text_layers, vision_layers))


def _llava_widths(text_layers: int, vision_layers: int) -> dict[str, Any]:
    return {
        "text_config": {"vocab_size": 152000, "hidden_size": 896, "intermediate_size": 4864,
                        "num_hidden_layers": text_layers, "num_attention_heads": 14, "num_key_value_heads": 2},
        "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": vision_layers,
                          "num_attention_heads": 16, "image_size": 384, "patch_size": 14},
        "image_grid_pinpoints": [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)],
    }  # fmt: skip


def _idefics2_widths(text_layers: int, vision_layers: int) -> dict[str, Any]:
    return {
        "text_config": {"vocab_size": 32003, "hidden_size": 4096, "intermediate_size": 14336,
                        "num_hidden_layers": text_layers, "num_attention_heads": 32, "num_key_value_heads": 8,
                        "head_dim": 128, "sliding_window": 4096},
        "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": vision_layers,
                          "num_attention_heads": 16, "image_size": 980, "patch_size": 14},
        "perceiver_config": {"hidden_size": 4096, "resampler_n_latents": 64, "resampler_depth": 3,
                             "resampler_n_heads": 16, "resampler_head_dim": 96, "num_key_value_heads": 4},
    }  # fmt: skip


def _ovis2_widths(text_layers: int, vision_layers: int) -> dict[str, Any]:
    return {
        "text_config": {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
                        "num_hidden_layers": text_layers, "num_attention_heads": 14, "num_key_value_heads": 2},
        "vision_config": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": vision_layers,
                          "num_attention_heads": 8, "image_size": 448, "patch_size": 14, "vocab_size": 65536,
                          "hidden_stride": 2},
        "vocab_size": 151936,
        "hidden_size": 896,
    }  # fmt: skip


REAL_WIDTHS = {"llava_onevision": _llava_widths, "idefics2": _idefics2_widths, "ovis2": _ovis2_widths}
FAMILIES = {
    "llava_onevision": Family("llava_onevision", "llava-onevision-qwen2-0.5b-ov-hf", 24, 26, "User: <image>\nDescribe."),
    "idefics2": Family("idefics2", "idefics2-8b", 32, 27, "User:<image>Describe.<end_of_utterance>\nAssistant:"),
    "ovis2": Family("ovis2", "Ovis2-1B-hf", 24, 24, "<|im_start|>user\n<image>\nDescribe.<|im_end|>\n"),
}  # fmt: skip


# ------------------------------------------------------------------------------------------- processors


def hf_processor(family: str, tokenizer, backend: str = "pil"):
    """transformers' processor of `family` with the hub checkpoint's image settings."""
    from tests.checkpoints import chat_template

    builders = {
        "llava_onevision": _llava_processor,
        "idefics2": _idefics2_processor,
        "ovis2": _ovis2_processor,
    }
    return builders[family](tokenizer, backend, chat_template(family))


def _image_class(module: str, name: str, backend: str):
    base = f"transformers.models.{module}.image_processing_"
    if backend == "pil":
        return getattr(importlib.import_module(f"{base}pil_{module}"), f"{name}Pil")
    return getattr(importlib.import_module(f"{base}{module}"), name)


def _llava_processor(tokenizer, backend: str, template: str):
    from transformers import LlavaOnevisionProcessor
    from transformers.models.llava_onevision.video_processing_llava_onevision import (
        LlavaOnevisionVideoProcessor,
    )

    image = _image_class("llava_onevision", "LlavaOnevisionImageProcessor", backend)()
    return LlavaOnevisionProcessor(
        image_processor=image, tokenizer=tokenizer, video_processor=LlavaOnevisionVideoProcessor(),
        num_image_tokens=729, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
        chat_template=template,
    )  # fmt: skip


def _idefics2_processor(tokenizer, backend: str, template: str):
    from transformers import Idefics2Processor

    image = _image_class("idefics2", "Idefics2ImageProcessor", backend)(do_image_splitting=True)
    return Idefics2Processor(
        image_processor=image, tokenizer=tokenizer, image_seq_len=64, chat_template=template
    )


def _ovis2_processor(tokenizer, backend: str, template: str):
    from transformers import Ovis2Processor

    image = _image_class("ovis2", "Ovis2ImageProcessor", backend)(crop_to_patches=True)
    return Ovis2Processor(
        image_processor=image, tokenizer=tokenizer, image_seq_length=256, chat_template=template
    )


# --------------------------------------------------------------------------------------------- sections


def ocula_available(family: str) -> str | None:
    """None when ocula's modules of `family` import, else why not."""
    try:
        for part in ("config", "processing", "modeling"):
            importlib.import_module(f"ocula.models.{family}.{part}")
    except Exception as error:  # noqa: BLE001 -- a family in progress may fail in any way
        return f"{type(error).__name__}: {error}"
    return None


def bench_family(family: Family, args, table: Table, bandwidth: float) -> None:
    import transformers

    import ocula

    folder = Path(args.cache) / f"{family.name}_t{args.text_layers}_v{args.vision_layers}"
    build_checkpoint(folder, family.name, family.config(args.text_layers, args.vision_layers),
                     lambda tok: hf_processor(family.name, tok))  # fmt: skip
    dtype = DTYPES[args.dtype]
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ours_proc = ocula.AutoProcessor.from_pretrained(folder)
    for backend in ("pil", "torchvision"):
        theirs_proc = hf_processor(family.name, tokenizer, backend)
        for width, height in ((640, 480), (1920, 1080)):
            image = test_image(width, height)
            ours_call = _text_image_call(ours_proc, family.image_prompt, image)
            theirs_call = _text_image_call(theirs_proc, family.image_prompt, image)
            ours, theirs = measure_pair(ours_call, theirs_call, args.repeat, 2)
            diff = _pixel_diff(ours_call(), theirs_call())
            table.time_row(f"{family.name}: preprocess {width}x{height} vs {backend}", ours, theirs,
                           f"max|dpixel| {diff:.2g}")  # fmt: skip
    model = ocula.AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype)
    hf_model = transformers.AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype).eval()
    bench_decode(family, model, hf_model, ours_proc, args, table, bandwidth)


def _text_image_call(processor, prompt: str, image):
    return lambda: processor(text=[prompt], images=[image], return_tensors="pt")


def bench_decode(family: Family, model, hf_model, processor, args, table: Table, bandwidth: float) -> None:
    inputs = dict(processor(text=[TEXT_PROMPT], return_tensors="pt"))
    same = torch.equal(generate(model, inputs, 8), generate(hf_model, inputs, 8))
    ours, theirs = decode_rates((model, hf_model), inputs, args.decode_tokens, args.repeat)
    bandwidth = max(bandwidth, read_bandwidth()["bound"])  # again after the runs: a busy moment reads low
    language_model, lm_head = _decoder_parts(model)
    bound = decode_bound(bandwidth, decode_weight_bytes(language_model, lm_head))
    table.rate_row(f"{family.name}: decode, batch 1", ours, theirs, "tok/s", f"same greedy: {same}")
    table.text_row(f"{family.name}: share of the bandwidth bound", f"{100 * ours / bound:.0f}%",
                   f"{100 * theirs / bound:.0f}%", f"bound {bound:.2f} tok/s")  # fmt: skip


def _decoder_parts(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The text decoder (the module holding `embed_tokens` and `layers`) and the lm_head of an ocula model."""
    modules = dict(model.named_modules())
    decoder = next(m for m in modules.values() if hasattr(m, "embed_tokens") and hasattr(m, "layers"))
    head = next(m for name, m in modules.items() if name.endswith("lm_head"))
    return decoder, head


# ------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated family names")
    parser.add_argument("--text-layers", type=int, default=None, help="default 4 (1 for idefics2)")
    parser.add_argument("--vision-layers", type=int, default=2)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--cache", default=str(DEFAULT_CACHE))
    parser.add_argument("--json", default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Table]:
    args = parse_args(argv)
    set_threads(args.threads)
    rates = read_bandwidth()
    tables = []
    for name in args.families.split(","):
        family = FAMILIES[name.strip()]
        layers = args.text_layers or (1 if family.name == "idefics2" else 4)
        run_args = argparse.Namespace(**{**vars(args), "text_layers": layers})
        table = Table(f"{family.reference} widths, {layers}/{family.text_layers} text layers, "
                      f"{args.vision_layers}/{family.vision_layers} vision layers, {args.dtype}, "
                      f"{args.threads} threads (ratio > 1: ocula faster)")  # fmt: skip
        missing = ocula_available(family.name)
        if missing:
            table.notes.append(f"skipped: ocula's {family.name} code does not import yet ({missing})")
        else:
            try:
                bench_family(family, run_args, table, rates["bound"])
            except Exception as error:  # noqa: BLE001 -- report and go on with the next family
                table.notes.append(f"stopped: {type(error).__name__}: {error}")
        table.print()
        tables.append(table)
        gc.collect()
    write_json(args.json, tables, machine_info(args.threads, args.dtype))
    return tables


if __name__ == "__main__":
    main()
