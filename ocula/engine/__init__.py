"""The inference engine: continuous batching over token ids and media items; it knows no model family.

Modules: `config` (EngineConfig), `sampling_params` (SamplingParams), `request` (Request, Sequence,
MediaItem), `block_manager` (paged KV blocks, prefix cache), `scheduler` (continuous batching, chunked
prefill, preemption), `encoder_cache` (vision-embedding and processed-media caches), `model_runner`
(ScheduledBatch, ModelRunner), `paged_attention` (reference paged attention), `sampler`, `detokenizer`,
`engine` (LLMEngine), `async_engine` (AsyncLLMEngine), `outputs`, `testing` (fake runner + byte tokenizer).
Importing this package imports nothing else.
"""
