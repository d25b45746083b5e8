"""`LLMEngine`: continuous batching over token ids and media items, one `step()` at a time.

    engine = LLMEngine(runner, EngineConfig(num_kv_blocks=512), tokenizer=tok)
    engine.add_request("a", prompt_ids, SamplingParams(max_tokens=32), media=[MediaItem(...)])
    while engine.has_unfinished():
        for out in engine.step(): ...

A step: the scheduler picks chunks under the token budget -> media features come from the encoder cache
(or are encoded in one batched call; an item halfway through a chunked prefill stays pinned) -> the runner
returns logits for the sequences that reached their end -> sampling, incremental detokenisation, stop
checks; finished sequences free their KV blocks at once.

Notable features: every sampled row of a step is sampled in one batched call of the library's sampler
(transformers' processor order); n > 1 shares one prefill (the sequence is forked when its first token is
sampled, its blocks shared by reference count); stop strings cut from the text and held back while
streaming; raw logprobs; the engine knows no model family and no tokenizer internals (the tokenizer is
injected and only `decode` / `eos_token_id` are used).
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import torch

from ocula.engine.block_manager import BlockManager
from ocula.engine.config import EngineConfig
from ocula.engine.detokenizer import IncrementalDetokenizer
from ocula.engine.encoder_cache import EncoderCache, ProcessedMediaCache
from ocula.engine.model_runner import ModelRunner, ScheduledBatch
from ocula.engine.outputs import CompletionOutput, EngineStats, RequestOutput
from ocula.engine.request import MediaItem, Request, Sequence, SequenceStatus
from ocula.engine.sampler import sample_tokens
from ocula.engine.sampling_params import SamplingParams
from ocula.engine.scheduler import Scheduler
from ocula.errors import ConfigError, PlaceholderMismatchError, RequestTooLargeError


class LLMEngine:
    def __init__(self, runner: ModelRunner, config: EngineConfig | None = None, tokenizer: Any = None,
                 eos_token_id: int | list[int] | None = None):
        self.config = config or EngineConfig()
        self.runner = runner
        self.tokenizer = tokenizer
        eos = eos_token_id if eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
        self.eos_token_ids = set([eos] if isinstance(eos, int) else eos or [])
        num_blocks = runner.init_kv_cache(self.config)
        config = self.config
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.config, self.block_manager)
        self.encoder_cache = EncoderCache(config.encoder_cache_tokens)
        self.media_cache = ProcessedMediaCache(config.media_cache_bytes)  # for front ends that process media
        self.requests: dict[str, Request] = {}
        self._detok: dict[int, IncrementalDetokenizer] = {}
        self._pinned: dict[str, torch.Tensor] = {}  # features of items a chunked prefill is halfway through
        self._seq_ids = itertools.count()

    # ---- requests ------------------------------------------------------------------------------

    def make_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | None = None,
                     media: list[MediaItem] | None = None) -> Request:
        """Validate and build a request without queueing it (raises before anything changes)."""
        params = params or SamplingParams()
        self._check_request(request_id, prompt_token_ids, params, media or [])
        room = self.config.max_model_len - len(prompt_token_ids)
        max_tokens = min(params.max_tokens or room, room)
        self.scheduler.check_fits(len(prompt_token_ids) + max_tokens)
        request = Request(request_id, prompt_token_ids, params, media, max_tokens=max_tokens)
        request.mrope_positions, request.position_delta = self.runner.init_positions(request)
        return request

    def add(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ConfigError(f"request id {request.request_id!r} is already running; use a unique id")
        self.requests[request.request_id] = request
        seq = Sequence(next(self._seq_ids), request, 0, request.prompt_token_ids)
        request.sequences.append(seq)
        self.scheduler.add(seq)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | None = None,
                    media: list[MediaItem] | None = None) -> Request:
        request = self.make_request(request_id, prompt_token_ids, params, media)
        self.add(request)
        return request

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its KV blocks; returns its final output (None if unknown)."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        request.forked = True
        for seq in request.sequences:
            if not seq.is_finished:
                self._finish(seq, SequenceStatus.FINISHED_ABORTED)
        output = self._output(request)
        self._forget(request)
        return output

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        sched, blocks, enc = self.scheduler, self.block_manager, self.encoder_cache
        return EngineStats(
            num_running=len(sched.running), num_waiting=len(sched.waiting),
            num_preemptions=sched.num_preemptions,
            kv_blocks_total=blocks.num_blocks, kv_blocks_free=blocks.num_free_blocks,
            prefix_cache_hit_rate=sched.prefix_hit_tokens / max(sched.prefix_queried_tokens, 1),
            encoder_cache_hits=enc.hits, encoder_cache_misses=enc.misses,
        )

    def _check_request(self, request_id: str, prompt: list[int], params: SamplingParams,
                       media: list[MediaItem]) -> None:
        if request_id in self.requests:
            raise ConfigError(f"request id {request_id!r} is already running; use a unique id")
        if not prompt:
            raise ConfigError("the prompt is empty; give at least one token")
        if len(prompt) >= self.config.max_model_len:
            raise RequestTooLargeError(
                f"the prompt has {len(prompt)} tokens but max_model_len is {self.config.max_model_len}, "
                "leaving no room to generate; shorten the prompt or raise max_model_len"
            )
        if params.n > self.config.max_num_seqs:
            raise RequestTooLargeError(
                f"n={params.n} completions need {params.n} sequence slots but max_num_seqs is "
                f"{self.config.max_num_seqs}; lower n or raise max_num_seqs"
            )
        if params.stop and self.tokenizer is None:
            raise ConfigError("stop strings need a tokenizer: give the engine one, or use stop_token_ids")
        _check_media(media, len(prompt))

    # ---- one step ------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        self._attach_media_features(batch)
        logits = self.runner.execute(batch)  # [S, V]
        self.scheduler.update_computed(batch)
        seqs, rows = [], []
        for index, scheduled in enumerate(batch.sampled):
            forked = [scheduled.seq] if scheduled.seq.request.forked else self._fork(scheduled.seq)
            seqs += forked
            rows += [index] * len(forked)
        if seqs:
            picks = sample_tokens(logits[rows], seqs, [self._banned(s) for s in seqs])  # one batched call
            for seq, (token, logprobs) in zip(seqs, picks):
                self._append(seq, token, logprobs)
        touched = {seq.request.request_id: seq.request for seq in seqs}
        return [self._collect(request) for request in touched.values()]

    def _attach_media_features(self, batch: ScheduledBatch) -> None:
        """Fill `batch.media_features` from the encoder cache, encoding the misses in one call.

        An item whose placeholders continue in a later chunk stays pinned until its last rows run, so a
        chunked prefill never encodes it twice, even when the LRU cache evicts it (or it is too big for it).
        """
        missing = []
        for item in {sl.item.hash: sl.item for sl in batch.media}.values():
            features = self._pinned.get(item.hash)
            if features is None:
                features = self.encoder_cache.get(item.hash)
            if features is None:
                missing.append(item)
            else:
                batch.media_features[item.hash] = _checked(item, features)
        if missing:
            for item, features in zip(missing, self.runner.encode_media(missing), strict=True):
                batch.media_features[item.hash] = _checked(item, features)
                self.encoder_cache.put(item.hash, features)
        for sl in batch.media:
            if sl.row_end < sl.item.length:
                self._pinned[sl.item.hash] = batch.media_features[sl.item.hash]
            else:
                self._pinned.pop(sl.item.hash, None)

    def _banned(self, seq: Sequence) -> list[int]:
        """Before `min_tokens`, EOS and stop ids cannot be sampled."""
        params = seq.request.params
        if seq.num_output_tokens >= params.min_tokens:
            return []
        eos = [] if params.ignore_eos else sorted(self.eos_token_ids)
        return eos + list(params.stop_token_ids)

    def _fork(self, parent: Sequence) -> list[Sequence]:
        """n > 1: after the shared prefill, the n - 1 other completions start from the parent's blocks."""
        request = parent.request
        for index in range(1, request.params.n):
            child = Sequence(next(self._seq_ids), request, index, parent.token_ids)
            self.scheduler.fork(parent, child)
            request.sequences.append(child)
        request.forked = True
        return list(request.sequences)

    def _append(self, seq: Sequence, token: int, logprobs: dict[int, float] | None) -> None:
        seq.token_ids.append(token)
        metrics = seq.request.metrics
        metrics.num_generated_tokens += 1
        if metrics.first_token_time is None:
            metrics.first_token_time = time.monotonic()
        if logprobs is not None:
            seq.logprobs.append(logprobs)
            seq.cumulative_logprob += logprobs[token]
        detok = self._detokenizer(seq)
        new_chars = len(detok.add(token)) if detok is not None else 0
        status = self._stop_status(seq, token, new_chars)
        if status is not None:
            self._finish(seq, status)

    def _detokenizer(self, seq: Sequence) -> IncrementalDetokenizer | None:
        if self.tokenizer is None:
            return None
        if seq.seq_id not in self._detok:
            skip, prompt = seq.request.params.skip_special_tokens, seq.request.prompt_token_ids
            self._detok[seq.seq_id] = IncrementalDetokenizer(self.tokenizer, prompt, skip)
        return self._detok[seq.seq_id]

    def _stop_status(self, seq: Sequence, token: int, new_chars: int) -> SequenceStatus | None:
        """Why `seq` ends after `token` (None: it goes on); as vLLM: EOS, stop ids, strings, length."""
        params, request = seq.request.params, seq.request
        if seq.num_output_tokens >= params.min_tokens:
            if token in self.eos_token_ids and not params.ignore_eos:
                return SequenceStatus.FINISHED_STOPPED
            if token in params.stop_token_ids:
                seq.stop_reason = token
                return SequenceStatus.FINISHED_STOPPED
            if params.stop and new_chars and self._cut_stop_string(seq, new_chars):
                return SequenceStatus.FINISHED_STOPPED
        if seq.num_output_tokens >= request.max_tokens or seq.num_tokens >= self.config.max_model_len:
            return SequenceStatus.FINISHED_LENGTH
        return None

    def _cut_stop_string(self, seq: Sequence, new_chars: int) -> bool:
        """Find a stop string that ends in the new text; cut the text there."""
        detok = self._detok[seq.seq_id]
        params = seq.request.params
        start = max(len(detok.text) - new_chars - params.max_stop_len + 1, 0)
        for stop in params.stop:
            pos = detok.text.find(stop, start)
            if pos >= 0:
                detok.text = detok.text[:pos + len(stop) if params.include_stop_str_in_output else pos]
                seq.stop_reason = stop
                return True
        return False

    def _finish(self, seq: Sequence, status: SequenceStatus) -> None:
        self.scheduler.finish(seq, status)
        if seq.request.is_finished:
            seq.request.metrics.finish_time = time.monotonic()

    # ---- outputs -------------------------------------------------------------------------------

    def _collect(self, request: Request) -> RequestOutput:
        output = self._output(request)
        if output.finished:
            self._forget(request)
        return output

    def _forget(self, request: Request) -> None:
        self.requests.pop(request.request_id, None)
        for item in request.media:
            self._pinned.pop(item.hash, None)
        for seq in request.sequences:
            self._detok.pop(seq.seq_id, None)

    def _output(self, request: Request) -> RequestOutput:
        completions = [self._completion(seq) for seq in sorted(request.sequences, key=lambda s: s.index)]
        return RequestOutput(
            request_id=request.request_id, prompt_token_ids=request.prompt_token_ids, outputs=completions,
            finished=request.is_finished, metrics=request.metrics,
            num_cached_tokens=request.sequences[0].num_cached_tokens,
        )

    def _completion(self, seq: Sequence) -> CompletionOutput:
        params = seq.request.params
        detok = self._detok.get(seq.seq_id)
        text = detok.text if detok is not None else ""
        if not seq.is_finished and params.stop:
            text = text[:max(len(text) - params.max_stop_len + 1, 0)]  # a stop string may still complete
        return CompletionOutput(
            index=seq.index, text=text, token_ids=list(seq.output_token_ids),
            finish_reason=seq.status.value if seq.is_finished else None, stop_reason=seq.stop_reason,
            logprobs=list(seq.logprobs) if params.logprobs is not None else None,
            cumulative_logprob=seq.cumulative_logprob if params.logprobs is not None else None,
        )


def _check_media(media: list[MediaItem], prompt_len: int) -> None:
    """Placeholder ranges must lie inside the prompt and not overlap."""
    end = 0
    for item in sorted(media, key=lambda m: m.offset):
        if item.length <= 0 or item.offset < end or item.end > prompt_len:
            raise PlaceholderMismatchError(
                f"media item {item.hash[:12]} claims prompt tokens [{item.offset}, {item.end}) but the "
                f"prompt has {prompt_len} tokens and earlier items end at {end}; recompute the offsets"
            )
        end = item.end



def _checked(item: MediaItem, features: torch.Tensor) -> torch.Tensor:
    """One feature row per placeholder token, or the request would silently read the wrong rows."""
    if features.shape[0] != item.length:
        raise PlaceholderMismatchError(
            f"media item {item.hash[:12]} has {item.length} placeholder tokens but its features have "
            f"{features.shape[0]} rows; the media hash must cover every processing option that changes the "
            "token count, and the placeholder count must come from the same processor"
        )
    return features
