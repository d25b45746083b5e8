"""Where one engine request's time goes: cProfile of a request whose image the engine has seen before.

    python benchmarks/profile_request.py FOLDER [--device cuda] [--dtype bf16]

Runs the (e) request of bench_qwen2_vl.py (the same 640x480 image again with another question) a few times
to warm up, then once under cProfile, and prints the top functions by cumulative and by own time. On a GPU
the time a function waits for the device shows in the call that synchronises (`.tolist()`, `.item()`).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

from bench_qwen2_vl import IMAGE_PROMPT, test_image
from common import DTYPES, synchronize

from ocula import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    llm = LLM(args.folder, device=args.device, dtype=DTYPES[args.dtype], max_num_seqs=16, max_model_len=4096,
              kv_cache_tokens=32768)
    image = test_image(640, 480, seed=99)
    params = SamplingParams(max_tokens=1, temperature=0.0)

    def request(text: str) -> None:
        llm.generate([{"prompt": text + "<|im_start|>assistant\n", "multi_modal_data": {"image": image}}],
                     params, use_tqdm=False)
        synchronize()

    request(IMAGE_PROMPT)
    for i in range(3):
        t0 = time.perf_counter()
        request(IMAGE_PROMPT.replace("Describe", f"Now ({i}) describe"))
        print(f"request with a seen image: {1e3 * (time.perf_counter() - t0):.1f} ms")
    profile = cProfile.Profile()
    profile.enable()
    request(IMAGE_PROMPT.replace("Describe", "Then describe"))
    profile.disable()
    stats = pstats.Stats(profile)
    stats.sort_stats("cumulative").print_stats(args.top)
    stats.sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
