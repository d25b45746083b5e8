"""Prometheus text metrics of the server and its engine, with no client library.

Exposed at `GET /metrics`:
- counters: `ocula_requests_total{status}` (chat completions by HTTP status), `ocula_prompt_tokens_total`,
  `ocula_generation_tokens_total`, `ocula_prefix_cache_hit_tokens_total`;
- gauges read from the engine at scrape time: running and waiting sequences, in-flight HTTP requests,
  KV-cache usage, prefix-cache hit rate (cached / prompt tokens), vision-encoder cache hit rate;
- histograms: `ocula_time_to_first_token_seconds`, `ocula_e2e_request_latency_seconds`.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


@dataclass
class Histogram:
    name: str
    help: str
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self.buckets, value)
        if index < len(self.counts):
            self.counts[index] += 1
        self.total += value
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, count in zip(self.buckets, self.counts):
            cumulative += count
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {cumulative}')
        lines += [f'{self.name}_bucket{{le="+Inf"}} {self.count}', f"{self.name}_sum {self.total}",
                  f"{self.name}_count {self.count}"]
        return lines


class ServerMetrics:
    def __init__(self) -> None:
        self.requests: Counter[int] = Counter()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.cached_prompt_tokens = 0
        self.in_flight = 0
        self.ttft = Histogram("ocula_time_to_first_token_seconds", "Seconds from arrival to the first token.")
        self.latency = Histogram("ocula_e2e_request_latency_seconds", "Seconds from arrival to the last token.")

    def record_status(self, status: int) -> None:
        self.requests[status] += 1

    def record_output(self, output: Any) -> None:
        """Account a finished engine `RequestOutput` (tokens, cache hits, TTFT, latency)."""
        self.prompt_tokens += len(output.prompt_token_ids)
        self.cached_prompt_tokens += output.num_cached_tokens
        self.generation_tokens += sum(len(c.token_ids) for c in output.outputs)
        metrics = output.metrics
        if metrics.ttft is not None:
            self.ttft.observe(metrics.ttft)
        if metrics.finish_time is not None:
            self.latency.observe(metrics.finish_time - metrics.arrival_time)

    def render(self, engine: Any) -> str:
        lines = [
            "# HELP ocula_requests_total Chat completion requests by HTTP status.",
            "# TYPE ocula_requests_total counter",
        ]
        lines += [f'ocula_requests_total{{status="{s}"}} {n}' for s, n in sorted(self.requests.items())]
        lines += _counter("ocula_prompt_tokens_total", "Prompt tokens of finished requests.", self.prompt_tokens)
        lines += _counter("ocula_generation_tokens_total", "Generated tokens.", self.generation_tokens)
        lines += _counter("ocula_prefix_cache_hit_tokens_total", "Prompt tokens served from the prefix cache.",
                          self.cached_prompt_tokens)
        for name, help_text, value in self._gauges(engine):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {value}"]
        lines += self.ttft.render() + self.latency.render()
        return "\n".join(lines) + "\n"

    def _gauges(self, engine: Any) -> list[tuple[str, str, float]]:
        stats = engine.stats()
        lookups = stats.encoder_cache_hits + stats.encoder_cache_misses
        return [
            ("ocula_requests_in_flight", "HTTP chat requests being served.", self.in_flight),
            ("ocula_num_requests_running", "Sequences being decoded or prefilled.", stats.num_running),
            ("ocula_num_requests_waiting", "Sequences queued for admission.", stats.num_waiting),
            ("ocula_num_preemptions", "Sequences preempted since start.", stats.num_preemptions),
            ("ocula_kv_cache_usage_ratio", "Fraction of KV blocks in use.",
             1.0 - stats.kv_blocks_free / max(stats.kv_blocks_total, 1)),
            ("ocula_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / prompt tokens.",
             stats.prefix_cache_hit_rate),
            ("ocula_encoder_cache_hit_rate", "Vision-encoder cache hits / lookups.",
             stats.encoder_cache_hits / max(lookups, 1)),
        ]


def _counter(name: str, help_text: str, value: float) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} counter", f"{name} {value}"]
