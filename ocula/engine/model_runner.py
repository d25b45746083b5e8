"""The engine's view of a model: `ScheduledBatch` in, logits for the sampled positions out.

The engine knows no model family. A runner wraps a model through the model contract
(docs/architecture.md): `get_media_features` for `encode_media`, then `embed_inputs`, `forward_text` with
the batch's `PagedAttentionMetadata`, and `compute_logits` on the rows in `sample_indices`.

Notable features of the batch layout:
- all new tokens of all sequences flattened into one row of T tokens (no padding);
- positions per token: 1-D [T], or M-RoPE [3, T] taken from the positions each request computed once at
  admission (prompt tokens) or `index + position_delta` (generated tokens);
- media slices say which rows of which item's features fill which placeholder tokens of this step, so a
  placeholder range split across chunks still gets the right feature rows.

`TorchModelRunner` is the real runner: any ocula `*ForConditionalGeneration`, through the model contract only
(no family names):
- the paged KV pool is shaped from the model's own `new_kv_cache` (layers, KV heads, head dim, dtype) and
  sized from `num_kv_blocks` or a fraction of free memory (on CPU: of a quarter of the available host
  memory), capped at what `max_num_seqs` sequences of `max_model_len` tokens can use;
- media are encoded one item at a time from the processor outputs of their prompt (`MediaPayload`), with
  the family's own per-item hook when it has one, so the engine's encoder cache keys each item by its hash;
- positions (M-RoPE or 1-D) come from `get_position_ids` on the single request, once, at admission;
- a step is one forward over all new tokens of all sequences (`[1, T]`): token embeddings, media rows
  scattered in, `forward_text` with the paged metadata, logits of the sampled rows only;
- on a CUDA device, pure decode steps replay captured CUDA graphs (`cuda_graphs.py`; off with
  `EngineConfig.cuda_graphs = False`, vLLM's `enforce_eager`).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ocula.engine.config import EngineConfig
from ocula.engine.cuda_graphs import DecodeGraphs
from ocula.engine.paged_attention import PagedAttentionMetadata, PagedKVCache
from ocula.engine.request import MediaItem, Request, Sequence
from ocula.errors import PlaceholderMismatchError, UnsupportedFeatureError


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int     # tokens run this step, starting at seq.num_computed_tokens
    start: int              # seq.num_computed_tokens when scheduled
    sample: bool            # the chunk reaches the end of the sequence: its last logits are sampled


@dataclass
class MediaSlice:
    item: MediaItem
    row_start: int          # first feature row of the item used this step
    row_end: int            # one past the last row
    token_index: int        # index in the flattened batch of the first placeholder token it fills


@dataclass
class ScheduledBatch:
    seqs: list[ScheduledSeq]
    input_ids: torch.Tensor          # [T] long
    positions: torch.Tensor          # [T] long, or [3, T] for M-RoPE
    attn: PagedAttentionMetadata
    sample_indices: torch.Tensor     # [S] long: rows of T whose logits are returned, in `sampled` order
    media: list[MediaSlice]
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write before the forward
    media_features: dict[str, torch.Tensor] = field(default_factory=dict)  # item hash -> [length, hidden]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def sampled(self) -> list[ScheduledSeq]:
        return [s for s in self.seqs if s.sample]


class ModelRunner(ABC):
    """What the engine needs from a model. Implementations own the KV pool and the device."""

    @abstractmethod
    def init_kv_cache(self, config: EngineConfig) -> int:
        """Allocate the KV pool (`config.num_kv_blocks` or sized from memory) and return its block count."""

    @abstractmethod
    def encode_media(self, items: list[MediaItem]) -> list[torch.Tensor]:
        """Vision features per item, [item.length, hidden] each (batched across items where possible)."""

    @abstractmethod
    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        """Run one step; return float logits [len(batch.sample_indices), vocab]."""

    def init_positions(self, request: Request) -> tuple[torch.Tensor | None, int]:
        """Positions computed once at admission: ([3, P] M-RoPE positions or None for 1-D, delta)."""
        return None, 0


def build_batch(
    scheduled: list[ScheduledSeq], block_size: int, copies: list[tuple[int, int]]
) -> ScheduledBatch:
    """Flatten the scheduled chunks into the tensors a runner consumes."""
    ids, slots, media = [], [], []
    qsl, sample_indices = [0], []
    use_mrope = any(s.seq.request.mrope_positions is not None for s in scheduled)
    positions: tuple[list[int], ...] = ([], [], []) if use_mrope else ([],)  # one list per position row
    for s in scheduled:
        lo, hi = s.start, s.start + s.num_new_tokens
        media += _media_slices(s.seq.request, lo, hi, qsl[-1])
        ids += s.seq.token_ids[lo:hi]
        _extend_positions(positions, s.seq.request, lo, hi)
        slots += [s.seq.block_table[i // block_size] * block_size + i % block_size for i in range(lo, hi)]
        qsl.append(qsl[-1] + s.num_new_tokens)
        if s.sample:
            sample_indices.append(qsl[-1] - 1)
    attn = PagedAttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.long),
        block_tables=_pad_tables([s.seq.block_table for s in scheduled]),
        context_lens=torch.tensor([s.start + s.num_new_tokens for s in scheduled], dtype=torch.long),
        query_start_loc=torch.tensor(qsl, dtype=torch.long),
    )
    return ScheduledBatch(
        seqs=scheduled, input_ids=torch.tensor(ids, dtype=torch.long),
        positions=torch.tensor(positions if use_mrope else positions[0], dtype=torch.long),
        attn=attn, sample_indices=torch.tensor(sample_indices, dtype=torch.long), media=media,
        block_copies=copies,
    )


def _extend_positions(rows: tuple[list[int], ...], request: Request, lo: int, hi: int) -> None:
    """Append the positions of tokens [lo, hi) to `rows`: one row (1-D RoPE) or three (M-RoPE).

    Prompt tokens take the positions computed at admission; generated tokens (and every token of a
    request without precomputed positions) continue at `index + position_delta` in all rows. Plain Python
    lists: a decode step appends one number per row per sequence, with no tensor work per sequence.
    """
    pre = request.mrope_positions if len(rows) == 3 else None
    n = 0 if pre is None else max(0, min(hi, pre.shape[1]) - lo)
    if n:
        for row, values in zip(rows, pre[:, lo:lo + n].tolist()):
            row.extend(values)
    delta = request.position_delta if len(rows) == 3 else 0
    tail = range(lo + n + delta, hi + delta)
    for row in rows:
        row.extend(tail)


def _media_slices(request: Request, lo: int, hi: int, base: int) -> list[MediaSlice]:
    out = []
    for item in request.media_in(lo, hi):
        start, end = max(lo, item.offset), min(hi, item.end)
        out.append(MediaSlice(item, start - item.offset, end - item.offset, base + start - lo))
    return out


def _pad_tables(tables: list[list[int]]) -> torch.Tensor:
    width = max((len(t) for t in tables), default=0)
    padded = [t + [0] * (width - len(t)) for t in tables]
    return torch.tensor(padded, dtype=torch.long).view(len(tables), width)


def gather_media_features(
    batch: ScheduledBatch, placeholder_ids: set[int] | None = None
) -> dict[int, torch.Tensor]:
    """Feature rows for this step's placeholder tokens, grouped by placeholder token id, in token order.

    This is the `media_features` argument of the model contract's `embed_inputs`: for each placeholder id,
    the rows that replace its occurrences in `batch.input_ids`, in the order they occur.
    """
    groups: dict[int, list[torch.Tensor]] = {}
    for sl in sorted(batch.media, key=lambda m: m.token_index):
        token_id = int(batch.input_ids[sl.token_index])
        if placeholder_ids is not None and token_id not in placeholder_ids:
            continue
        groups.setdefault(token_id, []).append(batch.media_features[sl.item.hash][sl.row_start:sl.row_end])
    return {tid: torch.cat(rows) for tid, rows in groups.items()}


def media_rows(batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(indices [N] into the flattened tokens, feature rows [N, hidden]) of this step's media tokens.

    The family-free alternative to `gather_media_features`: scatter the rows into the input embeddings at
    those indices (`embeds[indices] = rows`). None when the step has no media tokens.
    """
    if not batch.media:
        return None
    indices, rows = [], []
    for sl in batch.media:
        indices.append(torch.arange(sl.token_index, sl.token_index + sl.row_end - sl.row_start))
        rows.append(batch.media_features[sl.item.hash][sl.row_start:sl.row_end])
    return torch.cat(indices), torch.cat(rows)


# ------------------------------------------------------------------------------------------ real runner


@dataclass(frozen=True)
class MediaPayload:
    """What an engine `MediaItem` carries for `TorchModelRunner`: its prompt's processor outputs and its entry
    in the processor's media report (`ocula.processing_utils.MediaItem`: modality, index, rows, grid)."""

    features: Mapping[str, Any]   # the prompt's processor outputs (shared by all its items)
    item: Any                     # the processor's report entry for this item


class TorchModelRunner(ModelRunner):
    """Runs an ocula model through the model contract of docs/architecture.md on one device."""

    def __init__(self, model: Any, processor: Any = None):
        self.model = model
        self.processor = processor
        probe = model.new_kv_cache(1, 1)  # [layers, 1, kv_heads, 1, head_dim]: the pool's shape and dtype
        self.num_layers, _, self.num_kv_heads, _, self.head_dim = probe.k.shape
        self.kv_dtype, self.device = probe.k.dtype, probe.k.device
        self.kv: PagedKVCache | None = None
        self.graphs: DecodeGraphs | None = None

    # ---- KV pool ---------------------------------------------------------------------------------

    def init_kv_cache(self, config: EngineConfig) -> int:
        per_block = 2 * self.num_layers * config.block_size * self.num_kv_heads * self.head_dim
        per_block *= torch.empty(0, dtype=self.kv_dtype).element_size()
        num_blocks = config.kv_blocks_for_memory(_free_memory(self.device), per_block)
        if config.num_kv_blocks is None:
            useful = config.max_num_seqs * -(-config.max_model_len // config.block_size)
            num_blocks = min(num_blocks, useful)  # more blocks than this could only ever hold stale prefixes
        # One block more than the engine is told of: the scratch block that padding rows of captured
        # decode steps write to and read from.
        shape = (self.num_layers, num_blocks + 1, config.block_size, self.num_kv_heads, self.head_dim)
        self.kv = PagedKVCache(*shape, dtype=self.kv_dtype, device=self.device)
        self.graphs = None
        if config.cuda_graphs and self.device.type == "cuda":
            self.enable_decode_graphs(config, capture=True)
        return num_blocks

    def enable_decode_graphs(self, config: EngineConfig, capture: bool = True, **options: Any) -> None:
        """Run pure decode steps through `DecodeGraphs`: captured CUDA graphs, or (capture=False, any device)
        the same static-shape step called eagerly. `options` go to `DecodeGraphs` (`min_keys`)."""
        self.graphs = DecodeGraphs(self.model, self.kv, scratch_block=self.kv.num_blocks - 1,
                                   max_num_seqs=config.max_num_seqs, max_model_len=config.max_model_len,
                                   capture=capture, **options)

    # ---- media -----------------------------------------------------------------------------------

    @torch.inference_mode()
    def encode_media(self, items: list[MediaItem]) -> list[torch.Tensor]:
        """Features per item. Items without a family hook are packed along dim 0 into one vision call per
        modality (their rows and grids concatenate); hooked items are encoded one by one."""
        out: dict[int, torch.Tensor] = {}
        packed: dict[str, list[int]] = {}
        for index, item in enumerate(items):
            if self._has_hook:
                out[index] = self._features(self.item_inputs(_payload(item)), item)
            else:
                packed.setdefault(_payload(item).item.modality, []).append(index)
        for indices in packed.values():
            out.update(self._encode_packed([items[i] for i in indices], indices))
        return [out[i] for i in range(len(items))]

    def _encode_packed(self, items: list[MediaItem], indices: list[int]) -> dict[int, torch.Tensor]:
        inputs = [sliced_item_inputs(_payload(item).features, _payload(item).item) for item in items]
        if len(items) == 1 or any(set(x) != set(inputs[0]) for x in inputs):
            return {i: self._features(x, item) for i, x, item in zip(indices, inputs, items)}
        merged = {key: torch.cat([x[key] for x in inputs]) for key in inputs[0]}
        rows = self._features(merged, items[0], expected=sum(item.length for item in items))
        return dict(zip(indices, rows.split([item.length for item in items])))

    def _features(self, inputs: dict[str, Any], item: MediaItem, expected: int | None = None) -> torch.Tensor:
        inputs = {key: self._to_device(value) for key, value in inputs.items()}
        features = self.model.get_media_features(**inputs)  # {placeholder id: [n_tokens, hidden]}
        token_id = getattr(_payload(item).item, "token_id", None)
        if token_id in features:
            rows = features[token_id]
        elif len(features) == 1:
            rows = next(iter(features.values()))
        else:
            raise PlaceholderMismatchError(
                f"encoding media item {item.hash[:12]} gave features for token ids {sorted(features)}; "
                "expected exactly one placeholder id: the processor report and the model disagree"
            )
        if expected is not None and rows.shape[0] != expected:
            raise PlaceholderMismatchError(
                f"packed media items expect {expected} feature rows in all but the model gave {rows.shape[0]}"
            )
        return rows

    @property
    def _has_hook(self) -> bool:
        return hasattr(self.processor, "media_inputs") or hasattr(self.model, "item_inputs")

    def item_inputs(self, payload: MediaPayload) -> dict[str, Any]:
        """The `get_media_features` arguments that encode only this item (its family's hook if it has one)."""
        hook = getattr(self.processor, "media_inputs", None)
        if hook is not None:
            return hook(payload.features, payload.item)
        hook = getattr(self.model, "item_inputs", None)
        if hook is not None:
            return hook(payload.features, payload.item.modality, payload.item.index)
        return sliced_item_inputs(payload.features, payload.item)

    def _to_device(self, value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        dtype = self.kv_dtype if value.is_floating_point() else None  # pixels in the model's dtype
        return value.to(self.device, dtype=dtype)

    # ---- positions -------------------------------------------------------------------------------

    def init_positions(self, request: Request) -> tuple[torch.Tensor | None, int]:
        """M-RoPE ([3, P] positions, delta) from the model for this request alone; (None, 0) for 1-D RoPE."""
        ids = torch.tensor(request.prompt_token_ids, dtype=torch.long)[None]  # [1, P]
        features = _prompt_features(request)
        extra = {k: v for k, v in features.items() if k not in ("input_ids", "attention_mask")}
        positions, delta = self.model.get_position_ids(ids, None, **extra)
        delta = int(torch.as_tensor(delta).reshape(-1)[0])
        if positions.dim() == 3:
            return positions[:, 0].cpu(), delta  # [3, P]
        if delta != 0 or not torch.equal(positions[0].cpu(), torch.arange(ids.shape[1])):
            raise UnsupportedFeatureError(
                "the model's 1-D positions are not 0..P-1 for an unpadded prompt; the engine carries only "
                "index positions for 1-D RoPE models"
            )
        return None, 0

    # ---- one step --------------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        self.kv.copy_blocks(batch.block_copies)
        if self.graphs is not None and self.graphs.accepts(batch):
            return self.graphs.run(batch)
        attn = self._device_metadata(batch.attn)
        ids = batch.input_ids.to(self.device)
        embeds = self.model.embed_inputs(ids[None], None)  # [1, T, hidden]
        media = media_rows(batch)
        if media is not None:
            index, rows = media
            embeds[0, index.to(self.device)] = rows.to(self.device, embeds.dtype)
        positions = batch.positions.to(self.device)
        positions = positions[None] if positions.dim() == 1 else positions[:, None]  # [1, T] or [3, 1, T]
        hidden = self.model.forward_text(embeds, positions, attn)  # [1, T, hidden]
        rows = hidden[0, batch.sample_indices.to(self.device)]  # [S, hidden]: logits of sampled rows only
        return self.model.compute_logits(rows).float()  # [S, V]

    def _device_metadata(self, attn: PagedAttentionMetadata) -> PagedAttentionMetadata:
        dev = self.device
        return PagedAttentionMetadata(
            slot_mapping=attn.slot_mapping.to(dev), block_tables=attn.block_tables.to(dev),
            context_lens=attn.context_lens, query_start_loc=attn.query_start_loc, cache=self.kv,
        )  # lengths stay on the CPU: the attention plan reads them once per step


def sliced_item_inputs(features: Mapping[str, Any], item: Any) -> dict[str, Any]:
    """Default per-item inputs: the item's rows of its packed pixel tensor, plus its grid.

    Fits processors whose pixels are packed along dim 0 with `rows` per item (patches or tiles); the grid is
    the item's row of `<modality>_grid_thw` when the outputs have one, else the report's own `grid_thw` as
    `grids` (what a tiling model takes to return the features of the item's whole placeholder span).
    """
    key = "pixel_values" if item.modality == "image" else "pixel_values_videos"
    start, end = item.rows
    inputs = {key: torch.as_tensor(features[key])[start:end]}
    grid_key = f"{item.modality}_grid_thw"
    if features.get(grid_key) is not None:
        inputs[grid_key] = torch.as_tensor(features[grid_key])[item.index : item.index + 1]
    elif item.grid_thw:
        inputs["grids"] = torch.tensor([item.grid_thw], dtype=torch.long)
    return inputs


def _payload(item: MediaItem) -> MediaPayload:
    if not isinstance(item.payload, MediaPayload):
        raise PlaceholderMismatchError(
            f"media item {item.hash[:12]} carries no processor outputs; build engine media items with "
            "ocula.engine.llm.engine_media_items(processor.process(...))"
        )
    return item.payload


def _prompt_features(request: Request) -> Mapping[str, Any]:
    """The processor outputs of the request's prompt (grids, token types), or {} for a text-only prompt."""
    for item in request.media:
        if isinstance(item.payload, MediaPayload):
            return item.payload.features
    return {}


def _free_memory(device: torch.device) -> int:
    """Bytes the KV pool may draw from: the accelerator's free memory, or a quarter of the host's available
    memory on CPU (the host also holds the weights, activations and every other process)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 4
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") // 4
