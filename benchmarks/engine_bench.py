"""Engine sections of the Qwen2-VL benchmark: many requests at once, and the vision-embedding cache.

Notable features:
- (d) 16 requests, each with its own image (sizes 224..560 px) and prompt length, submitted to
  `ocula.LLM.generate` at once, against transformers running them one by one and as one left-padded batch;
  all greedy with a fixed number of new tokens, and the engine's tokens are checked against transformers'
  one-by-one tokens;
- (c) the engine at batch 1 (its decode steps in CUDA graphs on a GPU, and without for comparison);
- on a GPU, one untimed pass over other images first, which captures the engine's CUDA graphs;
- (e) time to first token of a request whose image the engine has already seen (vision cache hit), against
  the first sight of that image and against transformers, which re-encodes it every time;
- importing this module (`ocula.engine.llm`) fails (and the caller skips (d)/(e) with a note) while the engine's offline `LLM`
  API (`ocula/engine/llm.py`) does not exist yet. The calls follow vLLM's offline API:
  `LLM(model, processor=...)`, `generate([{"prompt": ..., "multi_modal_data": {"image": ...}}], params)`.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from bench_qwen2_vl import IMAGE_PROMPT, TEXT_PROMPT, generate, on_device, test_image
from common import Table, measure, synchronize

from ocula.engine.llm import LLM
from ocula.engine.sampling_params import SamplingParams

SIZES = [(224 + 24 * (i % 15), 560 - 20 * (i % 13)) for i in range(16)]  # (width, height), all different
FILLER = " Please look at every detail of the picture."


def requests(count: int = 16, seed: int = 0) -> list[tuple[str, Any]]:
    """(prompt, image) pairs with different image sizes and prompt lengths (1 to 8 filler sentences).

    Each `seed` gives other images: a run at a second answer length must not find the first run's images
    in the engine's vision and media caches."""
    out = []
    for i in range(count):
        text = IMAGE_PROMPT.replace("Describe this image.", "Describe this image." + FILLER * (1 + i % 8))
        out.append((text + "<|im_start|>assistant\n", test_image(*SIZES[i], seed=seed + i)))
    return out


def engine_inputs(reqs: list[tuple[str, Any]]) -> list[dict[str, Any]]:
    return [{"prompt": text, "multi_modal_data": {"image": image}} for text, image in reqs]


def hf_one_by_one(pair, reqs, new_tokens: int) -> list[list[int]]:
    outs = []
    for text, image in reqs:
        inputs = dict(pair.hf_pil(text=[text], images=[image], return_tensors="pt"))
        ids = generate(pair.hf_model, inputs, new_tokens)
        outs.append(ids[0, inputs["input_ids"].shape[1] :].tolist())
    return outs


def hf_padded_batch(pair, reqs, new_tokens: int) -> None:
    texts, images = zip(*reqs)
    pair.hf_pil.tokenizer.padding_side = "left"
    inputs = dict(pair.hf_pil(text=list(texts), images=list(images), padding=True, return_tensors="pt"))
    generate(pair.hf_model, inputs, new_tokens)
    synchronize()


def engine_generate(llm, reqs, new_tokens: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    outputs = llm.generate(engine_inputs(reqs), params, use_tqdm=False)
    return [list(out.outputs[0].token_ids) for out in outputs]


def bench_many(llm, pair, table: Table, new_tokens: int) -> None:
    """(d) 16 requests at once (engine) vs one by one and one padded batch (transformers).

    The ratio depends on the answer length: prefill (vision tower + prompt) costs the same compute on both
    sides, while the engine turns 16 bandwidth-bound decode steps into one; so the section runs at several
    lengths (`--engine-tokens`), a short answer and a caption-length one."""
    reqs = requests(seed=1000 * new_tokens)
    expected = hf_one_by_one(pair, reqs[:2], new_tokens)
    t0 = time.perf_counter()
    ours_tokens = engine_generate(llm, reqs, new_tokens)
    ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    hf_one_by_one(pair, reqs, new_tokens)
    one_by_one = time.perf_counter() - t0
    t0 = time.perf_counter()
    hf_padded_batch(pair, reqs, new_tokens)
    batched = time.perf_counter() - t0
    same = ours_tokens[:2] == expected
    note = f"{len(reqs)} requests x {new_tokens} tokens; same tokens as transformers: {same}"
    table.text_row(f"(d) 16 requests x {new_tokens} tokens, engine vs one by one", f"{ours:.1f} s",
                   f"{one_by_one:.1f} s", note)
    table.rows[-1].ratio = one_by_one / ours
    table.text_row(f"(d) 16 requests x {new_tokens} tokens, engine vs padded batch", f"{ours:.1f} s",
                   f"{batched:.1f} s")
    table.rows[-1].ratio = batched / ours


def bench_vision_cache(llm, pair, table: Table, repeat: int) -> None:
    """(e) TTFT of a request whose image was seen before: engine (cache hit) vs transformers."""
    image = test_image(640, 480, seed=99)
    first = [(IMAGE_PROMPT + "<|im_start|>assistant\n", image)]
    again = [(IMAGE_PROMPT.replace("Describe", "Now describe") + "<|im_start|>assistant\n", image)]
    t0 = time.perf_counter()
    engine_generate(llm, first, 1)
    miss = time.perf_counter() - t0
    hit = measure(lambda: engine_generate(llm, again, 1), repeat=repeat, warmup=0)
    inputs = on_device(dict(pair.hf_pil(text=[again[0][0]], images=[image], return_tensors="pt")), pair.device)
    theirs = measure(lambda: generate(pair.hf_model, inputs, 1), repeat=repeat, warmup=0)
    table.time_row(
        "(e) TTFT, same image again (vision cache)",
        hit,
        theirs,
        f"engine first sight {miss:.2f} s -> hit {hit.median:.2f} s",
    )


def engine_decode_rate(llm, new_tokens: int, repeat: int) -> float:
    """Batch-1 decode tokens/s of the engine on the text prompt of (c): the median over `repeat` requests of
    each request's own rate (tokens 2..N over their wall time, engine overheads included)."""
    params = SamplingParams(max_tokens=new_tokens + 1, min_tokens=new_tokens + 1, temperature=0.0,
                            ignore_eos=True)
    llm.generate([TEXT_PROMPT], params, use_tqdm=False)  # warm-up (and, on a GPU, graph capture)
    rates = [llm.generate([TEXT_PROMPT], params, use_tqdm=False)[0].metrics.tokens_per_s for _ in range(repeat)]
    return statistics.median(rates)


def bench_engine_decode(llm, pair, table: Table, args) -> None:
    """(c) the engine at batch 1 against transformers' rate from (c); on a GPU also without CUDA graphs."""
    ours = engine_decode_rate(llm, args.decode_tokens, args.repeat)
    theirs = getattr(pair, "hf_decode_rate", None)
    note = f"{args.decode_tokens} tokens, scheduler / sampler / detokenizer included"
    if pair.device.startswith("cuda"):
        import ocula

        eager = LLM(pair.model, processor=ocula.AutoProcessor.from_pretrained(pair.folder), max_num_seqs=1,
                    max_model_len=4096, kv_cache_tokens=4096, enforce_eager=True)
        note += f"; without CUDA graphs (enforce_eager) {engine_decode_rate(eager, args.decode_tokens, args.repeat):.1f} tok/s"
        del eager
    if theirs is None:
        table.text_row("(c) engine decode, batch 1", f"{ours:.2f} tok/s", "", note)
    else:
        table.rate_row("(c) engine decode, batch 1", ours, theirs, "tok/s", note)


def bench_engine(pair, table: Table, args) -> None:
    """The engine shares the benchmark's ocula model (same weights in memory) with a processor of its own."""
    import ocula

    processor = ocula.AutoProcessor.from_pretrained(pair.folder)
    llm = LLM(pair.model, processor=processor, max_num_seqs=16, max_model_len=4096, kv_cache_tokens=32768)
    if "c" in args.sections:
        bench_engine_decode(llm, pair, table, args)
    if "d" in args.sections:
        if pair.device.startswith("cuda"):
            # CUDA graphs are captured the first time a (batch, key length) shape occurs; vLLM captures
            # them at start-up. One untimed pass over other images does it here, out of the figures.
            engine_generate(llm, requests(seed=7), max(args.engine_tokens))
        for new_tokens in args.engine_tokens:
            bench_many(llm, pair, table, new_tokens)
    if "e" in args.sections:
        bench_vision_cache(llm, pair, table, repeat=3)
