"""`PreTrainedModel`: transformers-style `from_pretrained` for ocula's models, and the shared output types.

Notable features:
- `from_pretrained(path or hub id)`: config.json -> typed config (+ keyword overrides) -> model built on
  the meta device (no random init, no double allocation) -> lazy safetensors copied straight into the
  parameters in the requested dtype and device -> tied weights shared -> eval mode;
- `dtype` / `torch_dtype`: "auto" (the default, like transformers 5) is the config's dtype, else the
  checkpoint's first floating dtype; also a torch.dtype or a name such as "bfloat16";
- `device` / `device_map` ("auto", "cpu", "cuda", "cuda:1", an index, or a dict placing everything on one
  device); `attn_implementation` of any kind runs the SDPA path; `quantization_config` is refused;
- `save_pretrained(folder, max_shard_size=...)`: config, generation config and (sharded) safetensors in
  transformers 5's names, which ocula and transformers both load;
- `.generation_config` from generation_config.json, `.device`, `.dtype`, `num_parameters()`,
  `tie_weights()`; `generate()` comes from `GenerationMixin`;
- `TextContractMixin`: the text half of the model contract (`embed_inputs`, `get_position_ids` for 1-D
  RoPE, `forward_text`, `compute_logits`, `new_kv_cache`) and the tail of a transformers-style `forward`
  (media merge, positions, logits, loss), the same in every family; `scatter_features` checks the counts.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from .configuration_utils import BaseConfig, dtype_name
from .errors import ConfigError, PlaceholderMismatchError, UnsupportedFeatureError
from .generation import GenerationConfig, GenerationMixin
from .layers.attention import DenseAttentionMetadata, StaticKVCache
from .loading import SafetensorsCheckpoint, load_weights, rename_key, resolve_checkpoint, write_json

IGNORE_INDEX = -100
ATTN_IMPLEMENTATIONS = {None, "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"}
# from_pretrained options of transformers that change nothing here
_IGNORED_OPTIONS = {
    "use_cache", "output_attentions", "output_hidden_states", "return_dict", "use_safetensors", "variant",
    "force_download", "resume_download", "proxies", "offload_folder", "offload_state_dict", "max_memory",
    "_from_auto", "_fast_init", "key_mapping", "tp_plan",
}  # fmt: skip


@dataclass
class CausalLMOutput:
    """What `forward` returns: `.logits` [B, S, V] and `.loss` (None without labels)."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None

    def __getitem__(self, key: str | int) -> torch.Tensor | None:
        if isinstance(key, str):
            return getattr(self, key)
        return tuple(v for v in (self.loss, self.logits) if v is not None)[key]  # transformers' tuple order


@dataclass
class BaseModelOutput:
    """What a base model (`Qwen2VLModel`, ...) returns: `.last_hidden_state` [B, S, hidden], after the final
    norm (transformers' `...ModelOutputWithPast` without the cache)."""

    last_hidden_state: torch.Tensor

    def __getitem__(self, key: str | int) -> torch.Tensor:
        return getattr(self, key) if isinstance(key, str) else (self.last_hidden_state,)[key]


class OwnedBaseModel:
    """The base model of a family (`model.model`: towers + decoder, no lm_head) as transformers exposes it.

    Its forward runs its `*ForConditionalGeneration` owner's inputs path and decoder without the head, so
    `XModel.from_pretrained(folder)(**inputs).last_hidden_state` equals transformers'. A base model built
    on its own (`XModel(config)`) holds the weights but cannot run: load it with `from_pretrained`.
    """

    owner_class: ClassVar[type]  # the family's ForConditionalGeneration class

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> nn.Module:
        """Load the family's checkpoint and return its base model (the lm_head is loaded and dropped)."""
        return cls.owner_class.from_pretrained(pretrained_model_name_or_path, *args, **kwargs).model

    def forward(self, *args: Any, **kwargs: Any) -> BaseModelOutput:
        owner = self.__dict__.get("_owner")
        if owner is None:
            raise UnsupportedFeatureError(
                f"{type(self).__name__} built on its own cannot run: load it with "
                f"{type(self).__name__}.from_pretrained(...) or use {self.owner_class.__name__}."
            )
        embeds, position_ids, attention_mask = owner.decoder_inputs(*args, **kwargs)
        return BaseModelOutput(owner.decoder_hidden(embeds, position_ids, attention_mask))


def own(owner: nn.Module, base: nn.Module) -> None:
    """Let `base` (the owner's `model`) reach its owner without registering it as a submodule (a cycle)."""
    object.__setattr__(base, "_owner", owner)


def keep_last(hidden: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """transformers' `logits_to_keep`: 0 keeps all positions, n the last n, a tensor selects indices."""
    if isinstance(logits_to_keep, int):
        return hidden[:, -logits_to_keep:] if logits_to_keep else hidden
    return hidden[:, logits_to_keep]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy in float32, mean over labels != -100 (transformers' ForCausalLMLoss)."""
    labels = F.pad(labels.to(logits.device), (0, 1), value=IGNORE_INDEX)[:, 1:]  # [B, S], shifted left
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)


def head_output(logits: torch.Tensor, labels: torch.Tensor | None) -> CausalLMOutput:
    """logits [B, S, V] and, with `labels`, the shifted LM loss."""
    return CausalLMOutput(logits=logits, loss=causal_lm_loss(logits, labels) if labels is not None else None)


def scatter_features(
    embeds: torch.Tensor, where: torch.Tensor, features: torch.Tensor, token_id: int, advice: str = ""
) -> torch.Tensor:
    """Write features [n, hidden] into the n positions of `where` [B, S] (row-major order)."""
    n_tokens, n_features = int(where.sum()), features.shape[0]
    if n_tokens != n_features:
        raise PlaceholderMismatchError(
            f"The text has {n_tokens} placeholder tokens (id {token_id}) but the media give {n_features} "
            f"feature vectors. Use the processor's input_ids with the pixels of the same call{advice}."
        )
    return embeds.masked_scatter(where[..., None], features.to(embeds.dtype))


def padded_positions(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D positions [B, S] = cumsum(mask) - 1 (padding slots 1, as transformers) and delta [B] long."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    mask = attention_mask.long()
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    delta = mask.sum(-1) - input_ids.shape[1]  # -(left padding): cache index t decodes at t + delta
    return positions, delta


def plain_positions(embeds: torch.Tensor) -> torch.Tensor:
    """[B, S] = 0..S-1 per row whatever the padding: what transformers' `forward` uses without positions."""
    batch, seq = embeds.shape[:2]
    return torch.arange(seq, device=embeds.device).expand(batch, seq)


def full_sequence_hidden(
    decoder: Callable[..., torch.Tensor], embeds: torch.Tensor, position_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
) -> torch.Tensor:
    """`decoder(embeds, positions, attn)` over the whole sequence (no cache) -> final-normed hidden states
    [B, S, hidden]: the base models' forward and the text half of every `forward`."""
    if position_ids is None:  # like transformers' forward: 0..S-1 whatever the padding
        position_ids = plain_positions(embeds)
    key_mask = attention_mask.bool() if attention_mask is not None else None
    return decoder(embeds, position_ids, DenseAttentionMetadata(key_mask=key_mask))


def resolve_dtype(dtype: Any, config: BaseConfig, ckpt: SafetensorsCheckpoint) -> torch.dtype:
    """None / "auto" -> the config's dtype, else the checkpoint's; a name or torch.dtype as given."""
    if dtype is None or dtype == "auto":
        name = dtype_name(getattr(config, "dtype", None)) or _checkpoint_dtype(ckpt)
        return _to_dtype(name or "float32", "config.json dtype")
    if isinstance(dtype, torch.dtype):
        return dtype
    return _to_dtype(dtype_name(dtype), "dtype")


def _to_dtype(name: str, what: str) -> torch.dtype:
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ConfigError(f"{what}={name!r} is not a floating torch dtype; use e.g. 'float32' or 'bfloat16'.")
    return value


def _checkpoint_dtype(ckpt: SafetensorsCheckpoint) -> str | None:
    for key in ckpt:
        value = ckpt.get(key)
        if value.is_floating_point():
            return dtype_name(value.dtype)
    return None


def resolve_device(device: Any = None, device_map: Any = None) -> torch.device:
    """`device` or a single-device `device_map` -> torch.device (default CPU)."""
    where = device if device is not None else device_map
    if isinstance(where, dict):
        places = {str(v) for v in where.values()}
        if len(places) != 1:
            raise UnsupportedFeatureError(
                f"device_map={where} splits the model over several devices; ocula loads a model on one "
                "device: pass device='cuda' (or 'cpu')."
            )
        where = places.pop()
    if where is None:
        return torch.device("cpu")
    if where == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(where, int) or (isinstance(where, str) and where.isdigit()):
        where = f"cuda:{where}"
    try:
        device = torch.device(where)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device={where!r} is not a torch device; use 'cpu', 'cuda' or 'cuda:N'.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={where!r} but this torch build sees no CUDA GPU; use device='cpu'.")
    return device


class PreTrainedModel(GenerationMixin, nn.Module):
    """Base of every `*ForConditionalGeneration`: loading, dtype / device, tied weights."""

    config_class: ClassVar[type[BaseConfig]]
    checkpoint_rename: ClassVar[list[tuple[str, str]]] = []  # (regex, replacement) for older key layouts
    tied_weights: ClassVar[dict[str, str]] = {}  # dst -> src, shared when config.tie_word_embeddings

    def __init__(self, config: BaseConfig):
        super().__init__()
        self.config = config
        self.generation_config = GenerationConfig()
        self._kept_separate: set[str] = set()  # tied names the checkpoint gives different values

    # -- loading ---------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        config: BaseConfig | None = None,
        dtype: Any = None,
        torch_dtype: Any = None,
        device: Any = None,
        device_map: Any = None,
        attn_implementation: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        trust_remote_code: bool = False,
        low_cpu_mem_usage: bool | None = None,
        quantization_config: Any = None,
        **config_overrides: Any,
    ) -> PreTrainedModel:
        """Load a checkpoint folder or hub id (same arguments as transformers' from_pretrained)."""
        _check_options(attn_implementation, quantization_config)
        folder = resolve_checkpoint(name_or_path, revision=revision, local_files_only=local_files_only,
                                    token=token, cache_dir=cache_dir)
        config = config if config is not None else cls.config_class.from_pretrained(folder)
        config = _apply_overrides(config, config_overrides)
        ckpt = SafetensorsCheckpoint(folder)
        model = cls._load(config, ckpt, resolve_dtype(dtype if dtype is not None else torch_dtype, config, ckpt),
                          resolve_device(device, device_map))
        model.generation_config = GenerationConfig.from_pretrained(folder)
        return model

    @classmethod
    def _load(cls, config: BaseConfig, ckpt, dtype: torch.dtype, device: torch.device) -> PreTrainedModel:
        names = {rename_key(key, cls.checkpoint_rename): key for key in ckpt}  # model name -> checkpoint key
        with torch.device("meta"):
            model = cls(config)
        model._untie_differing(ckpt, names)
        tied = model._tied_map()
        # an identical tied copy saved in the checkpoint is skipped: the source fills both
        ignore = [f"^{re.escape(names[dst])}$" for dst in tied if dst in names]
        load_weights(model, ckpt, rename=cls.checkpoint_rename, tied=tied, ignore=ignore, dtype=dtype,
                     device=device)
        model.tie_weights()
        return model.eval()

    def _untie_differing(self, ckpt, names: dict[str, str]) -> None:
        """Like transformers 5: a tied pair whose checkpoint holds two different tensors stays separate."""
        for dst, src in self._tied_map().items():
            if dst in names and src in names and not torch.equal(ckpt.get(names[dst]), ckpt.get(names[src])):
                self._kept_separate.add(dst)
                owner, _, attr = dst.rpartition(".")
                setattr(self.get_submodule(owner), attr, nn.Parameter(torch.empty_like(self.get_parameter(dst))))

    def _tied_map(self) -> dict[str, str]:
        if not getattr(self.config, "tie_word_embeddings", False):
            return {}
        return {dst: src for dst, src in self.tied_weights.items() if dst not in self._kept_separate}

    def tie_weights(self) -> None:
        """Share each tied destination with its source parameter (lm_head <- input embeddings)."""
        for dst, src in self._tied_map().items():
            owner, _, name = dst.rpartition(".")
            setattr(self.get_submodule(owner), name, self.get_parameter(src))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # forward() swallows unknown kwargs like transformers' **kwargs; these two would otherwise come back
        # as a missing attribute on the output, far from the call that asked for them
        asked = [name for name in ("output_hidden_states", "output_attentions") if kwargs.get(name)]
        if asked:
            raise UnsupportedFeatureError(
                f"{type(self).__name__}(..., {asked[0]}=True) is not supported: ocula's forward returns "
                "`.logits` and `.loss` only; drop the option."
            )
        return super().__call__(*args, **kwargs)

    # -- saving ----------------------------------------------------------------------------------------

    def save_pretrained(
        self,
        save_directory: str | Path,
        *,
        state_dict: dict[str, torch.Tensor] | None = None,
        max_shard_size: int | str = "5GB",
        safe_serialization: bool = True,
        **ignored: Any,
    ) -> None:
        """Write config.json, generation_config.json and safetensors weights (sharded past `max_shard_size`,
        with model.safetensors.index.json) that ocula and transformers both load. Tied copies are not written,
        as transformers does; `push_to_hub` and other hub options are ignored."""
        if not safe_serialization:
            raise UnsupportedFeatureError("save_pretrained(safe_serialization=False): ocula writes safetensors only.")
        folder = Path(save_directory)
        if folder.is_file():
            raise ConfigError(f"save_pretrained needs a folder, and {folder} is a file.")
        folder.mkdir(parents=True, exist_ok=True)
        config = {**self.config.to_dict(), "architectures": [type(self).__name__], "dtype": dtype_name(self.dtype)}
        write_json(folder / "config.json", config, sort_keys=True)
        generation = self.generation_config.to_dict()
        if generation:
            write_json(folder / "generation_config.json", generation, sort_keys=True)
        state = state_dict if state_dict is not None else self.state_dict()
        tied = self._tied_map()
        tensors = {name: value.detach().to("cpu").contiguous() for name, value in state.items() if name not in tied}
        _save_shards(tensors, folder, _size_bytes(max_shard_size))

    # -- properties ------------------------------------------------------------------------------------

    def get_input_embeddings(self) -> nn.Embedding:
        raise NotImplementedError(f"{type(self).__name__} must implement get_input_embeddings()")

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(p.dtype for p in self.parameters() if p.is_floating_point())

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameter count, each shared (tied) tensor once."""
        embeddings = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        return sum(
            p.numel()
            for p in self.parameters()  # parameters() yields a tied tensor once
            if (p.requires_grad or not only_trainable) and not (exclude_embeddings and id(p) in embeddings)
        )


def _size_bytes(size: int | str) -> int:
    """5_000_000, "5GB", "500MB" or "2GiB" -> bytes (transformers' max_shard_size spellings)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)\s*", str(size), re.IGNORECASE)
    if not match:
        raise ConfigError(f"max_shard_size={size!r}: use bytes (an int) or a string such as '5GB' or '500MB'.")
    unit = match.group(2).upper()
    scale = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(match.group(1)) * scale)


def _save_shards(tensors: dict[str, torch.Tensor], folder: Path, max_bytes: int) -> None:
    """model.safetensors, or model-0000k-of-0000n.safetensors + index when the tensors exceed max_bytes."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    for name, value in tensors.items():
        size = value.numel() * value.element_size()
        if shards[-1] and used + size > max_bytes:  # a tensor larger than a shard gets a shard of its own
            shards.append({})
            used = 0
        shards[-1][name] = value
        used += size
    for stale in [*folder.glob("model*.safetensors"), folder / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)  # a previous save with another sharding would mix with this one
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for index, shard in enumerate(shards, start=1):
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    write_json(folder / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map},
               sort_keys=True)


class TextContractMixin:
    """The text half of the model contract (docs/architecture.md), the same in every family.

    Needs the decoder (`Qwen2Model` / `MistralModel`: `embed_tokens`, `forward`, `new_kv_cache`) at
    `decoder_path`, an `lm_head` and `get_media_features`. `merge_media` is the hook a family overrides
    when its media rows go somewhere else than the placeholders of their key (Ovis2's indicator tokens).
    """

    decoder_path: ClassVar[str] = "model.language_model"
    mismatch_advice: ClassVar[str] = ""  # appended to the placeholder-count error

    @property
    def decoder(self) -> nn.Module:
        return self.get_submodule(self.decoder_path)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.decoder.embed_tokens

    def embed_inputs(
        self, input_ids: torch.Tensor, media_features: dict[int, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Token embeddings [B, S, hidden] with each placeholder replaced by its media feature."""
        return self.merge_media(self.get_input_embeddings()(input_ids), input_ids, media_features or {})

    def merge_media(
        self, embeds: torch.Tensor, input_ids: torch.Tensor, features: dict[int, torch.Tensor]
    ) -> torch.Tensor:
        """embeds [B, S, hidden] with the rows of `features[id]` written over the tokens `id`."""
        for token_id, values in features.items():
            embeds = scatter_features(embeds, input_ids == token_id, values, token_id, self.mismatch_advice)
        return embeds

    def get_position_ids(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **ignored
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """1-D RoPE: positions [B, S] = cumsum(mask) - 1 (padding slots 1) and delta [B] = -left padding."""
        return padded_positions(input_ids, attention_mask)

    def forward_text(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, attn) -> torch.Tensor:
        """Decoder over embeddings: [B, S, hidden] -> final-normed hidden states [B, S, hidden]."""
        return self.decoder(inputs_embeds, position_ids, attn)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def new_kv_cache(
        self, batch_size: int, max_len: int, dtype: torch.dtype | None = None, device=None
    ) -> StaticKVCache:
        return self.decoder.new_kv_cache(batch_size, max_len, dtype, device)

    # -- pieces of the transformers-style forward ---------------------------------------------------

    def forward_embeddings(
        self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None, media: dict[str, Any]
    ) -> torch.Tensor:
        """input_ids or inputs_embeds [B, S, hidden] with the features of `media` (None values: no media)."""
        if input_ids is None and inputs_embeds is None:
            raise UnsupportedFeatureError("forward() needs input_ids or inputs_embeds: pass one of them.")
        has_media = any(media.get(key) is not None for key in ("pixel_values", "pixel_values_videos"))
        features = self.get_media_features(**media) if has_media else {}
        if inputs_embeds is None:
            return self.embed_inputs(input_ids, features)
        if has_media and input_ids is None:
            raise UnsupportedFeatureError(
                "forward(inputs_embeds=..., pixel_values=...) without input_ids: pass input_ids too, so the "
                "media placeholders can be located."
            )
        return self.merge_media(inputs_embeds, input_ids, features)

    def lm_output(
        self,
        embeds: torch.Tensor,
        position_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor | None,
        logits_to_keep: int | torch.Tensor,
    ) -> CausalLMOutput:
        """Decoder over the whole sequence (no cache) -> logits [B, S, V] (or the last kept) and the loss."""
        hidden = self.decoder_hidden(embeds, position_ids, attention_mask)
        return head_output(self.compute_logits(keep_last(hidden, logits_to_keep)), labels)

    def decoder_hidden(
        self, embeds: torch.Tensor, position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Decoder over the whole sequence (no cache) -> final-normed hidden states [B, S, hidden]."""
        return full_sequence_hidden(self.forward_text, embeds, position_ids, attention_mask)


def _check_options(attn_implementation: str | None, quantization_config: Any) -> None:
    if quantization_config is not None:
        raise UnsupportedFeatureError(
            "quantization_config is not supported: load the unquantized checkpoint with dtype='bfloat16'."
        )
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(
            f"attn_implementation={attn_implementation!r} is unknown; use 'sdpa' (all choices run ocula's "
            "SDPA attention)."
        )


def _apply_overrides(config: BaseConfig, overrides: dict[str, Any]) -> BaseConfig:
    """from_pretrained(..., key=value) replaces config keys like transformers does (then re-checks)."""
    overrides = {k: v for k, v in overrides.items() if k not in _IGNORED_OPTIONS}
    unknown = sorted(k for k in overrides if not hasattr(config, k))
    if unknown:
        raise ConfigError(
            f"from_pretrained got unknown option(s) {unknown}: not a config field of {type(config).__name__} "
            "nor a from_pretrained argument. Check the spelling."
        )
    return config.with_overrides(**overrides)
