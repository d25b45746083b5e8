"""Sampling for one engine step: every sampled sequence's row of logits in one batched call.

Notable features:
- token selection is the library's `ocula.layers.sampler.select_tokens`, so the engine applies the same
  processors in the same order and arithmetic as transformers' `generate()` (repetition penalty ->
  temperature -> top-k -> top-p -> softmax -> multinomial): greedy tokens, and seeded samples of a
  request with `seed=s`, equal `model.generate(..., seed=s)`;
- per-row parameters (each request its own temperature, top-k, top-p, penalty) and per-row generators
  (sequence i of a seeded request draws from seed + i; unseeded rows from torch's global generator);
- `banned` ids (EOS and stop ids before `min_tokens`) get no probability, as vLLM;
- log-probabilities are those of the raw model distribution (before any processing, as vLLM).
"""

from __future__ import annotations

import torch

from ocula.engine.request import Sequence
from ocula.layers.sampler import SamplingTensors, select_tokens


def sample_tokens(
    logits: torch.Tensor, seqs: list[Sequence], banned: list[list[int]]
) -> list[tuple[int, dict[int, float] | None]]:
    """Next token (and logprobs entry when asked) of each sequence from its logits row [N, V]."""
    generators = [s.generator for s in seqs]
    seeded = any(g is not None for g in generators)
    if seeded and logits.device.type != "cpu":
        logits = logits.cpu()  # per-request generators are CPU generators (seeded draws equal on any device)
    logits = logits.float()
    want_logprobs = [s.request.params.logprobs is not None for s in seqs]
    raw = torch.log_softmax(logits, -1) if any(want_logprobs) else None
    scores = _ban(logits, banned)
    params = SamplingTensors.from_rows([_row(s) for s in seqs], device=logits.device)
    seen = _seen(seqs, logits.shape[1], logits.device) if params.needs_seen_mask else None
    tokens, _ = select_tokens(scores, params, seen, generators if seeded else None)
    out = []
    for i, (seq, token) in enumerate(zip(seqs, tokens.tolist())):
        entry = _logprobs_entry(raw[i], token, seq.request.params.logprobs) if want_logprobs[i] else None
        out.append((token, entry))
    return out


def _row(seq: Sequence) -> dict:
    params = seq.request.params
    return {
        "do_sample": not params.greedy,
        "temperature": params.temperature if not params.greedy else 1.0,
        "top_k": params.top_k,
        "top_p": params.top_p,
        "repetition_penalty": params.repetition_penalty,
    }


def _ban(logits: torch.Tensor, banned: list[list[int]]) -> torch.Tensor:
    if not any(banned):
        return logits
    logits = logits.clone()
    for row, ids in enumerate(banned):
        if ids:
            logits[row, torch.tensor(ids, dtype=torch.long, device=logits.device)] = float("-inf")
    return logits


def _seen(seqs: list[Sequence], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[N, V] bool: the ids each sequence holds (prompt + output), for the repetition penalty."""
    seen = torch.zeros(len(seqs), vocab_size + 1, dtype=torch.bool, device=device)
    for row, seq in enumerate(seqs):
        ids = torch.tensor(seq.token_ids, dtype=torch.long, device=device).clamp(max=vocab_size)
        seen[row, ids] = True  # ids beyond the lm_head vocab land in the dropped extra column
    return seen[:, :vocab_size]


def _logprobs_entry(logprobs: torch.Tensor, token: int, k: int) -> dict[int, float]:
    entry = {token: float(logprobs[token])}
    if k > 0:
        values, ids = torch.topk(logprobs, k)
        entry.update({int(i): float(v) for i, v in zip(ids, values)})
    return entry
