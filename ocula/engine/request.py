"""Request and sequence state.

A `Request` is what a user submitted: prompt token ids, media items and sampling parameters. It owns one
or more `Sequence`s (n > 1 forks the first one after the shared prefill). The scheduler and the block
manager only see sequences: their tokens, their block table and how many tokens already have KV.

Notable features:
- a `MediaItem` carries its content hash, where its placeholder tokens sit in the prompt and an opaque
  payload of processed tensors for the model runner;
- positions are computed once at admission (`mrope_positions` [3, P] + `position_delta`) and carried
  through preemption and decoding, never recomputed per step;
- metrics: arrival, first scheduled, first token and finish times give TTFT and decode tokens/s.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ocula.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class MediaItem:
    hash: str           # content hash of pixels + processing options (the caches key on it)
    offset: int         # index of the first placeholder token in the prompt
    length: int         # number of placeholder tokens (= rows of its vision features)
    payload: Any = None  # processed tensors for the runner (e.g. pixel_values, image_grid_thw)

    @property
    def end(self) -> int:
        return self.offset + self.length


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self.value in ("stop", "length", "abort")


@dataclass
class RequestMetrics:
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    num_generated_tokens: int = 0

    @property
    def ttft(self) -> float | None:
        """Seconds from arrival to the first generated token."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def tokens_per_s(self) -> float | None:
        """Decode speed after the first token (tokens 2..N over their wall time)."""
        if self.finish_time is None or self.first_token_time is None or self.num_generated_tokens < 2:
            return None
        elapsed = self.finish_time - self.first_token_time
        return (self.num_generated_tokens - 1) / elapsed if elapsed > 0 else None


class Sequence:
    """One token stream with its KV blocks; what the scheduler and the block manager work on."""

    def __init__(self, seq_id: int, request: Request, index: int, token_ids: list[int]):
        self.seq_id = seq_id
        self.request = request
        self.index = index                       # completion index inside the request
        self.token_ids = list(token_ids)         # prompt + generated
        self.num_prompt_tokens = request.num_prompt_tokens
        self.num_computed_tokens = 0             # tokens whose KV is in the cache
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []      # chained hashes of full blocks (prefix cache)
        self.status = SequenceStatus.WAITING
        self.num_cached_tokens = 0               # prompt tokens served by the prefix cache at admission
        self.cumulative_logprob = 0.0
        self.logprobs: list[dict[int, float]] = []
        self.generator = _make_generator(request.params.seed, index)
        self.stop_reason: int | str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, req={self.request.request_id!r}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, status={self.status.value})")


class Request:
    """A submitted prompt with its media, sampling parameters and sequences."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        media: list[MediaItem] | None = None,
        *,
        max_tokens: int,
        mrope_positions: torch.Tensor | None = None,
        position_delta: int = 0,
    ):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.media = sorted(media or [], key=lambda m: m.offset)
        self.max_tokens = max_tokens                # params.max_tokens clipped to max_model_len
        self.mrope_positions = mrope_positions      # [3, P] long, or None for 1-D positions
        self.position_delta = position_delta        # token at index t >= P decodes at t + delta
        self.metrics = RequestMetrics()
        self.sequences: list[Sequence] = []
        self.forked = params.n == 1                 # n > 1: children are forked after the prefill

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.forked and all(s.is_finished for s in self.sequences)

    def media_in(self, start: int, end: int) -> list[MediaItem]:
        """Media items whose placeholder range overlaps token indices [start, end)."""
        return [m for m in self.media if m.offset < end and m.end > start]


def _make_generator(seed: int | None, index: int) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator().manual_seed(seed + index)
