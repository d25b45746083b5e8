"""Qwen2-VL side by side: ocula vs transformers in one process, same weights, dtype and threads.

    python benchmarks/bench_qwen2_vl.py                       # 4 text layers, vision depth 4, fp32
    python benchmarks/bench_qwen2_vl.py --text-layers 28 --vision-depth 32 --dtype bf16
    python benchmarks/bench_qwen2_vl.py --device cuda --text-layers 28 --vision-depth 32 --dtype bf16

Notable features:
- the checkpoint has Qwen2-VL-2B-Instruct's real widths (vision embed 1280 / 16 heads, text hidden 1536,
  12 heads / 2 kv heads, intermediate 8960, vocab 151936, tied embeddings, M-RoPE [16, 24, 24]) with
  random weights; only the layer counts are cut (stated in the output) so a run takes minutes on 2 cores.
  It is written once by transformers' `save_pretrained` into the cache folder and read by both libraries;
- the processor uses the hub checkpoint's pixel limits (min 3136, max 12845056), so a 640x480 image is
  391 tokens and a 1920x1080 one 2691, as with the real model;
- sections: (a) processor call on one image at 640x480 and 1920x1080 against transformers' torchvision
  and PIL backends; (b) time to first token with one image; (c) batch-1 decode tokens/s, and both
  libraries as a share of the memory-bandwidth bound; (d) [engine] 16 requests with different images and
  prompt lengths at once vs transformers one by one and as one padded batch; (e) [engine] the same image
  again (vision-embedding cache). (d) and (e) are skipped with a note while `ocula.LLM` is not importable;
- every figure is a median over repeats (the machine may be shared); each section also checks that both
  libraries agree (pixel values, first tokens) so a fast wrong answer cannot pass as a speed-up;
- `--device cuda`: both models on the GPU (transformers with its default SDPA attention), every timing
  waits for the GPU, the bound uses the GPU's read bandwidth, and (c) adds the engine's batch-1 decode
  with its decode steps in CUDA graphs and without (`enforce_eager`). Processors run on the CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
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
    synchronize,
    tokenizer_ids,
    write_json,
)

FAMILY = "qwen2_vl"
HUB_PIXELS = {"shortest_edge": 3136, "longest_edge": 12845056}  # Qwen2-VL-2B-Instruct's preprocessor_config
IMAGE_PROMPT = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe this image.<|im_end|>\n"
TEXT_PROMPT = (
    "<|im_start|>user\nThe quick brown fox jumps over the lazy dog. Describe the picture in one sentence."
    "<|im_end|>\n<|im_start|>assistant\n"
)


# ------------------------------------------------------------------------------------------ checkpoint


def model_config(text_layers: int, vision_depth: int) -> dict[str, Any]:
    """Qwen2-VL-2B-Instruct's config with `text_layers` decoder layers and `vision_depth` ViT blocks."""
    image, video, start, end, eos, bos = tokenizer_ids(
        FAMILY,
        "<|image_pad|>",
        "<|video_pad|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|im_end|>",
        "<|endoftext|>",
    )
    text = {
        "vocab_size": 151936,
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": text_layers,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "tie_word_embeddings": True,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "use_sliding_window": False,
        "max_window_layers": text_layers,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
    }
    vision = {
        "depth": vision_depth,
        "embed_dim": 1280,
        "hidden_size": 1536,
        "num_heads": 16,
        "mlp_ratio": 4,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "in_channels": 3,
        "hidden_act": "quick_gelu",
    }
    return {
        "model_type": FAMILY, "text_config": text, "vision_config": vision, "image_token_id": image,
        "video_token_id": video, "vision_start_token_id": start, "vision_end_token_id": end,
        "tie_word_embeddings": True,
    }  # fmt: skip


def hf_processor(tokenizer, backend: str = "pil"):
    """transformers' Qwen2-VL processor with the hub pixel limits and the chosen image backend."""
    from transformers import Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    from tests.checkpoints import chat_template

    image_cls = Qwen2VLImageProcessorPil if backend == "pil" else Qwen2VLImageProcessor
    return Qwen2VLProcessor(
        image_processor=image_cls(size=dict(HUB_PIXELS)),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=chat_template(FAMILY),
    )


def checkpoint(args) -> Path:
    suffix = "" if args.dtype == "fp32" else f"_{args.dtype}"
    folder = Path(args.cache) / f"qwen2_vl_2b_t{args.text_layers}_v{args.vision_depth}{suffix}"
    t0 = time.perf_counter()
    existed = (folder / "config.json").exists()
    build_checkpoint(folder, FAMILY, model_config(args.text_layers, args.vision_depth), hf_processor,
                     dtype=DTYPES[args.dtype])
    if not existed:
        print(f"built {folder} in {time.perf_counter() - t0:.0f} s")
    return folder


def test_image(width: int, height: int, seed: int = 0) -> PIL.Image.Image:
    """A deterministic photo-like image: smooth gradients plus noise (not a flat colour)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200
    noise = rng.integers(0, 56, size=(height, width, 3))
    return PIL.Image.fromarray((base + noise).astype(np.uint8))


# ------------------------------------------------------------------------------------------- loading


class Pair:
    """Both libraries' models and processors on the same folder, dtype and thread count."""

    def __init__(self, folder: Path, dtype: torch.dtype, device: str = "cpu"):
        import transformers

        import ocula

        self.folder, self.device = folder, device
        self.hf_model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(
            folder, dtype=dtype
        ).to(device).eval()
        self.model = ocula.AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype, device=device)
        self.processor = ocula.AutoProcessor.from_pretrained(folder)
        self.processor_torchvision = ocula.AutoProcessor.from_pretrained(folder, backend="torchvision")
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        self.hf_pil = hf_processor(tokenizer, "pil")
        self.hf_torchvision = hf_processor(tokenizer, "torchvision")


def generate(model, inputs: dict[str, Any], new_tokens: int) -> torch.Tensor:
    inputs = on_device(inputs, model.device)
    with torch.inference_mode():
        return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)


def on_device(inputs: dict[str, Any], device) -> dict[str, Any]:
    """Processor outputs moved to the model's device (a no-op on CPU)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


# ------------------------------------------------------------------------------------------ sections


def bench_preprocessing(pair: Pair, table: Table, repeat: int) -> None:
    """(a) One processor call (text + one image) -> model inputs, at two image sizes.

    Three pairings: each library's default (ocula: Pillow pixels; transformers 5: torchvision when
    installed), then like for like (identical pixels) for each of transformers' two backends.
    """
    pairings = (
        ("default vs default", pair.processor, pair.hf_torchvision),
        ("pil vs pil", pair.processor, pair.hf_pil),
        ("torchvision vs torchvision", pair.processor_torchvision, pair.hf_torchvision),
    )
    for width, height in ((640, 480), (1920, 1080)):
        image = test_image(width, height)
        for name, ours_proc, theirs_proc in pairings:
            ours_call, theirs_call = _processor_call(ours_proc, image), _processor_call(theirs_proc, image)
            ours, theirs = measure_pair(ours_call, theirs_call, repeat=repeat, warmup=2)
            diff = _pixel_diff(ours_call(), theirs_call())
            table.time_row(
                f"(a) preprocess {width}x{height}, {name}", ours, theirs, f"max|dpixel| {diff:.2g}"
            )


def _processor_call(processor, image: PIL.Image.Image):
    return lambda: processor(text=[IMAGE_PROMPT], images=[image], return_tensors="pt")


def _pixel_diff(ours, theirs) -> float:
    a, b = ours["pixel_values"], theirs["pixel_values"]
    if a.shape != b.shape or not torch.equal(ours["input_ids"], theirs["input_ids"]):
        return float("inf")
    return float((a - b).abs().max())


def bench_first_token(pair: Pair, table: Table, repeat: int) -> None:
    """(b) Time to first token: one 640x480 image + a short prompt, processor outputs given."""
    inputs = dict(pair.processor(text=[IMAGE_PROMPT], images=[test_image(640, 480)], return_tensors="pt"))
    hf_inputs = dict(pair.hf_pil(text=[IMAGE_PROMPT], images=[test_image(640, 480)], return_tensors="pt"))
    inputs, hf_inputs = on_device(inputs, pair.device), on_device(hf_inputs, pair.device)
    same = torch.equal(generate(pair.model, inputs, 1), generate(pair.hf_model, hf_inputs, 1))
    ours, theirs = measure_pair(
        lambda: generate(pair.model, inputs, 1), lambda: generate(pair.hf_model, hf_inputs, 1), repeat, 0
    )
    tokens = inputs["input_ids"].shape[1]
    table.time_row(
        "(b) first token, 1 image 640x480", ours, theirs, f"{tokens} prompt tokens; same token: {same}"
    )


class StepClock:
    """A streamer that timestamps every token generate() hands it (the prompt first, then one per step)."""

    def __init__(self):
        self.stamps: list[float] = []

    def put(self, value) -> None:
        synchronize()  # both libraries hand over CPU copies (already synchronised); this keeps it so
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass

    def step_times(self) -> list[float]:
        """Seconds per decode step: the gaps after the first generated token (the prefill is excluded)."""
        return [b - a for a, b in zip(self.stamps[1:], self.stamps[2:])]


def decode_rates(models: tuple, inputs: dict[str, Any], new_tokens: int, repeat: int) -> tuple[float, float]:
    """Batch-1 decode tokens/s of two models: 1 / the median time of one decode step.

    Every step of every run is timed (a streamer stamps each token), runs alternate between the models,
    and the median over all steps shrugs off the moments another process takes the cores.
    """
    steps: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeat):
        for model, times in zip(models, steps):
            clock = StepClock()
            with torch.inference_mode():
                model.generate(**on_device(inputs, model.device), max_new_tokens=new_tokens + 1,
                               min_new_tokens=new_tokens + 1, do_sample=False, streamer=clock)  # fmt: skip
            times.extend(clock.step_times())
    return tuple(1 / statistics.median(times) for times in steps)


def bench_decode(pair: Pair, table: Table, repeat: int, new_tokens: int, bandwidth: float) -> None:
    """(c) Batch-1 decode rate of a short text prompt, and each library's share of the bandwidth bound."""
    inputs = dict(pair.processor(text=[TEXT_PROMPT], return_tensors="pt"))
    same = torch.equal(generate(pair.model, inputs, 8), generate(pair.hf_model, inputs, 8))
    ours, theirs = decode_rates((pair.model, pair.hf_model), inputs, new_tokens, repeat)
    pair.hf_decode_rate = theirs  # the engine's batch-1 row compares with it
    bandwidth = max(bandwidth, read_bandwidth(device=pair.device)["bound"])  # a busy moment reads low
    lm = pair.model.model.language_model
    weight_bytes = decode_weight_bytes(lm, pair.model.lm_head)
    bound = decode_bound(bandwidth, weight_bytes)
    table.rate_row("(c) decode, batch 1", ours, theirs, "tok/s", f"{new_tokens} tokens; same greedy: {same}")
    table.text_row(
        "(c) share of the bandwidth bound",
        f"{100 * ours / bound:.0f}%",
        f"{100 * theirs / bound:.0f}%",
        f"bound {bound:.2f} tok/s = {bandwidth / 1e9:.1f} GB/s / {weight_bytes / 1e9:.2f} GB per token",
    )


def engine_sections(pair: Pair, table: Table, args) -> None:
    """The engine's rows of (c), and (d) and (e): the engine against transformers."""
    try:
        from engine_bench import bench_engine
    except ImportError as error:
        table.notes.append(f"(d)/(e) skipped: the engine's offline API is not importable ({error})")
        return
    try:
        bench_engine(pair, table, args)
    except Exception as error:  # noqa: BLE001 -- a young engine: report it, keep the figures so far
        table.notes.append(f"(d)/(e) failed: {type(error).__name__}: {error}")


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text-layers", type=int, default=4, help="decoder layers (the real model has 28)")
    parser.add_argument("--vision-depth", type=int, default=4, help="ViT blocks (the real model has 32)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeat", type=int, default=5, help="runs per figure (the median is reported)")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--engine-tokens", type=lambda v: [int(x) for x in v.split(",")], default=[16, 64],
                        help="(d): new tokens per request, comma-separated lengths to run")
    parser.add_argument("--sections", default="abcde", help="which sections to run, e.g. 'ac'")
    parser.add_argument("--cache", default=str(DEFAULT_CACHE), help="folder for the generated checkpoint")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Table]:
    args = parse_args(argv)
    set_threads(args.threads)
    folder = checkpoint(args)
    pair = Pair(folder, DTYPES[args.dtype], args.device)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{args.threads} threads"
    title = (
        f"Qwen2-VL-2B widths, {args.text_layers}/28 text layers, {args.vision_depth}/32 vision blocks, "
        f"{args.dtype}, {where} (ratio > 1: ocula faster)"
    )
    table = Table(title)
    rates = read_bandwidth(device=args.device)
    bandwidth = rates["bound"]
    table.notes.append(
        f"memory read bandwidth ({args.device}), 1 GiB fp32: sum {rates['sum'] / 1e9:.1f} GB/s, "
        f"matvec {rates['matvec'] / 1e9:.1f} GB/s (the bound uses the larger)"
    )
    sections = {
        "a": lambda: bench_preprocessing(pair, table, max(args.repeat, 9)),
        "b": lambda: bench_first_token(pair, table, args.repeat),
        "c": lambda: bench_decode(pair, table, args.repeat, args.decode_tokens, bandwidth),
    }
    for key, run in sections.items():
        if key in args.sections:
            try:
                run()
            except Exception as error:  # noqa: BLE001 -- report it and keep the other sections' figures
                traceback.print_exc()
                table.notes.append(f"({key}) failed: {type(error).__name__}: {error}")
    if set("cde") & set(args.sections):
        engine_sections(pair, table, args)
    table.print()
    write_json(args.json, [table], machine_info(args.threads, args.dtype, args.device))
    return [table]


if __name__ == "__main__":
    main()
