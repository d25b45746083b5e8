"""Engine configuration: batch limits, the paged KV cache, prefix caching, chunked prefill and media caches.

Every limit is checked once here, so the scheduler can trust it (a user gets a `ConfigError` naming the
field and what to change, never an assert).
"""

from __future__ import annotations

from dataclasses import dataclass

from ocula.errors import ConfigError


@dataclass
class EngineConfig:
    # Most sequences (requests x n) decoded together in one step.
    max_num_seqs: int = 64
    # Longest sequence (prompt + generated tokens) a request may reach.
    max_model_len: int = 4096
    # Token budget of one step: decode tokens (1 per running sequence) plus prefill chunks.
    max_num_batched_tokens: int = 2048
    # Tokens per KV block.
    block_size: int = 16
    # Size of the KV block pool; None lets the model runner size it from `kv_cache_memory_fraction`.
    num_kv_blocks: int | None = None
    # Fraction of free accelerator memory the runner may give to the KV pool when `num_kv_blocks` is None.
    kv_cache_memory_fraction: float = 0.9
    # Reuse KV blocks of identical prefixes (token ids + media hashes), chained block by block.
    enable_prefix_caching: bool = True
    # Split long prompts into chunks that share steps with decoding sequences.
    enable_chunked_prefill: bool = True
    # Most prompt tokens of one sequence per step (None: the whole step budget). Smaller values keep
    # decode latency of other requests steady while a huge prompt is prefilled.
    long_prefill_token_threshold: int | None = None
    # Vision-embedding cache size, in media tokens (rows of features), keyed by media hash.
    encoder_cache_tokens: int = 16384
    # Processed-media cache size in bytes (pixel tensors keyed by media hash).
    media_cache_bytes: int = 512 * 1024 * 1024
    # On a CUDA device, replay pure decode steps from captured CUDA graphs (ignored on other devices).
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_model_len", "max_num_batched_tokens", "block_size"):
            _check_positive(name, getattr(self, name))
        if self.num_kv_blocks is not None:
            _check_positive("num_kv_blocks", self.num_kv_blocks)
        if self.long_prefill_token_threshold is not None:
            _check_positive("long_prefill_token_threshold", self.long_prefill_token_threshold)
        if not 0.0 < self.kv_cache_memory_fraction <= 1.0:
            raise ConfigError(
                f"kv_cache_memory_fraction={self.kv_cache_memory_fraction} must be in (0, 1]; "
                "pass e.g. 0.9 or set num_kv_blocks directly"
            )
        if self.encoder_cache_tokens < 0 or self.media_cache_bytes < 0:
            raise ConfigError("encoder_cache_tokens and media_cache_bytes must be >= 0 (0 disables a cache)")
        self._check_budget()

    def _check_budget(self) -> None:
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ConfigError(
                f"max_num_batched_tokens={self.max_num_batched_tokens} is smaller than max_num_seqs="
                f"{self.max_num_seqs}: every running sequence needs one token per step; raise the budget"
            )
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ConfigError(
                f"without chunked prefill a whole prompt must fit one step: max_num_batched_tokens="
                f"{self.max_num_batched_tokens} < max_model_len={self.max_model_len}; enable chunked "
                "prefill or raise max_num_batched_tokens"
            )

    def kv_blocks_for_memory(self, free_bytes: int, bytes_per_block: int) -> int:
        """Blocks a runner may allocate: `num_kv_blocks`, or the memory fraction of `free_bytes`.

        `bytes_per_block` = 2 (K and V) x layers x block_size x kv_heads x head_dim x dtype bytes.
        """
        if self.num_kv_blocks is not None:
            return self.num_kv_blocks
        blocks = int(free_bytes * self.kv_cache_memory_fraction) // bytes_per_block
        if blocks < 1:
            raise ConfigError(
                f"no memory left for the KV cache ({free_bytes} bytes free, {bytes_per_block} per block); "
                "raise kv_cache_memory_fraction, set num_kv_blocks, or use a smaller model / dtype"
            )
        return blocks

    @property
    def prefill_chunk_size(self) -> int:
        """Most prompt tokens one sequence may run in a single step."""
        if not self.enable_chunked_prefill:
            return self.max_model_len
        return self.long_prefill_token_threshold or self.max_num_batched_tokens


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value <= 0:
        raise ConfigError(f"EngineConfig.{name}={value!r} must be a positive integer")
