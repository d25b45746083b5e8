"""The tokenizer: `tokenizer.json` through the `tokenizers` library, with transformers' behaviour around it.

Notable features:
- reads both checkpoint layouts: transformers 5 (`extra_special_tokens` list, `chat_template.jinja`) and
  older hub folders (`additional_special_tokens`, `added_tokens_decoder`, `special_tokens_map.json`,
  templates in `tokenizer_config.json` or `chat_template.json`, named template dicts);
- rebuilds the Qwen2 and Llama pipelines the way transformers 5 does. transformers reads only the vocab,
  merges, added tokens and post-processor from `tokenizer.json` for these classes and builds the normalizer,
  pre-tokenizer and decoder in Python. For legacy Llama hub files this matters: their `Prepend("▁")`
  normalizer runs on every text segment between added tokens, while transformers' `Metaspace(prepend_scheme=
  "first")` prefixes only the start of the text ("<image>Hi" encodes "Hi" without "▁" in transformers);
- `__call__` with padding (longest / max_length, left or right), truncation and pt/np tensors, `pad`,
  `decode` with `skip_special_tokens` and transformers' `clean_up_tokenization_spaces` rule (ignored for BPE
  models, as in transformers 5);
- `apply_chat_template` with transformers 5.23 defaults: renders with the special tokens as template
  variables, tokenizes without adding special tokens, returns a `BatchEncoding` unless `return_dict=False`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from .batch import BatchEncoding
from .chat_template import has_generation_block, render_chat_template
from .errors import ConfigError, UnsupportedFeatureError
from .loading import read_json, resolve_checkpoint, write_json

__all__ = ["Tokenizer", "load_chat_template"]

NAMED_SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# transformers' Qwen2Tokenizer pre-tokenizer split (the same regex the hub files carry).
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# model_type -> tokenizer class transformers' AutoTokenizer picks when tokenizer_config names none.
MODEL_TYPE_TOKENIZER = {
    "qwen2": "Qwen2Tokenizer",
    "qwen2_vl": "Qwen2Tokenizer",
    "llava_onevision": "Qwen2Tokenizer",
    "ovis2": "Qwen2Tokenizer",
    "idefics2": "LlamaTokenizer",
    "llama": "LlamaTokenizer",
}
# Class defaults of the special tokens when tokenizer_config.json does not set them.
CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen2": {"unk_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
    "llama": {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "padding_side": "left"},
    "plain": {},
}
SOURCE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
PADDING_STRATEGIES = (False, True, "longest", "max_length", "do_not_pad")


@dataclass
class TokenizerFiles:
    """What a tokenizer folder holds, merged the way transformers merges it."""

    backend_json: dict  # tokenizer.json
    config: dict  # tokenizer_config.json (+ special_tokens_map.json, + call-time overrides)
    pipeline: str  # "qwen2" | "llama" | "plain": which pipeline transformers rebuilds
    chat_template: str | dict[str, str] | None = None


@dataclass
class SpecialTokens:
    """Named special tokens (bos/eos/... and model-specific `*_token`) and the unnamed extra ones."""

    named: dict[str, str] = field(default_factory=dict)
    extra: list[str] = field(default_factory=list)

    def all(self) -> list[str]:
        return list(dict.fromkeys([*self.named.values(), *self.extra]))

    def set(self, name: str, token: str | None) -> None:
        """Set or clear one named token, keeping transformers' order (bos, eos, unk, ..., then the others)."""
        named = {**self.named, name: token}
        order = [*NAMED_SPECIAL_TOKENS, *(k for k in named if k not in NAMED_SPECIAL_TOKENS)]
        self.named = {k: named[k] for k in order if named.get(k) is not None}


# ----------------------------------------------------------------------------------------------- loading


def _token_str(value: Any) -> str | None:
    """A special token given as a string or as a serialized AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _pipeline_kind(tokenizer_class: str | None, folder: Path) -> str:
    if tokenizer_class is None:
        model_type = (read_json(folder, "config.json") or {}).get("model_type")
        tokenizer_class = MODEL_TYPE_TOKENIZER.get(model_type)
    name = (tokenizer_class or "").removesuffix("Fast")
    return {"Qwen2Tokenizer": "qwen2", "LlamaTokenizer": "llama"}.get(name, "plain")


def _read_template_files(folder: Path) -> dict[str, str]:
    templates = {}
    if (folder / "chat_template.jinja").is_file():
        templates["default"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    extra_dir = folder / "additional_chat_templates"
    if extra_dir.is_dir():
        for path in sorted(extra_dir.glob("*.jinja")):
            templates[path.stem] = path.read_text(encoding="utf-8")
    return templates


def _as_template(value: Any) -> str | dict[str, str] | None:
    if isinstance(value, list):  # stored as [{"name": ..., "template": ...}, ...]
        return {item["name"]: item["template"] for item in value}
    return value


def load_chat_template(folder: str | os.PathLike, config: dict | None = None) -> str | dict[str, str] | None:
    """The chat template of a folder, by priority: `chat_template.jinja` (+ `additional_chat_templates/`),
    tokenizer_config.json, chat_template.json, then processor_config.json (older Idefics2 hub folders)."""
    folder = Path(folder)
    templates = _read_template_files(folder)
    if templates:
        return templates["default"] if list(templates) == ["default"] else templates
    config = read_json(folder, "tokenizer_config.json") if config is None else config
    for source in (
        config,
        read_json(folder, "chat_template.json"),
        read_json(folder, "processor_config.json"),
    ):
        if source and source.get("chat_template") is not None:
            return _as_template(source["chat_template"])
    return None


def _merge_special_tokens_map(folder: Path, config: dict, overrides: dict) -> None:
    """Pre-v5 folders without `added_tokens_decoder`: special_tokens_map.json wins over tokenizer_config."""
    tokens_map = read_json(folder, "special_tokens_map.json") or {}
    for key, value in tokens_map.items():
        if overrides.get(key):
            continue
        if key in ("additional_special_tokens", "extra_special_tokens") and isinstance(value, list):
            existing = list(
                config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
            )
            value = existing + [t for t in value if t not in existing]
            config.pop("additional_special_tokens", None)
            key = "extra_special_tokens"
        config[key] = value


def _read_files(folder: Path, overrides: dict) -> TokenizerFiles:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(
            f"{folder} has no tokenizer.json. ocula reads the `tokenizers` format only: save the tokenizer "
            "with transformers (tokenizer.save_pretrained) to create it."
        )
    backend_json = json.loads(path.read_text(encoding="utf-8"))
    config = dict(read_json(folder, "tokenizer_config.json") or {})
    if "added_tokens_decoder" not in config:
        _merge_special_tokens_map(folder, config, overrides)
    chat_template = load_chat_template(folder, config)
    pipeline = _pipeline_kind(config.pop("tokenizer_class", None), folder)
    config.update(overrides)
    return TokenizerFiles(backend_json, config, pipeline, overrides.get("chat_template", chat_template))


def _added_tokens_from_config(decoder: dict) -> list[dict]:
    """tokenizer_config's `added_tokens_decoder` as tokenizer.json `added_tokens` entries (ids kept)."""
    entries = []
    for index, token in sorted(decoder.items(), key=lambda item: int(item[0])):
        token = token if isinstance(token, dict) else {"content": str(token), "special": True}
        entry = {
            "id": int(index),
            "content": token["content"],
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": not token.get("special", False),
            "special": False,
        }
        entry.update({k: v for k, v in token.items() if k in entry and k != "id"})
        entries.append(entry)
    return entries


def _rebuild_model(model: dict, pipeline: str) -> dict:
    """The BPE settings transformers' Qwen2Tokenizer / LlamaTokenizer construct (vocab and merges kept)."""
    model = dict(model, dropout=None, unk_token=None, continuing_subword_prefix=None, end_of_word_suffix=None)
    if pipeline == "qwen2":
        model.update(continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False, byte_fallback=False)
    else:
        model.update(fuse_unk=True, byte_fallback=True)
    model["ignore_merges"] = False
    return model


def _qwen2_pipeline(backend: BackendTokenizer, config: dict) -> None:
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(
                add_prefix_space=bool(config.get("add_prefix_space") or False), use_regex=False
            ),
        ]
    )
    backend.decoder = decoders.ByteLevel()


def _llama_pipeline(backend: BackendTokenizer, config: dict) -> None:
    # transformers: prepend "▁" to the first segment only ("first") unless legacy=True ("always");
    # add_prefix_space=False never prepends. Legacy hub files instead carry a Prepend normalizer.
    add_prefix_space = config.get("add_prefix_space")
    add_prefix_space = True if add_prefix_space is None else add_prefix_space
    scheme = ("always" if config.get("legacy", False) else "first") if add_prefix_space else "never"
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)


def build_backend(files: TokenizerFiles) -> BackendTokenizer:
    """A `tokenizers.Tokenizer` that encodes and decodes exactly like transformers' tokenizer class."""
    data = dict(files.backend_json)
    if isinstance(files.config.get("added_tokens_decoder"), dict):
        data["added_tokens"] = _added_tokens_from_config(files.config["added_tokens_decoder"])
    is_bpe = data.get("model", {}).get("type") == "BPE"
    if files.pipeline != "plain" and is_bpe:
        data["model"] = _rebuild_model(data["model"], files.pipeline)
    backend = BackendTokenizer.from_str(json.dumps(data))
    if files.pipeline == "qwen2" and is_bpe:
        _qwen2_pipeline(backend, files.config)
    elif files.pipeline == "llama" and is_bpe:
        _llama_pipeline(backend, files.config)
    backend.no_padding()
    backend.no_truncation()
    # split_special_tokens=True: special tokens in user text are encoded as plain text.
    backend.encode_special_tokens = bool(files.config.get("split_special_tokens") or False)
    return backend


def _special_tokens(config: dict, pipeline: str) -> SpecialTokens:
    defaults = CLASS_DEFAULTS[pipeline]
    named = {}
    for key in NAMED_SPECIAL_TOKENS:
        value = _token_str(config.get(key, defaults.get(key)))
        if value is not None:
            named[key] = value
    for key, value in config.items():  # model-specific `*_token` keys (image_token, ...)
        if key.endswith("_token") and key not in named and isinstance(_token_str(value), str):
            named[key] = _token_str(value)
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    if isinstance(extra, dict):  # {"image_token": "<image>", ...}: named, model-specific tokens
        named.update({k: _token_str(v) for k, v in extra.items() if _token_str(v) is not None})
        extra = []
    return SpecialTokens(named, [t for t in map(_token_str, extra) if t is not None])


def _register_special_tokens(backend: BackendTokenizer, specials: SpecialTokens) -> None:
    """Make every special token an added, special token of the backend (as transformers does on load).

    Tokens already added but flagged non-special in the files become special too, so that
    `skip_special_tokens` drops them exactly as transformers does.
    """
    tokens = specials.all()
    if tokens:
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])


# ---------------------------------------------------------------------------------------------- helpers


def _to_id_list(ids: Any) -> list[int]:
    if isinstance(ids, (torch.Tensor, np.ndarray)):
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


def _is_batch_of_conversations(conversation: Any) -> bool:
    return (
        isinstance(conversation, (list, tuple))
        and bool(conversation)
        and (isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "messages"))
    )


def _check_chat_options(conversation, sanitize_control_tokens, assistant_mask, tokenize, return_dict) -> None:
    if isinstance(conversation, (list, tuple)) and not conversation:
        raise ValueError("Cannot apply a chat template to an empty conversation: give at least one message.")
    if sanitize_control_tokens:
        raise UnsupportedFeatureError(
            "sanitize_control_tokens=True is not supported by ocula yet; escape control tokens in user "
            "text before rendering, or leave it False."
        )
    if assistant_mask and not (tokenize and return_dict):
        raise ValueError("return_assistant_tokens_mask=True needs tokenize=True and return_dict=True")


def _pad_one(row: list[int], length: int, value: int, side: str) -> list[int]:
    fill = [value] * (length - len(row))
    return fill + row if side == "left" else row + fill


def _check_padding(padding: Any) -> None:
    if padding not in PADDING_STRATEGIES:
        raise ValueError(f"padding must be one of {PADDING_STRATEGIES}, got {padding!r}")


# -------------------------------------------------------------------------------------------- tokenizer


class Tokenizer:
    """transformers-compatible tokenizer over a `tokenizers.Tokenizer` backend."""

    model_input_names: ClassVar[list[str]] = ["input_ids", "attention_mask"]

    def __init__(
        self,
        backend: BackendTokenizer,
        specials: SpecialTokens,
        config: dict | None = None,
        chat_template: str | dict[str, str] | None = None,
        pipeline: str = "plain",
    ):
        config = config or {}
        self.backend = backend
        self.specials = specials
        self.chat_template = chat_template
        self.padding_side = config.get("padding_side") or CLASS_DEFAULTS[pipeline].get(
            "padding_side", "right"
        )
        self.truncation_side = config.get("truncation_side") or "right"
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces") or False)
        # transformers 5 skips the clean-up for BPE models unless this flag is set (it corrupts BPE text).
        self._clean_up_bpe = bool(
            config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")
        )
        self.model_max_length = int(config.get("model_max_length") or 10**30)
        self.name_or_path = str(config.get("name_or_path", ""))
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs: Any) -> Tokenizer:
        """Load from a folder (or hub id) holding tokenizer.json; kwargs override tokenizer_config values."""
        hub_keys = ("revision", "local_files_only", "token", "cache_dir")
        hub = {k: kwargs.pop(k) for k in hub_keys if k in kwargs}
        folder = resolve_checkpoint(name_or_path, **hub)
        files = _read_files(folder, kwargs)
        specials = _special_tokens(files.config, files.pipeline)
        backend = build_backend(files)
        _register_special_tokens(backend, specials)
        config = {**files.config, "name_or_path": str(name_or_path)}
        tokenizer = cls(backend, specials, config, files.chat_template, files.pipeline)
        tokenizer._source = {name: (folder / name).read_bytes() for name in SOURCE_FILES if (folder / name).is_file()}
        tokenizer._load_overrides = {k: v for k, v in kwargs.items() if isinstance(v, (str, int, float, bool))}
        return tokenizer

    def save_pretrained(self, save_directory: str | os.PathLike, **ignored: Any) -> tuple[str, ...]:
        """Write the tokenizer files this tokenizer was loaded from (tokenizer.json, tokenizer_config.json,
        special_tokens_map.json), with the load-time overrides and the current padding side applied."""
        source = self.__dict__.get("_source")
        if not source:
            raise UnsupportedFeatureError(
                "save_pretrained works on a tokenizer loaded with from_pretrained: it writes back the files it "
                "was loaded from."
            )
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for name, data in source.items():
            if name == "tokenizer_config.json":
                config = {**json.loads(data), **self.__dict__.get("_load_overrides", {}),
                          "padding_side": self.padding_side}
                for key in NAMED_SPECIAL_TOKENS:  # `tokenizer.pad_token = ...` after loading is kept
                    if self.specials.named.get(key) != _token_str(config.get(key)):
                        config[key] = self.specials.named.get(key)
                write_json(folder / name, config)
            else:
                (folder / name).write_bytes(data)
            written.append(str(folder / name))
        return tuple(written)

    # ------------------------------------------------------------------------------------ special tokens

    def __getattr__(self, name: str) -> Any:
        # bos_token, eos_token, image_token, ... and their *_id forms; None when the tokenizer has none.
        specials = self.__dict__.get("specials")
        if specials is None:
            raise AttributeError(name)
        if name in NAMED_SPECIAL_TOKENS or name in specials.named:
            return specials.named.get(name)
        if name.endswith("_token_id"):
            base = name.removesuffix("_id")
            if base in NAMED_SPECIAL_TOKENS or base in specials.named:
                token = specials.named.get(base)
                return None if token is None else self.convert_tokens_to_ids(token)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        # `tokenizer.pad_token = tokenizer.eos_token` works as in transformers. Like transformers, a token
        # outside the vocabulary is not added: its id is the unk id.
        specials = self.__dict__.get("specials")
        if specials is not None and (name in NAMED_SPECIAL_TOKENS or name in specials.named):
            specials.set(name, _token_str(value))
        else:
            super().__setattr__(name, value)

    @property
    def backend_tokenizer(self) -> BackendTokenizer:
        """The `tokenizers.Tokenizer` doing the work (transformers' name for it)."""
        return self.backend

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """Named special tokens (what chat templates receive as variables)."""
        return dict(self.specials.named)

    @property
    def extra_special_tokens(self) -> list[str]:
        return list(self.specials.extra)

    @property
    def all_special_tokens(self) -> list[str]:
        return self.specials.all()

    @property
    def all_special_ids(self) -> list[int]:
        return self.convert_tokens_to_ids(self.all_special_tokens)

    # ------------------------------------------------------------------------------------------- vocab

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary, without added tokens (as transformers)."""
        return self.backend.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def get_added_vocab(self) -> dict[str, int]:
        return {t.content: i for i, t in sorted(self.backend.get_added_tokens_decoder().items())}

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | list[int] | None:
        if isinstance(tokens, str):
            index = self.backend.token_to_id(tokens)
            return index if index is not None else self.unk_token_id
        return [self.convert_tokens_to_ids(token) for token in tokens]

    def convert_ids_to_tokens(
        self, ids: int | list[int], skip_special_tokens: bool = False
    ) -> str | list[str]:
        if isinstance(ids, int):
            return self.backend.id_to_token(ids)
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self.backend.id_to_token(i) for i in _to_id_list(ids) if i not in skip]

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[str]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).tokens

    # ---------------------------------------------------------------------------------------- encoding

    def encode(self, text: str, *, add_special_tokens: bool = True, **kwargs: Any) -> list[int]:
        return self(text, add_special_tokens=add_special_tokens, **kwargs)["input_ids"]

    def __call__(
        self,
        text: str | list[str],
        *,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        padding_side: str | None = None,
        max_length: int | None = None,
        truncation: bool | str = False,
        pad_to_multiple_of: int | None = None,
        return_tensors: str | None = None,
        return_attention_mask: bool = True,
        **unused: Any,
    ) -> BatchEncoding:
        """Encode one text or a batch; a single text gives unbatched lists (a [1, S] tensor with tensors)."""
        if not isinstance(text, (str, list, tuple)):
            raise TypeError(f"text must be a string or a list of strings, got {type(text).__name__}")
        batched = not isinstance(text, str)
        texts = list(text) if batched else [text]
        rows = self._encode_rows(texts, add_special_tokens, truncation, max_length)
        features = {"input_ids": rows if batched or return_tensors else rows[0]}
        return self.pad(
            features,
            padding=padding,
            max_length=max_length,
            padding_side=padding_side,
            pad_to_multiple_of=pad_to_multiple_of,
            return_attention_mask=return_attention_mask,
            return_tensors=return_tensors,
        )

    def _encode_rows(
        self, texts: list[str], add_special_tokens: bool, truncation: bool | str, max_length: int | None
    ) -> list[list[int]]:
        """Token ids per text; truncation cuts text tokens and keeps the post-processor's special tokens.

        Truncation happens on the encodings, not through the backend's shared truncation setting, so
        concurrent calls (server threads) never see each other's limits.
        """
        limit = self.model_max_length if max_length is None else max_length
        if truncation in (False, "do_not_truncate") or limit >= 2**31:
            return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]
        processor = self.backend.post_processor
        n_special = processor.num_special_tokens_to_add(False) if add_special_tokens and processor else 0
        if limit < n_special:
            raise ValueError(
                f"max_length={limit} leaves no room: this tokenizer adds {n_special} special tokens"
            )
        rows = []
        for encoding in self.backend.encode_batch(texts, add_special_tokens=False):
            encoding.truncate(limit - n_special, direction=self.truncation_side)
            if add_special_tokens:
                encoding = self.backend.post_process(encoding, None, True)
            rows.append(encoding.ids)
        return rows

    # ----------------------------------------------------------------------------------------- padding

    def pad(
        self,
        encoded: dict | list[dict] | BatchEncoding,
        padding: bool | str = True,
        max_length: int | None = None,
        padding_side: str | None = None,
        pad_to_multiple_of: int | None = None,
        return_attention_mask: bool = True,
        return_tensors: str | None = None,
    ) -> BatchEncoding:
        """Pad `input_ids` (a row or a batch of rows) with `pad_token_id`; the mask marks real tokens."""
        _check_padding(padding)
        if isinstance(encoded, (list, tuple)):
            encoded = {"input_ids": [item["input_ids"] for item in encoded]}
        ids = encoded["input_ids"]
        ids = ids.tolist() if isinstance(ids, (torch.Tensor, np.ndarray)) else ids
        single = not ids or isinstance(ids[0], int)
        rows = [_to_id_list(ids)] if single else [_to_id_list(row) for row in ids]
        length = self._padded_length(rows, padding, max_length, pad_to_multiple_of)
        side = padding_side or self.padding_side
        masks = [[1] * len(row) for row in rows]
        if length is not None:
            pad_id = self._pad_id_for_padding()
            rows = [_pad_one(row, max(length, len(row)), pad_id, side) for row in rows]
            masks = [_pad_one(mask, max(length, len(mask)), 0, side) for mask in masks]
        data = {"input_ids": rows[0] if single and not return_tensors else rows}
        if return_attention_mask:
            data["attention_mask"] = masks[0] if single and not return_tensors else masks
        return self._as_batch(data, return_tensors)

    def _padded_length(self, rows, padding, max_length, multiple) -> int | None:
        if padding in (False, "do_not_pad"):
            return None
        if padding == "max_length":
            length = max_length if max_length is not None else self.model_max_length
        else:
            length = max(len(row) for row in rows)
        if multiple:
            length = -(-length // multiple) * multiple
        return length

    def _pad_id_for_padding(self) -> int:
        if self.pad_token is None:
            raise ValueError(
                "This tokenizer has no pad token, so it cannot pad. Set one, e.g. "
                "Tokenizer.from_pretrained(path, pad_token='<eos token>'), or pass padding=False."
            )
        return self.pad_token_id

    @staticmethod
    def _as_batch(data: dict, return_tensors: str | None) -> BatchEncoding:
        if return_tensors is None:
            return BatchEncoding(data)
        lengths = {len(row) for row in data["input_ids"]}
        if len(lengths) > 1:
            raise ValueError(
                "Cannot make a tensor of sequences of different lengths: pass padding=True (or 'max_length') "
                "together with return_tensors."
            )
        return BatchEncoding(data, tensor_type=return_tensors)

    # ---------------------------------------------------------------------------------------- decoding

    def decode(
        self,
        ids: Any,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **unused: Any,
    ) -> str:
        """Decode one sequence of ids (list, tensor, array or int)."""
        if isinstance(ids, dict):
            ids = ids["input_ids"]
        text = self.backend.decode(_to_id_list(ids), skip_special_tokens=skip_special_tokens)
        clean = (
            self.clean_up_tokenization_spaces
            if clean_up_tokenization_spaces is None
            else clean_up_tokenization_spaces
        )
        if clean and (self._clean_up_bpe or type(self.backend.model).__name__ != "BPE"):
            text = clean_up_tokenization(text)
        return text

    def batch_decode(
        self,
        sequences: Any,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **unused: Any,
    ) -> list[str]:
        if isinstance(sequences, (torch.Tensor, np.ndarray)):
            sequences = sequences.tolist()
        return [self.decode(seq, skip_special_tokens, clean_up_tokenization_spaces) for seq in sequences]

    # ------------------------------------------------------------------------------------ chat template

    def get_chat_template(self, chat_template: str | None = None, tools: list | None = None) -> str:
        """The template to render: a named one of a template dict, the argument, or the tokenizer's own."""
        if isinstance(self.chat_template, dict):
            templates = self.chat_template
            if chat_template is not None:
                return templates.get(chat_template, chat_template)
            if tools is not None and "tool_use" in templates:
                return templates["tool_use"]
            if "default" in templates:
                return templates["default"]
            raise ValueError(
                f"This tokenizer has several chat templates and none is named 'default': pass one of "
                f"{sorted(templates)} as chat_template=."
            )
        if chat_template is not None:
            return chat_template
        if self.chat_template is None:
            raise ValueError(
                "This tokenizer has no chat template: pass chat_template= (a jinja string), or add "
                "chat_template.jinja to the checkpoint folder."
            )
        return self.chat_template

    def apply_chat_template(
        self,
        conversation: list[dict] | list[list[dict]],
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool | str = False,
        tokenize: bool = True,
        return_dict: bool = True,
        return_tensors: str | None = None,
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        return_assistant_tokens_mask: bool = False,
        tokenizer_kwargs: dict | None = None,
        sanitize_control_tokens: bool = False,
        **template_kwargs: Any,
    ) -> str | list[str] | list[int] | list[list[int]] | BatchEncoding:
        """Render a conversation (or a batch) and optionally tokenize it, like transformers 5.23.

        The rendered prompt is tokenized without adding special tokens (the template writes them).
        """
        _check_chat_options(
            conversation, sanitize_control_tokens, return_assistant_tokens_mask, tokenize, return_dict
        )
        template = self.get_chat_template(chat_template, tools)
        batched = _is_batch_of_conversations(conversation)
        texts, ranges = self._render(
            template,
            conversation if batched else [conversation],
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tools=tools,
            documents=documents,
            with_ranges=return_assistant_tokens_mask,
            template_kwargs=template_kwargs,
        )
        if not tokenize:
            return texts if batched else texts[0]
        out = self(
            texts if batched else texts[0],
            add_special_tokens=False,
            padding=padding,
            truncation=truncation,
            max_length=max_length,
            return_tensors=return_tensors,
            **(tokenizer_kwargs or {}),
        )
        if return_assistant_tokens_mask:
            side = (tokenizer_kwargs or {}).get("padding_side") or self.padding_side
            out["assistant_masks"] = self._assistant_masks(texts, ranges, out, batched, return_tensors, side)
        return out if return_dict else out["input_ids"]

    def _render(
        self, template: str, conversations: list, *, with_ranges: bool, template_kwargs: dict, **options: Any
    ) -> tuple[list[str], list[list[tuple[int, int]]]]:
        """Rendered texts and, when asked and the template marks them, the `{% generation %}` ranges."""
        conversations = [getattr(c, "messages", c) for c in conversations]
        # Drop None values (OpenAI-style `content=None`): templates handle a missing key, not a None.
        conversations = [[{k: v for k, v in m.items() if v is not None} for m in c] for c in conversations]
        want_ranges = with_ranges and has_generation_block(template)
        variables = {**self.special_tokens_map, **template_kwargs}  # caller's kwargs win over special tokens
        rendered = render_chat_template(
            template, conversations, return_assistant_tokens_mask=want_ranges, **options, **variables
        )
        return rendered if want_ranges else (rendered, [[] for _ in conversations])

    def add_special_tokens_for_prompt(self, prompt: str | list[str]) -> bool:
        """What a processor's `apply_chat_template(tokenize=True)` passes as `add_special_tokens`.

        transformers' processors add special tokens (Idefics2's BOS) unless the first rendered prompt
        already starts with the BOS token; the tokenizer's own `apply_chat_template` never adds them.
        """
        first = prompt if isinstance(prompt, str) else (prompt[0] if prompt else "")
        return not (self.bos_token is not None and first.startswith(self.bos_token))

    def _assistant_mask(self, text: str, spans: list[tuple[int, int]]) -> list[int]:
        """1 on the tokens of each `{% generation %}` character span of `text`, 0 elsewhere."""
        encoding = self.backend.encode(text, add_special_tokens=False)
        mask = [0] * len(encoding.ids)
        for start, end in spans:
            first, last = encoding.char_to_token(start), encoding.char_to_token(end - 1)
            if first is None:
                break
            for t in range(first, (last + 1) if last is not None else len(mask)):
                mask[t] = 1
        return mask

    def _assistant_masks(self, texts, ranges, out, batched: bool, return_tensors, side: str):
        """Masks aligned with the (padded, truncated) rows of `out`; padding is 0."""
        rows = out["input_ids"] if batched or return_tensors else [out["input_ids"]]
        masks = []
        for text, spans, row in zip(texts, ranges, rows):
            mask = self._assistant_mask(text, spans)
            mask = mask[: len(row)] if self.truncation_side == "right" else mask[-len(row) :]
            masks.append(_pad_one(mask, len(row), 0, side))
        if return_tensors:
            return BatchEncoding({"masks": masks}, tensor_type=return_tensors)["masks"]
        return masks if batched else masks[0]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, "
            f"len={len(self)}, padding_side={self.padding_side!r}, special_tokens={self.special_tokens_map})"
        )


def clean_up_tokenization(text: str) -> str:
    """transformers' clean-up of spaces before punctuation and English contractions."""
    for before, after in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(before, after)
    return text
