"""The inference engine: continuous batching over token ids and media items; it knows no model family.

Modules: `config` (EngineConfig), `sampling_params` (SamplingParams), `request` (Request, Sequence,
MediaItem), `block_manager` (paged KV blocks, prefix cache), `scheduler` (continuous batching, chunked
prefill, preemption), `encoder_cache` (vision-embedding and processed-media caches), `model_runner`
(ScheduledBatch, ModelRunner, and TorchModelRunner for the real models), `paged_attention` (paged attention
with batched decode), `sampler` (the library's sampling, batched per step), `detokenizer`, `engine`
(LLMEngine), `async_engine` (AsyncLLMEngine), `llm` (the offline `LLM` API and `engine_media_items`),
`outputs`, `testing` (fake runner + byte tokenizer).
Importing this package imports nothing else.
"""
