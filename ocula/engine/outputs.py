"""What the engine returns per request and step: `RequestOutput` holding one `CompletionOutput` per
sampled sequence (n of them), with cumulative text and token ids, finish reasons and metrics.

`finish_reason` is None while running, "stop" (EOS, a stop token id or a stop string; `stop_reason` says
which: None for EOS, the id or the string), "length" (max_tokens or max_model_len) or "abort".
"""

from __future__ import annotations

from dataclasses import dataclass

from ocula.engine.request import RequestMetrics


@dataclass
class CompletionOutput:
    index: int
    text: str                                   # cumulative detokenised text (stop string cut)
    token_ids: list[int]                        # cumulative generated ids
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[dict[int, float]] | None = None  # per token: sampled id + top-k ids -> log-probability
    cumulative_logprob: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    num_cached_tokens: int = 0                  # prompt tokens whose KV came from the prefix cache


@dataclass
class EngineStats:
    """A snapshot for dashboards (the server's /metrics)."""

    num_running: int                 # sequences decoding or prefilling
    num_waiting: int                 # sequences queued (new or preempted)
    num_preemptions: int             # total since start
    kv_blocks_total: int
    kv_blocks_free: int              # free-queue blocks, including cached ones that can be revived
    prefix_cache_hit_rate: float     # prompt tokens served from the prefix cache / prompt tokens admitted
    encoder_cache_hits: int
    encoder_cache_misses: int
