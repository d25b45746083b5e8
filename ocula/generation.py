"""`model.generate()` for the library path: same calls and same tokens as transformers 5.23.

Notable features:
- `GenerationConfig` resolves like transformers: call-time kwargs > the `generation_config` argument >
  the checkpoint's generation_config.json > global defaults (max_length 20, greedy, top_k 50, ...).
  `do_sample=False` is greedy whatever temperature/top_k/top_p say.
- Uses only the model contract (docs/architecture.md): media features are computed once, the padded
  prompt is prefilled once into a preallocated static KV cache (logits of the last position only), then a
  tight decode loop feeds one token per step. Nothing grows per step: the key mask [B, S + max_new], the
  output buffer and the decode positions (cache index + rope delta, the same value in all three M-RoPE
  rows) are built once and sliced.
- Stops rows on eos, stop strings (needs `tokenizer=`, matched like transformers' StopStringCriteria:
  the string must overlap the last token), max_time, user stopping criteria and max length; finished
  rows are padded with pad_token_id (eos when unset) and the loop exits when every row is done.
- Sampling (layers/sampler.py) follows transformers' processor order and RNG use, so greedy tokens are
  identical and `torch.manual_seed(s)` / `seed=s` reproduce transformers' samples.
- `TextStreamer` / `TextIteratorStreamer` with transformers' word-boundary buffering.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from dataclasses import dataclass, field
from queue import Queue
from typing import Any

import torch

from ocula.errors import ConfigError, RequestTooLargeError, UnsupportedFeatureError
from ocula.layers.attention import DenseAttentionMetadata
from ocula.layers.sampler import (
    SamplingTensors,
    check_sampling_values,
    mark_seen,
    new_seen_mask,
    select_tokens,
)

# transformers' GenerationConfig._get_default_generation_params(), for the fields ocula implements.
GLOBAL_DEFAULTS: dict[str, Any] = {
    "max_length": 20,
    "min_length": 0,
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "repetition_penalty": 1.0,
    "num_return_sequences": 1,
    "output_scores": False,
    "output_logits": False,
    "return_dict_in_generate": False,
}

# Options of transformers' generate() that ocula accepts only at their neutral value.
_NEUTRAL_OPTIONS: dict[str, Any] = {
    "num_beams": 1,
    "min_p": None,
    "typical_p": 1.0,
    "no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "logits_processor": None,
    "assistant_model": None,
    "prefix_allowed_tokens_fn": None,
    "inputs_embeds": None,
}
_IGNORED_OPTIONS = frozenset({"use_cache", "synced_gpus", "output_attentions", "output_hidden_states"})


@dataclass
class GenerationConfig:
    """Generation settings; None means "not set here" (filled from the next layer down)."""

    max_new_tokens: int | None = None  # tokens to generate; takes precedence over max_length
    max_length: int | None = None  # prompt + generated tokens
    min_new_tokens: int | None = None  # eos is masked until this many tokens were generated
    min_length: int | None = None  # eos is masked while prompt + generated is shorter
    max_time: float | None = None  # seconds; rows stop once generation took longer
    do_sample: bool | None = None  # False: greedy, whatever the sampling parameters say
    temperature: float | None = None
    top_k: int | None = None  # 0 = off
    top_p: float | None = None  # 1.0 = off
    repetition_penalty: float | None = None  # 1.0 = off
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None  # finished rows are padded with it (eos_token_id[0] when unset)
    bos_token_id: int | None = None
    stop_strings: str | list[str] | None = None  # needs generate(tokenizer=...)
    num_return_sequences: int | None = None  # samples per prompt (sampling only)
    return_dict_in_generate: bool | None = None
    output_scores: bool | None = None  # processed scores per step (needs return_dict_in_generate)
    output_logits: bool | None = None  # raw logits per step (needs return_dict_in_generate)
    extra: dict[str, Any] = field(default_factory=dict)  # keys of the file ocula does not use, kept visible

    @classmethod
    def field_names(cls) -> frozenset[str]:
        return frozenset(f.name for f in dataclasses.fields(cls)) - {"extra"}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationConfig:
        known = {key: value for key, value in data.items() if key in cls.field_names()}
        extra = {key: value for key, value in data.items() if key not in cls.field_names()}
        return cls(**known, extra=extra)

    @classmethod
    def from_pretrained(cls, folder) -> GenerationConfig:
        """Read `generation_config.json` from a checkpoint folder (all None when the file is absent)."""
        from ocula.loading.hub import read_json

        return cls.from_dict(read_json(folder, "generation_config.json") or {})

    @classmethod
    def coerce(cls, value: Any) -> GenerationConfig:
        """Accept a GenerationConfig, a dict, None, or any object with a to_dict() / attributes."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls.from_dict(value)
        if hasattr(value, "to_dict"):
            return cls.from_dict(value.to_dict())
        return cls.from_dict({key: getattr(value, key) for key in cls.field_names() if hasattr(value, key)})

    def to_dict(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in self.field_names() if getattr(self, name) is not None}
        return {**self.extra, **data}

    def __getattr__(self, name: str) -> Any:
        extra = self.__dict__.get("extra", {})
        if name in extra:
            return extra[name]
        raise AttributeError(f"GenerationConfig has no field {name!r}")

    def filled_from(self, other: GenerationConfig | dict[str, Any]) -> GenerationConfig:
        """A copy whose unset (None) fields take the value from `other`."""
        values = other.to_dict() if isinstance(other, GenerationConfig) else other
        updates = {k: v for k, v in values.items() if k in self.field_names() and getattr(self, k) is None}
        return dataclasses.replace(self, **updates)

    def eos_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


@dataclass
class GenerateOutput:
    """What generate() returns with return_dict_in_generate=True (transformers' GenerateDecoderOnlyOutput)."""

    sequences: torch.Tensor  # [B * num_return_sequences, S + new]
    scores: tuple[torch.Tensor, ...] | None = None  # per step [B, V] float32, after logits processing
    logits: tuple[torch.Tensor, ...] | None = None  # per step [B, V] float32, raw
    past_key_values: Any = None

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]


# ----------------------------------------------------------------------------------------------------------
# Stopping criteria
# ----------------------------------------------------------------------------------------------------------


class StoppingCriteria:
    """Called after each step with the sequences so far; returns [B] bool (True = stop that row)."""

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs) -> torch.Tensor:
        raise NotImplementedError("subclass StoppingCriteria and implement __call__")


class StoppingCriteriaList(list):
    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs) -> torch.Tensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for criterion in self:
            done = done | _as_row_flags(criterion(input_ids, scores, **kwargs), done)
        return done


class MaxTimeCriteria(StoppingCriteria):
    """Stops every row once `max_time` seconds have passed since `initial_timestamp` (default: now)."""

    def __init__(self, max_time: float, initial_timestamp: float | None = None):
        self.max_time = max_time
        self.initial_timestamp = time.time() if initial_timestamp is None else initial_timestamp

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs) -> torch.Tensor:
        expired = time.time() - self.initial_timestamp > self.max_time
        return torch.full((input_ids.shape[0],), expired, dtype=torch.bool, device=input_ids.device)


class StopStringCriteria(StoppingCriteria):
    """Stops a row when a stop string appears in its text and overlaps the row's last token.

    Like transformers' StopStringCriteria: "st" + "op", "las" + "topper" and "stop" match "stop", while
    "stop" + "at" does not (the match must involve the newest token, so an old match never re-triggers).
    Works on decoded text: the tail of each row is decoded, and the last token's text is what the tail's
    decode adds over the tail without it.
    """

    def __init__(self, tokenizer, stop_strings: str | list[str]):
        self.tokenizer = tokenizer
        self.stop_strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
        if not self.stop_strings or not all(isinstance(s, str) and s for s in self.stop_strings):
            raise ConfigError(f"stop_strings must be non-empty strings, got {stop_strings!r}")
        # A stop string of n characters spans at most n tokens; +1 covers a partial UTF-8 byte token.
        self.tail_tokens = max(len(s) for s in self.stop_strings) + 1

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs) -> torch.Tensor:
        tails = input_ids[:, -self.tail_tokens :].tolist()
        done = [self._row_matches(tail) for tail in tails]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    def _row_matches(self, tail: list[int]) -> bool:
        text = self.tokenizer.decode(tail)
        last_start = len(self.tokenizer.decode(tail[:-1]))
        for stop in self.stop_strings:
            # Any occurrence starting here or later ends inside the last token's text.
            if text.find(stop, max(0, last_start - len(stop) + 1)) != -1:
                return True
        return False


def _as_row_flags(result: Any, like: torch.Tensor) -> torch.Tensor:
    if isinstance(result, torch.Tensor):
        return result.to(device=like.device, dtype=torch.bool).reshape(-1).expand_as(like)
    return torch.full_like(like, bool(result))


# ----------------------------------------------------------------------------------------------------------
# Streamers
# ----------------------------------------------------------------------------------------------------------


class BaseStreamer:
    """generate() calls put(prompt ids) once, put(new tokens [B]) every step, then end()."""

    def put(self, value: torch.Tensor) -> None:
        raise NotImplementedError

    def end(self) -> None:
        raise NotImplementedError


def _is_cjk(codepoint: int) -> bool:
    """CJK ideographs are whole words: they are flushed at once (transformers' rule)."""
    ranges = (
        (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
        (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F),
    )  # fmt: skip
    return any(low <= codepoint <= high for low, high in ranges)


class TextStreamer(BaseStreamer):
    """Prints text to stdout as soon as whole words are formed (batch size 1).

    Tokens are buffered until the decoded text ends a line, ends with a CJK character or has a space;
    then the text up to the last space is released, so a word split over tokens is never shown half done.
    """

    def __init__(self, tokenizer, skip_prompt: bool = False, **decode_kwargs):
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.decode_kwargs = decode_kwargs
        self.token_cache: list[int] = []
        self.print_len = 0
        self.next_tokens_are_prompt = True

    def put(self, value: torch.Tensor) -> None:
        if value.dim() > 1 and value.shape[0] > 1:
            raise UnsupportedFeatureError(
                "TextStreamer only supports batch size 1; generate one prompt at a time"
            )
        if value.dim() > 1:
            value = value[0]
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self.token_cache.extend(value.tolist())
        self.on_finalized_text(self._releasable_text())

    def _releasable_text(self) -> str:
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
        if text.endswith("\n"):
            released = text[self.print_len :]
            self.token_cache, self.print_len = [], 0
        elif text and _is_cjk(ord(text[-1])):
            released = text[self.print_len :]
            self.print_len += len(released)
        else:
            released = text[self.print_len : text.rfind(" ") + 1]
            self.print_len += len(released)
        return released

    def end(self) -> None:
        released = ""
        if self.token_cache:
            released = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)[self.print_len :]
        self.token_cache, self.print_len = [], 0
        self.next_tokens_are_prompt = True
        self.on_finalized_text(released, stream_end=True)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        print(text, flush=True, end=None if stream_end else "")


class TextIteratorStreamer(TextStreamer):
    """Queues the released text; iterate over it (e.g. while generate() runs in another thread)."""

    def __init__(self, tokenizer, skip_prompt: bool = False, timeout: float | None = None, **decode_kwargs):
        super().__init__(tokenizer, skip_prompt, **decode_kwargs)
        self.text_queue: Queue = Queue()
        self.stop_signal = None
        self.timeout = timeout

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.text_queue.put(text, timeout=self.timeout)
        if stream_end:
            self.text_queue.put(self.stop_signal, timeout=self.timeout)

    def __iter__(self):
        return self

    def __next__(self) -> str:
        value = self.text_queue.get(timeout=self.timeout)
        if value == self.stop_signal:
            raise StopIteration
        return value


# ----------------------------------------------------------------------------------------------------------
# Settings resolution
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Settings:
    """Everything the decode loop needs, resolved once per call."""

    config: GenerationConfig  # fully resolved
    max_length: int  # prompt + generated
    min_length: int  # eos masked while the sequence is shorter
    eos: torch.Tensor | None  # [E] long
    pad_token_id: int | None
    sampling: SamplingTensors
    criteria: StoppingCriteriaList
    generator: torch.Generator | None


def _split_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Generation options vs media inputs (pixel_values, image_grid_thw, mm_token_type_ids, ...)."""
    options, media = {}, {}
    for key, value in kwargs.items():
        if key in GenerationConfig.field_names():
            options[key] = value
        elif key in _NEUTRAL_OPTIONS:
            if value is not None and value != _NEUTRAL_OPTIONS[key] and not _empty_list(value):
                raise UnsupportedFeatureError(
                    f"generate({key}={value!r}) is not supported by ocula; leave it unset "
                    "(greedy and sampling with temperature/top_k/top_p/repetition_penalty are)"
                )
        elif key not in _IGNORED_OPTIONS and value is not None:
            media[key] = value
    return options, media


def _empty_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 0


def _resolve_config(
    model, generation_config: GenerationConfig | None, options: dict[str, Any]
) -> tuple[GenerationConfig, bool]:
    """Layers: options > generation_config > model.generation_config > GLOBAL_DEFAULTS."""
    base = GenerationConfig.coerce(generation_config)
    model_config = GenerationConfig.coerce(getattr(model, "generation_config", None))
    has_default_max_length = (
        options.get("max_length") is None and base.max_length is None and model_config.max_length is None
    )
    given = {key: value for key, value in options.items() if value is not None}
    config = dataclasses.replace(base, **given).filled_from(model_config).filled_from(GLOBAL_DEFAULTS)
    return config, has_default_max_length


def _length_limits(
    model, config: GenerationConfig, prompt_len: int, has_default_max: bool
) -> tuple[int, int]:
    """(max_length, min_length) over prompt + generated tokens, as transformers derives them."""
    if config.max_new_tokens is not None:
        max_length = config.max_new_tokens + prompt_len
    elif has_default_max:  # the global default means "20 new tokens", capped by the model's positions
        max_length = config.max_length + prompt_len
        max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        max_length = min(max_length, max_positions) if isinstance(max_positions, int) else max_length
    else:
        max_length = config.max_length
    if prompt_len >= max_length:
        raise RequestTooLargeError(
            f"the prompt has {prompt_len} tokens but max_length is {max_length}: nothing can be generated; "
            "set max_new_tokens (or a larger max_length)"
        )
    min_new = config.min_new_tokens
    min_length = prompt_len + min_new if min_new is not None else config.min_length
    return max_length, min_length


def _sampling_tensors(config: GenerationConfig, batch_size: int, device: torch.device) -> SamplingTensors:
    params = {
        "do_sample": bool(config.do_sample),
        "temperature": float(config.temperature),
        "top_k": int(config.top_k or 0),
        "top_p": float(config.top_p),
        "repetition_penalty": float(config.repetition_penalty),
    }
    check_sampling_values(**params)
    if not params["do_sample"]:  # transformers adds no warpers for greedy decoding
        params.update(temperature=1.0, top_k=0, top_p=1.0)
    return SamplingTensors.uniform(batch_size, device=device, **params)


def _stopping_criteria(config: GenerationConfig, tokenizer, user_criteria) -> StoppingCriteriaList:
    criteria = StoppingCriteriaList()
    if config.max_time is not None:
        criteria.append(MaxTimeCriteria(config.max_time))
    if config.stop_strings is not None:
        if tokenizer is None:
            raise ConfigError(
                "stop_strings need the tokenizer to read the generated text: pass generate(..., tokenizer=tokenizer)"
            )
        criteria.append(StopStringCriteria(tokenizer, config.stop_strings))
    if user_criteria is not None:
        criteria.extend(user_criteria if isinstance(user_criteria, (list, tuple)) else [user_criteria])
    return criteria


def _make_generator(seed: int | None, generator: torch.Generator | None, device) -> torch.Generator | None:
    if seed is None:
        return generator  # None: torch's global generator, like transformers
    return torch.Generator(device=device).manual_seed(seed)


def _settings(model, config, has_default_max, prompt_len, batch_size, device, extras) -> _Settings:
    if config.num_return_sequences > 1 and not config.do_sample:
        raise ConfigError(
            f"num_return_sequences={config.num_return_sequences} needs do_sample=True: "
            "greedy decoding returns the same sequence every time"
        )
    max_length, min_length = _length_limits(model, config, prompt_len, has_default_max)
    eos_ids = config.eos_ids()
    pad = config.pad_token_id if config.pad_token_id is not None else (eos_ids[0] if eos_ids else None)
    return _Settings(
        config=config,
        max_length=max_length,
        min_length=min_length,
        eos=torch.tensor(eos_ids, dtype=torch.long, device=device) if eos_ids else None,
        pad_token_id=pad,
        sampling=_sampling_tensors(config, batch_size, device),
        criteria=_stopping_criteria(config, extras["tokenizer"], extras["stopping_criteria"]),
        generator=_make_generator(extras["seed"], extras["generator"], device),
    )


# ----------------------------------------------------------------------------------------------------------
# Prompt preparation and the decode loop
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Prompt:
    input_ids: torch.Tensor  # [B, S]
    attention_mask: torch.Tensor  # [B, S] long, 1 = real token
    embeds: torch.Tensor  # [B, S, hidden]
    positions: torch.Tensor  # [B, S] (1-D RoPE) or [3, B, S] (M-RoPE)
    delta: torch.Tensor  # [B] long: cache index t decodes at position t + delta

    def repeat(self, n: int) -> _Prompt:
        """Each row n times in a row (num_return_sequences), after the media were embedded once."""
        if n == 1:
            return self
        batch_dim = self.positions.dim() - 2
        return _Prompt(
            input_ids=self.input_ids.repeat_interleave(n, dim=0),
            attention_mask=self.attention_mask.repeat_interleave(n, dim=0),
            embeds=self.embeds.repeat_interleave(n, dim=0),
            positions=self.positions.repeat_interleave(n, dim=batch_dim),
            delta=self.delta.repeat_interleave(n, dim=0),
        )


def _infer_attention_mask(input_ids: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    """transformers: pad tokens are masked only when the pad id is known and differs from every eos id."""
    eos_ids = config.eos_ids()
    pad = config.pad_token_id if config.pad_token_id is not None else (eos_ids[0] if eos_ids else None)
    if pad is None or pad in eos_ids or not bool((input_ids == pad).any()):
        return torch.ones_like(input_ids)
    return (input_ids != pad).long()


def _check_media_keys(model, media: dict[str, Any]) -> None:
    """Like transformers, refuse keyword arguments that are neither generation options nor model inputs."""
    hooks = ("forward", "get_media_features", "get_position_ids")
    params = [
        p for name in hooks if hasattr(model, name) for p in inspect.signature(getattr(model, name)).parameters.values()
    ]
    accepted = {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    unknown = sorted(set(media) - accepted)
    if unknown:
        raise ConfigError(
            f"generate() got {unknown}: neither a generation option nor an input of "
            f"{type(model).__name__}.forward; check the spelling"
        )


def _prepare_prompt(model, input_ids, attention_mask, media: dict[str, Any]) -> _Prompt:
    features = model.get_media_features(**media) if media else None
    embeds = model.embed_inputs(input_ids, features)  # [B, S, hidden]
    positions, delta = model.get_position_ids(input_ids, attention_mask, **media)
    delta = delta.to(input_ids.device).long().reshape(-1)  # [B] (a [B, 1] rope_deltas is accepted too)
    return _Prompt(input_ids, attention_mask.long(), embeds, positions, delta)


def _decode_positions(prompt: _Prompt, max_length: int) -> torch.Tensor:
    """Positions of every token fed back: [B, max_new] or [3, B, max_new] (same value in the 3 rows)."""
    prompt_len = prompt.input_ids.shape[1]
    cache_index = torch.arange(prompt_len, max_length, device=prompt.delta.device)
    positions = prompt.delta[:, None] + cache_index[None, :]  # [B, max_new]
    if prompt.positions.dim() == 3:
        positions = positions[None].expand(prompt.positions.shape[0], -1, -1).contiguous()
    return positions


@dataclass
class _Loop:
    """Buffers preallocated for the whole call; the loop only writes into them and slices views."""

    sequences: torch.Tensor  # [B, max_length] prompt then generated tokens
    key_mask: torch.Tensor  # [B, max_length] bool; generated tokens are always real
    positions: torch.Tensor  # [B, max_new] or [3, B, max_new]
    unfinished: torch.Tensor  # [B] bool
    seen: torch.Tensor | None  # [B, V] bool, for the repetition penalty
    scores: list[torch.Tensor] | None
    logits: list[torch.Tensor] | None


def _new_loop(prompt: _Prompt, settings: _Settings) -> _Loop:
    batch, prompt_len = prompt.input_ids.shape
    device = prompt.input_ids.device
    fill = settings.pad_token_id if settings.pad_token_id is not None else 0
    sequences = torch.full((batch, settings.max_length), fill, dtype=torch.long, device=device)
    sequences[:, :prompt_len] = prompt.input_ids
    key_mask = torch.ones(batch, settings.max_length, dtype=torch.bool, device=device)
    key_mask[:, :prompt_len] = prompt.attention_mask.bool()
    record = settings.config.return_dict_in_generate
    return _Loop(
        sequences=sequences,
        key_mask=key_mask,
        positions=_decode_positions(prompt, settings.max_length),
        unfinished=torch.ones(batch, dtype=torch.bool, device=device),
        seen=None,
        scores=[] if record and settings.config.output_scores else None,
        logits=[] if record and settings.config.output_logits else None,
    )


def _seen_mask(prompt: _Prompt, settings: _Settings, vocab_size: int) -> torch.Tensor | None:
    if not settings.sampling.needs_seen_mask:
        return None
    # transformers skips left padding only: the number of leading zeros of the mask.
    num_left_pad = (prompt.attention_mask != 0).int().argmax(dim=1)
    return new_seen_mask(prompt.input_ids, vocab_size, num_left_pad)


def _prefill(model, prompt: _Prompt, cache, key_mask: torch.Tensor) -> torch.Tensor:
    prompt_len = prompt.input_ids.shape[1]
    attn = DenseAttentionMetadata(cache=cache, start=0, key_mask=key_mask[:, :prompt_len])
    hidden = model.forward_text(prompt.embeds, prompt.positions, attn)  # [B, S, hidden]
    return model.compute_logits(hidden[:, -1:, :])[:, -1]  # [B, V]


def _decode_step(
    model, tokens: torch.Tensor, loop: _Loop, cache, index: int, prompt_len: int
) -> torch.Tensor:
    """Feed the token at cache `index`; return the next logits [B, V]."""
    embeds = model.embed_inputs(tokens[:, None], None)  # [B, 1, hidden]
    step = index - prompt_len
    positions = loop.positions[..., step : step + 1]  # [B, 1] or [3, B, 1]
    attn = DenseAttentionMetadata(cache=cache, start=index, key_mask=loop.key_mask[:, : index + 1])
    hidden = model.forward_text(embeds, positions, attn)
    return model.compute_logits(hidden)[:, -1]


def _next_tokens(logits: torch.Tensor, loop: _Loop, settings: _Settings, length: int) -> torch.Tensor:
    """Pick this step's tokens [B] (finished rows get the pad token) and record scores if asked."""
    logits = logits.float()
    scores_in = logits
    if settings.eos is not None and length < settings.min_length:
        scores_in = logits.index_fill(1, settings.eos, float("-inf"))
    tokens, scores = select_tokens(scores_in, settings.sampling, loop.seen, settings.generator)
    if settings.eos is not None:
        tokens = torch.where(loop.unfinished, tokens, settings.pad_token_id)
    if loop.scores is not None:
        loop.scores.append(scores)
    if loop.logits is not None:
        loop.logits.append(logits)
    return tokens


def _update_finished(loop: _Loop, settings: _Settings, tokens: torch.Tensor, length: int) -> None:
    if settings.eos is not None:
        loop.unfinished &= ~torch.isin(tokens, settings.eos)
    if settings.criteria:
        scores = tuple(loop.scores) if loop.scores is not None else None
        loop.unfinished &= ~settings.criteria(loop.sequences[:, :length], scores)


def _run(model, prompt: _Prompt, settings: _Settings, streamer) -> tuple[_Loop, int]:
    prompt_len = prompt.input_ids.shape[1]
    cache = model.new_kv_cache(prompt.input_ids.shape[0], settings.max_length)
    loop = _new_loop(prompt, settings)
    logits = _prefill(model, prompt, cache, loop.key_mask)
    loop.seen = _seen_mask(prompt, settings, logits.shape[-1])
    length = prompt_len
    while True:
        tokens = _next_tokens(logits, loop, settings, length)
        loop.sequences[:, length] = tokens
        length += 1
        if loop.seen is not None:
            mark_seen(loop.seen, tokens)
        if streamer is not None:
            streamer.put(tokens.cpu())
        _update_finished(loop, settings, tokens, length)
        if length >= settings.max_length or not bool(loop.unfinished.any()):
            return loop, length
        logits = _decode_step(model, tokens, loop, cache, length - 1, prompt_len)


class GenerationMixin:
    """Adds transformers' `generate()` to a model implementing the contract in docs/architecture.md."""

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        generation_config: GenerationConfig | None = None,
        streamer: BaseStreamer | None = None,
        stopping_criteria: StoppingCriteria | list | None = None,
        tokenizer=None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        max_new_tokens: int | None = None,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        stop_strings: str | list[str] | None = None,
        num_return_sequences: int | None = None,
        return_dict_in_generate: bool | None = None,
        **kwargs,
    ) -> torch.Tensor | GenerateOutput:
        """Prompt + generated tokens [B * num_return_sequences, S + new] (or a GenerateOutput).

        Other keyword arguments are GenerationConfig fields (max_length, min_new_tokens, max_time,
        output_scores, ...) or the processor's media outputs (pixel_values, image_grid_thw, ...).
        `seed` (ocula) samples from a fresh torch.Generator seeded with it; `generator` uses the one given.
        """
        if input_ids is None:
            input_ids = kwargs.pop("inputs", None)
        if input_ids is None:
            raise UnsupportedFeatureError("generate() needs input_ids (the processor's output); got none")
        options, media = _split_kwargs(kwargs)
        _check_media_keys(self, media)
        explicit = {
            "max_new_tokens": max_new_tokens,
            "do_sample": do_sample,
            "temperature": temperature,
            "top_k": top_k,
            "top_p": top_p,
            "repetition_penalty": repetition_penalty,
            "eos_token_id": eos_token_id,
            "pad_token_id": pad_token_id,
            "stop_strings": stop_strings,
            "num_return_sequences": num_return_sequences,
            "return_dict_in_generate": return_dict_in_generate,
        }
        config, has_default_max = _resolve_config(self, generation_config, {**options, **explicit})
        extras = {
            "tokenizer": tokenizer,
            "stopping_criteria": stopping_criteria,
            "seed": seed,
            "generator": generator,
        }
        batch, prompt_len = input_ids.shape[0] * config.num_return_sequences, input_ids.shape[1]
        # Settings are checked before the prompt is embedded: a bad option fails before the vision tower runs.
        settings = _settings(self, config, has_default_max, prompt_len, batch, input_ids.device, extras)
        if attention_mask is None:
            attention_mask = _infer_attention_mask(input_ids, config)
        prompt = _prepare_prompt(self, input_ids, attention_mask, media).repeat(config.num_return_sequences)
        if streamer is not None:
            streamer.put(prompt.input_ids.cpu())
        loop, length = _run(self, prompt, settings, streamer)
        if streamer is not None:
            streamer.end()
        return _output(loop, length, config)


def _output(loop: _Loop, length: int, config: GenerationConfig) -> torch.Tensor | GenerateOutput:
    sequences = loop.sequences[:, :length]
    if not config.return_dict_in_generate:
        return sequences
    return GenerateOutput(
        sequences=sequences,
        scores=tuple(loop.scores) if loop.scores is not None else None,
        logits=tuple(loop.logits) if loop.logits is not None else None,
    )
