"""Sampling parameters of one request, shaped like vLLM's `SamplingParams`.

Notable: temperature 0 means greedy; `seed` makes sampling reproducible per request (sequence i of an
n>1 request draws from seed + i); `stop` strings are matched on the detokenised text and cut from it;
`logprobs=k` returns the sampled token's log-probability plus the top k.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from numbers import Integral, Real

from ocula.errors import ConfigError

_FIELD_TYPES = (  # (field, accepted type, None allowed); numbers.* also admits numpy scalars
    ("n", Integral, False), ("max_tokens", Integral, True), ("min_tokens", Integral, False),
    ("temperature", Real, False), ("top_k", Integral, False), ("top_p", Real, False),
    ("repetition_penalty", Real, False), ("seed", Integral, True), ("logprobs", Integral, True),
)


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
        self.stop = [] if self.stop is None else self.stop  # vLLM accepts stop=None
        self._check_types()
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        if self.top_k == -1:
            self.top_k = 0
        self._check()

    def _check_types(self) -> None:
        # a JSON line or a config file can carry "0.7" or null: say which field, not a bare TypeError
        for name, kinds, optional in _FIELD_TYPES:
            value = getattr(self, name)
            if (value is None and optional) or (isinstance(value, kinds) and not isinstance(value, bool)):
                continue
            kind = "an integer" if kinds is Integral else "a number"
            kind += " or None" if optional else ""
            raise ConfigError(f"SamplingParams: {name}={value!r} must be {kind}")
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise ConfigError(f"SamplingParams: stop={self.stop!r} must be a string or a list of strings")
        ids = self.stop_token_ids
        if not isinstance(ids, (list, tuple)) or not all(_is_int(t) for t in ids):
            raise ConfigError(f"SamplingParams: stop_token_ids={ids!r} must be a list of ints")

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


def _is_int(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)
