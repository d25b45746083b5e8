"""Sampling parameters of one request, shaped like vLLM's `SamplingParams`.

Notable: temperature 0 means greedy; `seed` makes sampling reproducible per request (sequence i of an
n>1 request draws from seed + i); `stop` strings are matched on the detokenised text and cut from it;
`logprobs=k` returns the sampled token's log-probability plus the top k.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ocula.errors import ConfigError


@dataclass
class SamplingParams:
    n: int = 1                                # completions per prompt (they share one prefill)
    max_tokens: int | None = 16               # None: up to the engine's max_model_len
    min_tokens: int = 0                       # EOS / stop token ids cannot be sampled before this many
    temperature: float = 1.0                  # 0: greedy
    top_k: int = 0                            # 0 or -1: all tokens
    top_p: float = 1.0                        # nucleus mass kept
    repetition_penalty: float = 1.0           # >1 discourages tokens already in prompt or output (CTRL)
    seed: int | None = None                   # per-request generator seed
    stop: list[str] = field(default_factory=list)          # strings that end generation (cut from text)
    stop_token_ids: list[int] = field(default_factory=list)  # token ids that end generation (kept in ids)
    ignore_eos: bool = False                  # keep going past the tokenizer's EOS
    logprobs: int | None = None               # number of top log-probabilities to return per token
    skip_special_tokens: bool = True          # drop special tokens when detokenising
    include_stop_str_in_output: bool = False  # keep the matched stop string at the end of the text

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        if self.top_k == -1:
            self.top_k = 0
        self._check()

    def _check(self) -> None:
        checks = [
            (self.n >= 1, f"n={self.n} must be >= 1"),
            (self.max_tokens is None or self.max_tokens >= 1, f"max_tokens={self.max_tokens} must be >= 1"),
            (self.min_tokens >= 0, f"min_tokens={self.min_tokens} must be >= 0"),
            (self.temperature >= 0.0, f"temperature={self.temperature} must be >= 0 (0 is greedy)"),
            (self.top_k >= 0, f"top_k={self.top_k} must be >= 0 (0 or -1 keeps all tokens)"),
            (0.0 < self.top_p <= 1.0, f"top_p={self.top_p} must be in (0, 1]"),
            (self.repetition_penalty > 0.0, f"repetition_penalty={self.repetition_penalty} must be > 0"),
            (self.logprobs is None or self.logprobs >= 0, f"logprobs={self.logprobs} must be >= 0"),
            (all(self.stop), "stop strings must be non-empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"SamplingParams: {message}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def max_stop_len(self) -> int:
        return max((len(s) for s in self.stop), default=0)
