"""Per-sequence sampling from one row of logits: repetition penalty, temperature, top-k, top-p, seeded
generators, and log-probabilities of the raw model distribution (before any processing, as vLLM).
"""

from __future__ import annotations

import torch

from ocula.engine.request import Sequence


def sample_token(
    logits: torch.Tensor, seq: Sequence, banned: list[int] = ()
) -> tuple[int, dict[int, float] | None]:
    """Pick the next token of `seq` from logits [V]; also return its logprobs entry when asked.

    `banned` ids get no probability (EOS and stop ids before `min_tokens`, as vLLM).
    """
    params = seq.request.params
    logits = logits.float()
    raw_logprobs = torch.log_softmax(logits, -1)
    logits = _apply_repetition_penalty(logits, seq.token_ids, params.repetition_penalty)
    if banned:
        logits = logits.index_fill(0, torch.tensor(list(banned), dtype=torch.long), float("-inf"))
    if params.greedy:
        token = int(logits.argmax())
    else:
        probs = _filtered_probs(logits / params.temperature, params.top_k, params.top_p)
        token = int(torch.multinomial(probs, 1, generator=seq.generator))
    return token, _logprobs_entry(raw_logprobs, token, params.logprobs)


def _apply_repetition_penalty(logits: torch.Tensor, token_ids: list[int], penalty: float) -> torch.Tensor:
    """CTRL-style penalty, as transformers: scores < 0 are multiplied by it, others divided."""
    if penalty == 1.0 or not token_ids:
        return logits
    ids = torch.tensor(sorted(set(token_ids)), dtype=torch.long)
    ids = ids[ids < logits.shape[0]]
    picked = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(picked < 0, picked * penalty, picked / penalty)
    return logits


def _filtered_probs(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if 0 < top_k < logits.shape[0]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # mass before this token already exceeds top_p
        logits = logits.clone()
        logits[order[drop]] = float("-inf")
    return logits.softmax(-1)


def _logprobs_entry(logprobs: torch.Tensor, token: int, k: int | None) -> dict[int, float] | None:
    if k is None:
        return None
    entry = {token: float(logprobs[token])}
    if k > 0:
        values, ids = torch.topk(logprobs, k)
        entry.update({int(i): float(v) for i, v in zip(ids, values)})
    return entry
