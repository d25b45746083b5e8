"""Logits processing and token selection, batched with per-row parameters.

Notable features:
- The same processors, in the same order and with the same arithmetic, as transformers 5.23's
  `generate()` (generation/logits_process.py): repetition penalty -> temperature -> top-k -> top-p
  (min_tokens_to_keep=1) -> softmax -> `torch.multinomial`. Greedy rows take the argmax of the scores
  after the repetition penalty, so greedy tokens and seeded samples equal transformers'.
- Every parameter is a tensor with one value per row, so the engine can batch requests that ask for
  different settings; a neutral value (temperature 1, top_k 0, top_p 1, penalty 1) leaves a row's
  scores bit-identical, which is what transformers gets by skipping the processor.
- The repetition penalty reads a preallocated `[B, V]` bool "seen" mask updated in place by one
  scatter per step, instead of re-gathering over the whole sequence.
- Sampling takes an optional `torch.Generator`; without one it draws from torch's global generator
  (what transformers does), so `torch.manual_seed(s)` reproduces transformers' samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ocula.errors import ConfigError


@dataclass
class SamplingTensors:
    """Per-row sampling parameters; every field has shape [B]."""

    do_sample: torch.Tensor  # bool: False = greedy (argmax) for that row
    temperature: torch.Tensor  # float32, > 0; 1.0 = unchanged
    top_k: torch.Tensor  # int64; 0 = off
    top_p: torch.Tensor  # float32 in (0, 1]; 1.0 = off
    repetition_penalty: torch.Tensor  # float32, > 0; 1.0 = off
    # Which processors any row uses, read once here so that the decode loop never waits on the device.
    flags: dict[str, bool] = field(init=False, repr=False)

    def __post_init__(self):
        self.flags = {
            "any_sample": bool(self.do_sample.any()),
            "all_sample": bool(self.do_sample.all()),
            "temperature": bool((self.temperature != 1.0).any()),
            "top_k": bool((self.top_k > 0).any()),
            "top_p": bool((self.top_p < 1.0).any()),
            "penalty": bool((self.repetition_penalty != 1.0).any()),
        }

    @classmethod
    def from_rows(cls, rows: list[dict], device: torch.device | str | None = None) -> SamplingTensors:
        """Build from one dict per row with keys do_sample, temperature, top_k, top_p, repetition_penalty."""
        for row in rows:
            check_sampling_values(**row)

        def column(key: str, default, dtype: torch.dtype) -> torch.Tensor:
            values = [default if row.get(key) is None else row[key] for row in rows]
            return torch.tensor(values, dtype=dtype, device=device)

        return cls(
            do_sample=column("do_sample", False, torch.bool),
            temperature=column("temperature", 1.0, torch.float32),
            top_k=column("top_k", 0, torch.int64),
            top_p=column("top_p", 1.0, torch.float32),
            repetition_penalty=column("repetition_penalty", 1.0, torch.float32),
        )

    @classmethod
    def uniform(cls, batch_size: int, device: torch.device | str | None = None, **params) -> SamplingTensors:
        """The same parameters for every row."""
        return cls.from_rows([params] * batch_size, device=device)

    @property
    def needs_seen_mask(self) -> bool:
        return self.flags["penalty"]


def check_sampling_values(
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
) -> None:
    """Raise ConfigError for values transformers rejects (only the ones that are used are checked)."""
    if repetition_penalty is not None and not repetition_penalty > 0:
        raise ConfigError(f"repetition_penalty must be a float > 0 (1.0 = off), got {repetition_penalty}")
    if not do_sample:
        return
    if temperature is not None and not temperature > 0:
        raise ConfigError(
            f"temperature must be > 0 when sampling, got {temperature}; for greedy decoding set do_sample=False"
        )
    if top_k is not None and top_k < 0:
        raise ConfigError(f"top_k must be an integer >= 0 (0 = off), got {top_k}")
    if top_p is not None and not 0.0 <= top_p <= 1.0:
        raise ConfigError(f"top_p must be in [0, 1] (1.0 = off), got {top_p}")


def new_seen_mask(
    input_ids: torch.Tensor, vocab_size: int, num_left_pad: torch.Tensor | None = None
) -> torch.Tensor:
    """[B, V] bool: which token ids a row already holds (left padding excluded, like transformers)."""
    ids = input_ids.clamp(max=vocab_size)  # ids beyond the lm_head vocab land in a dropped extra column
    if num_left_pad is not None:
        positions = torch.arange(ids.shape[1], device=ids.device)
        ids = ids.masked_fill(positions[None, :] < num_left_pad[:, None], vocab_size)
    seen = torch.zeros(ids.shape[0], vocab_size + 1, dtype=torch.bool, device=ids.device)
    seen.scatter_(1, ids, True)
    return seen[:, :vocab_size]


def mark_seen(seen: torch.Tensor, tokens: torch.Tensor) -> None:
    """Add this step's tokens [B] to the seen mask in place."""
    seen.scatter_(1, tokens.clamp(max=seen.shape[1] - 1)[:, None], True)


def apply_repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    # Negative scores are multiplied and positive ones divided, so a penalty > 1 always lowers them.
    penalty = penalty[:, None]
    penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalized, scores)


def apply_top_k(scores: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    vocab_size = scores.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab_size), vocab_size)  # [B]; 0 = keep all
    sorted_desc = torch.sort(scores, dim=-1, descending=True).values
    kth = sorted_desc.gather(1, (k - 1)[:, None])  # [B, 1] the k-th largest score
    return scores.masked_fill(scores < kth, float("-inf"))


def apply_top_p(scores: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_scores, sorted_index = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    # Drop the low tail whose mass is <= 1 - p; the most likely token always stays (min_tokens_to_keep=1).
    remove_sorted = cumulative <= (1 - top_p)[:, None]
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(1, sorted_index, remove_sorted)
    return scores.masked_fill(remove, float("-inf"))


def warp(scores: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
    """Temperature, top-k, top-p: each skipped when no row uses it (a neutral row is left unchanged)."""
    if params.flags["temperature"]:
        scores = scores / params.temperature[:, None]
    if params.flags["top_k"]:
        scores = apply_top_k(scores, params.top_k)
    if params.flags["top_p"]:
        scores = apply_top_p(scores, params.top_p)
    return scores


def _multinomial(probs: torch.Tensor, generator) -> torch.Tensor:
    """One draw per row [B]; `generator` is one generator for the batch (or None) or one per row."""
    if not isinstance(generator, (list, tuple)):
        return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
    rows = [torch.multinomial(p[None], 1, generator=g) for p, g in zip(probs, generator, strict=True)]
    return torch.cat(rows).squeeze(1)


def select_tokens(
    logits: torch.Tensor,
    params: SamplingTensors,
    seen: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens [B] and the processed scores [B, V] (what transformers reports as `scores`).

    logits: [B, V], the last position's logits; computed on in float32 like transformers.
    generator: one for the whole batch (generate()), or a list with one per row (an engine's requests,
    each with its own seed); None draws from torch's global generator.
    """
    scores = logits.float()
    if seen is not None and params.needs_seen_mask:
        scores = apply_repetition_penalty(scores, seen, params.repetition_penalty)
    if not params.flags["any_sample"]:
        return scores.argmax(dim=-1), scores
    warped = warp(scores, params)
    probs = warped.softmax(dim=-1)
    sampled = _multinomial(probs, generator)
    if params.flags["all_sample"]:
        return sampled, warped
    greedy = scores.argmax(dim=-1)
    tokens = torch.where(params.do_sample, sampled, greedy)
    return tokens, torch.where(params.do_sample[:, None], warped, scores)
