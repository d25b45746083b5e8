"""Shared pieces of the side-by-side benchmarks: timing, the bandwidth bound, checkpoints and the table.

Notable features:
- `measure` times a callable after warm-up runs and reports the median (the machine is shared and noisy);
  `measure_pair` alternates ocula and transformers run by run, so load changes hit both sides alike;
- `read_bandwidth` measures this machine's memory read bandwidth with a large torch reduction, at the
  thread count the benchmark runs with; `decode_bound` turns it into the tokens/s a batch-1 decode step
  could reach if it did nothing but read the weights once (bandwidth / weight bytes read per token);
- `build_checkpoint` writes a random-weight checkpoint with transformers' `save_pretrained` (real widths,
  optionally fewer layers) plus a small trained tokenizer carrying the family's real special tokens and
  its real chat template (reused from tests/checkpoints.py), once per cache folder;
- `Table` collects rows (what, ocula, transformers, ratio) and prints them aligned, and as JSON on request.

These scripts use transformers as the reference; the `ocula` package itself never imports it.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `tests.checkpoints` (tokenizers, weight redraw) and `ocula` from the checkout
    sys.path.insert(0, str(ROOT))

DEFAULT_CACHE = Path(os.environ.get("OCULA_BENCH_CACHE", Path.home() / ".cache" / "ocula-bench"))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------- timing


@dataclass
class Timing:
    """Seconds per call: the median and the spread of `repeat` runs."""

    median: float
    low: float
    high: float
    runs: int

    def __str__(self) -> str:
        return f"{format_seconds(self.median)} (min {format_seconds(self.low)}, n={self.runs})"


def synchronize() -> None:
    """Wait for queued GPU work (a no-op on CPU runs), so a wall-clock time covers what was asked."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any]) -> float:
    synchronize()
    t0 = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - t0


def measure(fn: Callable[[], Any], repeat: int = 5, warmup: int = 1, budget_s: float | None = None) -> Timing:
    """Median wall time of `fn()` over `repeat` runs after `warmup` runs (stops early past `budget_s`)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    for _ in range(repeat):
        times.append(_timed(fn))
        if budget_s is not None and time.perf_counter() - start > budget_s:
            break
    return _timing(times)


def measure_pair(
    ours: Callable[[], Any], theirs: Callable[[], Any], repeat: int = 5, warmup: int = 1
) -> tuple[Timing, Timing]:
    """Median times of two callables run alternately (ABAB...), so a change in the machine's load
    (other processes come and go) hits both sides alike instead of whichever happened to run then."""
    for _ in range(warmup):
        ours(), theirs()
    a: list[float] = []
    b: list[float] = []
    for _ in range(repeat):
        for fn, times in ((ours, a), (theirs, b)):
            times.append(_timed(fn))
    return _timing(a), _timing(b)


def _timing(times: list[float]) -> Timing:
    return Timing(statistics.median(times), min(times), max(times), len(times))


def format_seconds(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


# ---------------------------------------------------------------------------------- memory bandwidth


def read_bandwidth(gib: float = 1.0, repeat: int = 9, device: str = "cpu") -> dict[str, float]:
    """Bytes per second `device` reads, by two streaming kernels over `gib` GiB of fp32 (best of `repeat`).

    "sum" reduces a large tensor (every byte read once, almost no arithmetic); "matvec" multiplies a large
    matrix by a vector, the kernel a batch-1 decode step is made of. "bound" is the larger of the two: the
    rate at which this machine's torch can stream weights, which is what the decode bound is divided by.
    """
    n = int(gib * 2**30) // 4
    x = torch.ones(n, dtype=torch.float32, device=device)
    matrix, vector = x.view(-1, 4096), torch.ones(4096, device=device)
    rates = {}
    for name, fn in (("sum", lambda: x.sum()), ("matvec", lambda: torch.mv(matrix, vector))):
        fn()  # fault the pages in
        best = min(measure(fn, repeat=1, warmup=0).median for _ in range(repeat))
        rates[name] = n * 4 / best
    rates["bound"] = max(rates["sum"], rates["matvec"])
    return rates


def decode_weight_bytes(language_model: torch.nn.Module, lm_head: torch.nn.Module) -> int:
    """Bytes one decode step reads: every decoder weight once, plus the lm_head (tied or not).

    The embedding lookup reads one row per token (negligible), so the input embedding table is counted
    only through the lm_head when the two are tied.
    """
    embed = language_model.embed_tokens.weight
    params = [p for p in language_model.parameters() if p is not embed] + list(lm_head.parameters())
    unique = {id(p): p for p in params}.values()
    return sum(p.numel() * p.element_size() for p in unique)


def decode_bound(bandwidth: float, weight_bytes: int) -> float:
    """Tokens per second if each step only read the weights once at `bandwidth`."""
    return bandwidth / weight_bytes


# ---------------------------------------------------------------------------------------------- table


@dataclass
class Row:
    what: str
    ocula: str
    transformers: str
    ratio: float | None  # > 1 means ocula is faster
    note: str = ""


@dataclass
class Table:
    title: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def time_row(self, what: str, ours: Timing, theirs: Timing, note: str = "") -> None:
        """A row of seconds per call: ratio = transformers time / ocula time (the speed-up)."""
        self.rows.append(
            Row(
                what,
                format_seconds(ours.median),
                format_seconds(theirs.median),
                theirs.median / ours.median,
                note,
            )
        )

    def rate_row(self, what: str, ours: float, theirs: float, unit: str, note: str = "") -> None:
        """A row of rates (higher is better): ratio = ocula rate / transformers rate."""
        self.rows.append(Row(what, f"{ours:.2f} {unit}", f"{theirs:.2f} {unit}", ours / theirs, note))

    def text_row(self, what: str, ours: str, theirs: str, note: str = "") -> None:
        self.rows.append(Row(what, ours, theirs, None, note))

    def print(self) -> None:
        header = ("", "ocula", "transformers", "ratio", "")
        lines = [header] + [(r.what, r.ocula, r.transformers, _ratio(r.ratio), r.note) for r in self.rows]
        widths = [max(len(line[i]) for line in lines) for i in range(4)]
        print(f"\n== {self.title}")
        for line in lines:
            cells = [line[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(line[1:4], widths[1:])]
            print("  ".join(cells) + (f"  {line[4]}" if line[4] else ""))
        for note in self.notes:
            print(f"  note: {note}")

    def to_json(self) -> dict[str, Any]:
        return {"title": self.title, "rows": [asdict(r) for r in self.rows], "notes": self.notes}


def _ratio(ratio: float | None) -> str:
    return "" if ratio is None else f"{ratio:.2f}x"


def write_json(path: str | None, tables: list[Table], meta: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps({"meta": meta, "tables": [t.to_json() for t in tables]}, indent=2))


def machine_info(threads: int, dtype: str, device: str = "cpu") -> dict[str, Any]:
    import platform

    import transformers

    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else None
    return {
        "device": device,
        "gpu": gpu,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": threads,
        "dtype": dtype,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "capability": torch.backends.cpu.get_cpu_capability(),
    }


# ------------------------------------------------------------------------------------------ checkpoints


def build_checkpoint(folder: Path, family: str, config: dict[str, Any], processor, seed: int = 0,
                     dtype: torch.dtype | None = None) -> Path:
    """Write a random-weight checkpoint of `family` with transformers (skipped when already there).

    `config` is the full config dict (its `model_type` included); `processor(tokenizer)` returns the
    transformers processor to save next to the weights. Weights are redrawn like the test checkpoints
    (tests/checkpoints.py `redraw_`), so activations stay O(1) at any width, and saved in `dtype` (default
    float32; a 2B model in bfloat16 is half the bytes to write and read).
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig

    from tests.checkpoints import _generation_config, _tokenizer, redraw_

    if (folder / "model.safetensors").exists() or (folder / "model.safetensors.index.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(family)
    data = dict(config)
    hf_config = AutoConfig.for_model(data.pop("model_type"), **data)
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(hf_config)
    model = model.to_empty(device="cpu").eval()
    redraw_(model, seed)
    if getattr(hf_config, "tie_word_embeddings", False):
        model.tie_weights()
    if dtype is not None:
        model = model.to(dtype)
    model.generation_config = _generation_config(GenerationConfig, hf_config, tok)
    model.save_pretrained(str(folder))
    processor(tok).save_pretrained(str(folder))
    return folder


def tokenizer_ids(family: str, *tokens: str) -> list[int]:
    """Ids of `tokens` in the small trained tokenizer of `family` (real special tokens, small vocab)."""
    from tests.checkpoints import _tokenizer

    tok = _tokenizer(family)
    return [tok.convert_tokens_to_ids(t) for t in tokens]


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
