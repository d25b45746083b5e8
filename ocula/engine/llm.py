"""`LLM`: the offline API over the engine, shaped like vLLM's.

    from ocula import LLM, SamplingParams
    llm = LLM("path/to/checkpoint", dtype="bfloat16", max_num_seqs=32, max_model_len=8192)
    outs = llm.chat([conversation, ...], SamplingParams(max_tokens=64, temperature=0.0))
    outs = llm.generate([{"prompt": text, "multi_modal_data": {"image": [img1, img2]}}], params)
    outs[0].outputs[0].text, outs[0].outputs[0].token_ids, outs[0].metrics.ttft

Notable features:
- one model of any family, loaded with `AutoModelForImageTextToText` and its processor; prompts go through
  that processor exactly as the library path does (`apply_chat_template` then `process`), so the engine
  sees the same token ids as `model.generate` on the processor's outputs;
- conversations in transformers style (`{"type": "image", "url": ...}`) or OpenAI style (`image_url`);
  `generate` takes plain strings, `{"prompt": ..., "multi_modal_data": {"image": ..., "video": ...}}` or
  `{"prompt_token_ids": [...]}`;
- every request is validated before any is queued (a bad prompt fails the call, not half of it), then all
  run together under continuous batching, with a progress bar (tqdm when installed);
- a processed-media cache keyed by content hash: the same images (and options) sent again are not
  resized and normalised again (`LLM.processor` keeps it, so a server built on it shares it);
- `engine_media_items(processed)`: the engine's media items of one processed prompt, which the server uses.
"""

from __future__ import annotations

import hashlib
import itertools
import sys
import threading
from collections.abc import Sequence
from numbers import Integral
from pathlib import Path
from typing import Any

from ocula.engine.config import EngineConfig
from ocula.engine.encoder_cache import ProcessedMediaCache
from ocula.engine.engine import LLMEngine
from ocula.engine.model_runner import MediaPayload, TorchModelRunner
from ocula.engine.outputs import RequestOutput
from ocula.engine.request import MediaItem, Request
from ocula.engine.sampling_params import SamplingParams
from ocula.errors import ConfigError

PromptType = str | dict[str, Any]


def engine_media_items(processed: Any, sample: int = 0) -> list[MediaItem]:
    """The engine's media items of row `sample` of a `processor.process(...)` result.

    The engine key is the content hash plus what the processor derived from the call (token count, grid,
    pixel rows): the same pixels laid out differently (e.g. tiled alone, untiled next to other images)
    become different features, and must never share an encoder-cache entry or prefix-cache blocks.
    """
    items = []
    for item in processed.media:
        if item.sample != sample:
            continue
        if not item.content_hash:
            raise ConfigError("the processor outputs carry no media hashes: call processor.process(..., "
                              "hash_media=True) (the default) for the engine")
        payload = MediaPayload(processed.features, item)
        items.append(MediaItem(hash=_engine_hash(item), offset=item.offset, length=item.num_tokens,
                               payload=payload))
    return items


def _engine_hash(item: Any) -> str:
    rows = item.rows[1] - item.rows[0]
    layout = (item.content_hash, item.modality, item.num_tokens, tuple(item.grid_thw), rows)
    return hashlib.blake2b(repr(layout).encode(), digest_size=20).hexdigest()


class LLM:
    """An engine with its model and processor, for batch generation in one process."""

    def __init__(
        self,
        model: str | Path | Any,
        *,
        processor: Any = None,
        dtype: Any = "auto",
        device: Any = "auto",
        max_num_seqs: int = 32,
        max_model_len: int = 8192,
        max_num_batched_tokens: int | None = None,
        block_size: int = 16,
        kv_cache_tokens: int | None = None,
        num_kv_blocks: int | None = None,
        kv_cache_memory_fraction: float = 0.9,
        enable_prefix_caching: bool = True,
        enable_chunked_prefill: bool = True,
        long_prefill_token_threshold: int | None = None,
        encoder_cache_tokens: int = 16384,
        media_cache_bytes: int = 512 * 1024 * 1024,
        enforce_eager: bool = False,
        **load_kwargs: Any,
    ):
        """`model`: a checkpoint folder / hub id, or an already loaded ocula model (then pass `processor`).

        The KV pool: `kv_cache_tokens` (tokens), `num_kv_blocks` (blocks), or else `kv_cache_memory_fraction`
        of the free accelerator memory (on CPU: of a quarter of the available host memory), at most what
        max_num_seqs x max_model_len can use. `enforce_eager=True` runs every step eagerly (no CUDA graphs
        for decode steps on a GPU). `load_kwargs` go to the model's `from_pretrained`.
        """
        self.model, self.processor = _load(model, processor, dtype, device, load_kwargs)
        if kv_cache_tokens is not None:
            num_kv_blocks = -(-kv_cache_tokens // block_size)
        if max_num_batched_tokens is None:  # without chunking a whole prompt must fit one step
            max_num_batched_tokens = max(2048, max_num_seqs) if enable_chunked_prefill else max_model_len
        config = EngineConfig(
            max_num_seqs=max_num_seqs, max_model_len=max_model_len,
            max_num_batched_tokens=max_num_batched_tokens, block_size=block_size, num_kv_blocks=num_kv_blocks,
            kv_cache_memory_fraction=kv_cache_memory_fraction,
            enable_prefix_caching=enable_prefix_caching, enable_chunked_prefill=enable_chunked_prefill,
            long_prefill_token_threshold=long_prefill_token_threshold,
            encoder_cache_tokens=encoder_cache_tokens, media_cache_bytes=media_cache_bytes,
            cuda_graphs=not enforce_eager,
        )
        runner = TorchModelRunner(self.model, self.processor)
        self.engine = LLMEngine(runner, config, tokenizer=self.processor.tokenizer,
                                eos_token_id=_eos_ids(self.model, self.processor.tokenizer))
        _cache_media_processing(self.processor, self.engine.media_cache)
        self._ids = itertools.count()

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    def get_tokenizer(self) -> Any:
        """The tokenizer (vLLM's spelling)."""
        return self.processor.tokenizer

    # ---- public calls ----------------------------------------------------------------------------

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Complete each prompt: a string, `{"prompt", "multi_modal_data"}` or `{"prompt_token_ids"}`."""
        prompts = list(prompts) if isinstance(prompts, (list, tuple)) else [prompts]  # one prompt of any kind
        params = _per_prompt(sampling_params, len(prompts))
        requests = [self._request(self._prepare_prompt(p), sp) for p, sp in zip(prompts, params)]
        return self._run(requests, use_tqdm)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        *,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        **template_kwargs: Any,
    ) -> list[RequestOutput]:
        """Answer one conversation or a list of them (transformers-style or OpenAI-style messages)."""
        from ocula.processing_utils import normalize_conversations

        conversations, _ = normalize_conversations(messages)
        params = _per_prompt(sampling_params, len(conversations))
        options = {"chat_template": chat_template, "add_generation_prompt": add_generation_prompt,
                   "continue_final_message": continue_final_message, **template_kwargs}
        requests = [self._request(self._prepare_chat(c, options), sp) for c, sp in zip(conversations, params)]
        return self._run(requests, use_tqdm)

    # ---- prompts -> requests ---------------------------------------------------------------------

    def _prepare_chat(self, conversation: list[dict], options: dict[str, Any]) -> tuple[list[int], list]:
        """What `apply_chat_template(tokenize=True)` does, through `process` (for the media report)."""
        from ocula.processing_utils import collect_media

        text = self.processor.apply_chat_template(conversation, tokenize=False, **options)
        images, videos = collect_media([conversation])
        return self._process(text, images[0], videos[0])

    def _prepare_prompt(self, prompt: PromptType) -> tuple[list[int], list]:
        if isinstance(prompt, str):
            return self._process(prompt, [], [])
        if not isinstance(prompt, dict):
            raise ConfigError(f"a prompt must be a string or a dict, got {type(prompt).__name__}")
        if prompt.get("prompt_token_ids") is not None:
            if prompt.get("multi_modal_data"):
                raise ConfigError("prompt_token_ids with multi_modal_data is not supported: pass the text "
                                  "prompt with its placeholders so the processor can expand them")
            return self._checked_ids(prompt["prompt_token_ids"]), []
        if "prompt" not in prompt:
            raise ConfigError('a prompt dict needs "prompt" (text) or "prompt_token_ids"')
        data = prompt.get("multi_modal_data") or {}
        unknown = sorted(set(data) - {"image", "video"})
        if unknown:
            raise ConfigError(f"multi_modal_data keys {unknown} are not supported: use 'image' and 'video'")
        return self._process(prompt["prompt"], _as_list(data.get("image")), _as_list(data.get("video")))

    def _checked_ids(self, ids: Any) -> list[int]:
        vocab = self.model.get_input_embeddings().num_embeddings
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)  # a tensor / array row works too
        bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, Integral) or not 0 <= i < vocab]
        if bad:
            raise ConfigError(f"prompt_token_ids must be ints in [0, {vocab}) (the model's vocabulary); "
                              f"got {bad[:5]}")
        return [int(i) for i in ids]

    def _process(self, text: str, images: list, videos: list) -> tuple[list[int], list[MediaItem]]:
        bos = getattr(self.processor.tokenizer, "bos_token", None)
        # as apply_chat_template(tokenize=True): a rendered prompt that starts with BOS gets no second one
        kwargs = {"add_special_tokens": False} if bos and text.startswith(bos) else {}
        processed = self.processor.process(text=text, images=images or None, videos=videos or None,
                                           return_tensors="pt", **kwargs)
        ids = [int(i) for i in processed.features["input_ids"][0]]
        return ids, engine_media_items(processed)

    def _request(self, prepared: tuple[list[int], list[MediaItem]], params: SamplingParams) -> Request:
        ids, media = prepared
        return self.engine.make_request(str(next(self._ids)), ids, params, media)

    # ---- running ---------------------------------------------------------------------------------

    def _run(self, requests: list[Request], use_tqdm: bool) -> list[RequestOutput]:
        for request in requests:
            self.engine.add(request)
        wanted = {r.request_id for r in requests}
        final: dict[str, RequestOutput] = {}
        bar = _progress(len(requests), use_tqdm)
        try:
            while len(final) < len(requests) and self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.finished and out.request_id in wanted:
                        final[out.request_id] = out
                        bar.update(1)
        except BaseException:
            for request_id in wanted - set(final):
                self.engine.abort(request_id)
            raise
        finally:
            bar.close()
        return [final[r.request_id] for r in requests]


# ---- helpers ---------------------------------------------------------------------------------------


def _load(model: Any, processor: Any, dtype: Any, device: Any, load_kwargs: dict) -> tuple[Any, Any]:
    if isinstance(model, (str, Path)):
        from ocula.auto import AutoModelForImageTextToText, AutoProcessor

        processor = processor if processor is not None else AutoProcessor.from_pretrained(model)
        model = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype, device=device, **load_kwargs)
    elif processor is None:
        raise ConfigError("LLM(model_object) needs processor=...: pass the model's processor, or give LLM "
                          "the checkpoint path so it loads both")
    return model, processor


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """The ids `generate()` stops on: the generation config's eos, else the model config's, else the
    tokenizer's."""
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            return [eos] if isinstance(eos, int) else list(eos)
    return []


def _per_prompt(params: SamplingParams | Sequence[SamplingParams] | None, count: int) -> list[SamplingParams]:
    if params is None or isinstance(params, SamplingParams):
        return [params or SamplingParams()] * count
    params = list(params)
    if len(params) != count:
        raise ConfigError(f"{len(params)} sampling params for {count} prompts: give one, or one per prompt")
    return params


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


class _CachedMediaRun:
    """An image / video processor's `run`, served from the processed-media cache (keyed by the content hash
    of the decoded pixels and the options) when the same media come again, instead of resized again."""

    def __init__(self, run: Any, cache: ProcessedMediaCache):
        self._run, self._cache, self._lock = run, cache, threading.Lock()

    def __call__(self, items: Any, return_tensors: Any = None, **options: Any) -> dict:
        from ocula.media import media_hash

        key = media_hash(_pixels(items), tensors=str(return_tensors), options=repr(sorted(options.items())),
                         meta=repr(_metadata(items)))
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None:
            return dict(hit)
        out = self._run(items, return_tensors, **options)
        with self._lock:
            self._cache.put(key, dict(out))
        return out


def _pixels(items: Any) -> Any:
    if isinstance(items, (list, tuple)):
        return [_pixels(x) for x in items]
    return getattr(items, "frames", items)


def _metadata(items: Any) -> Any:
    if isinstance(items, (list, tuple)):
        return [_metadata(x) for x in items]
    return getattr(items, "metadata", None)


def _cache_media_processing(processor: Any, cache: ProcessedMediaCache) -> None:
    """Route the processor's media `run` calls through the cache (the instance keeps its own class)."""
    if cache.capacity <= 0:
        return
    for name in ("image_processor", "video_processor"):
        part = getattr(processor, name, None)
        if part is not None and hasattr(part, "run") and not isinstance(part.run, _CachedMediaRun):
            part.run = _CachedMediaRun(part.run, cache)


class _SimpleBar:
    """A progress line on stderr when tqdm is not installed."""

    def __init__(self, total: int):
        self.total, self.done = total, 0
        self._draw()

    def update(self, n: int) -> None:
        self.done += n
        self._draw()

    def close(self) -> None:
        sys.stderr.write("\n")

    def _draw(self) -> None:
        sys.stderr.write(f"\rProcessed prompts: {self.done}/{self.total}")
        sys.stderr.flush()


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _SimpleBar(total)
    return tqdm(total=total, desc="Processed prompts", dynamic_ncols=True)


__all__ = ["LLM", "SamplingParams", "engine_media_items"]

