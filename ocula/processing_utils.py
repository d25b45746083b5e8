"""ProcessorMixin: one object that turns chats, text, images and videos into model inputs.

Notable features:
- `from_pretrained` reads both checkpoint layouts: transformers 5 (`processor_config.json` with the image and
  video processors nested inside, `chat_template.jinja`) and older hub folders (`preprocessor_config.json`,
  `video_preprocessor_config.json`, `chat_template.json`, or a template in `tokenizer_config.json`). Like
  transformers, a video processor without its own file is configured from `preprocessor_config.json`;
- keyword arguments go to whichever sub-processor takes them, at load time (`min_pixels=`, `padding_side=`)
  and at call time, also as `text_kwargs=` / `images_kwargs=` / `videos_kwargs=` dicts;
- the shared call flow of transformers' processors: count placeholders (a mismatch raises
  `PlaceholderMismatchError` naming both counts), preprocess the media, expand each placeholder into the
  tokens its item becomes, tokenize, and mark media tokens in `mm_token_type_ids`;
- `process()` returns the `BatchFeature` plus one `MediaItem` per image / video (placeholder count, token
  offset, pixel rows, content hash): what the engine needs, kept off the transformers-identical keys;
- `apply_chat_template` with transformers 5.23's behaviour: renders, collects each conversation's media in
  order (`image` / `url` / `path` / `base64` keys, OpenAI `image_url` blocks), and calls the processor.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from .batch import BatchFeature
from .chat_template import render_chat_template
from .errors import ConfigError, PlaceholderMismatchError, UnsupportedFeatureError
from .image_processing_utils import flatten_images
from .loading import read_json, resolve_checkpoint, write_json
from .tokenization import Tokenizer

__all__ = ["TEXT_KWARGS", "MediaItem", "ProcessorFiles", "ProcessorMixin", "ProcessorOutput"]

HUB_KWARGS = ("revision", "local_files_only", "token", "cache_dir")
# Call-time options of the tokenizer (transformers' TextKwargs).
TEXT_KWARGS = frozenset(
    {
        "add_special_tokens",
        "padding",
        "truncation",
        "max_length",
        "stride",
        "is_split_into_words",
        "pad_to_multiple_of",
        "return_token_type_ids",
        "return_attention_mask",
        "return_overflowing_tokens",
        "return_special_tokens_mask",
        "return_offsets_mapping",
        "return_length",
        "verbose",
        "padding_side",
    }
)
# Older spellings accepted by apply_chat_template / __call__.
KWARG_ALIASES = {"video_fps": "fps"}


@dataclasses.dataclass(frozen=True)
class MediaItem:
    """One image or video of a processed batch, as the engine sees it."""

    modality: str  # "image" or "video"
    index: int  # position among the batch's items of this modality
    sample: int  # batch row whose text holds its placeholder
    token_id: int  # the placeholder token id
    num_tokens: int  # placeholder tokens it becomes in input_ids
    offset: int  # index of its first placeholder token in the (padded) row
    rows: tuple[int, int]  # [start, end) rows of pixel_values / pixel_values_videos
    grid_thw: tuple[int, ...]  # the vision grid (family specific; () when it has none)
    content_hash: str  # media_hash of the decoded pixels + processing options


@dataclasses.dataclass
class ProcessorOutput:
    features: BatchFeature  # exactly transformers' keys, shapes and dtypes
    media: list[MediaItem]  # in pixel order: images first, then videos


@dataclasses.dataclass
class ProcessorFiles:
    """The processor-related files of a checkpoint folder, whichever layout it uses."""

    processor: dict[str, Any]  # processor_config.json without the nested sub-processors
    image: dict[str, Any] | None  # the image processor config (nested or preprocessor_config.json)
    video: dict[str, Any] | None  # the video processor config (nested, its own file, or the image one)
    chat_template: str | dict[str, str] | None

    @classmethod
    def read(cls, folder: Path) -> ProcessorFiles:
        processor = dict(read_json(folder, "processor_config.json") or {})
        image = processor.pop("image_processor", None) or read_json(folder, "preprocessor_config.json")
        video = (
            processor.pop("video_processor", None)
            or read_json(folder, "video_preprocessor_config.json")
            or read_json(folder, "preprocessor_config.json")
        )
        return cls(
            processor, image, video, processor.pop("chat_template", None) or _read_chat_template(folder)
        )


def _read_chat_template(folder: Path) -> str | dict[str, str] | None:
    """chat_template.json (legacy) or chat_template.jinja + additional_chat_templates/*.jinja."""
    legacy = read_json(folder, "chat_template.json")
    if legacy is not None:
        return legacy.get("chat_template")
    templates = {
        p.stem: p.read_text(encoding="utf-8")
        for p in sorted(folder.glob("additional_chat_templates/*.jinja"))
    }
    if (folder / "chat_template.jinja").is_file():
        templates["default"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if not templates:
        return None
    return templates["default"] if list(templates) == ["default"] else templates


@dataclasses.dataclass
class CallOptions:
    """Call-time keyword arguments, split by the sub-processor that takes them."""

    text: dict[str, Any]
    images: dict[str, Any]
    videos: dict[str, Any]
    return_tensors: str | None
    return_mm_token_type_ids: bool


def _is_unit_float(image: Any) -> bool:
    """A float array / tensor with values in [0, 1] (an already rescaled image)."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().float().numpy() if image.is_floating_point() else None
    if not isinstance(image, np.ndarray) or not np.issubdtype(image.dtype, np.floating) or not image.size:
        return False
    return bool(image.min() >= 0 and image.max() <= 1)


class ProcessorMixin:
    """Base of the family processors: tokenizer + image processor + video processor + chat template.

    Subclasses set the class attributes, and implement `replace_image_token` / `replace_video_token`
    (the text one item's placeholder becomes) and `image_grid` / `video_grid` (its grid, for the report).
    """

    image_processor_class: ClassVar[type | None] = None
    video_processor_class: ClassVar[type | None] = None
    default_image_token: ClassVar[str | None] = None
    default_video_token: ClassVar[str | None] = None
    return_mm_token_type_ids: ClassVar[bool] = False
    processor_fields: ClassVar[tuple[str, ...]] = ()  # extra processor_config.json keys __init__ takes

    def __init__(
        self,
        image_processor=None,
        tokenizer: Tokenizer | None = None,
        video_processor=None,
        chat_template: str | dict[str, str] | None = None,
        **unused: Any,
    ):
        # A missing sub-processor gets the family's defaults (transformers would refuse to build).
        if image_processor is None and self.image_processor_class is not None:
            image_processor = self.image_processor_class()
        if video_processor is None and self.video_processor_class is not None:
            video_processor = self.video_processor_class()
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.video_processor = video_processor
        self.chat_template = chat_template
        self.image_token = self._special_token("image_token", self.default_image_token)
        self.video_token = self._special_token("video_token", self.default_video_token)
        self.image_token_id = self._token_id(self.image_token)
        self.video_token_id = self._token_id(self.video_token)

    def _special_token(self, name: str, default: str | None) -> str | None:
        if default is None:
            return None
        return getattr(self.tokenizer, name, None) or default

    def _token_id(self, token: str | None) -> int | None:
        return (
            None if token is None or self.tokenizer is None else self.tokenizer.convert_tokens_to_ids(token)
        )

    # ------------------------------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs: Any) -> ProcessorMixin:
        """Load from a checkpoint folder or hub id; kwargs override the sub-processor that takes them."""
        hub = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
        kwargs = {KWARG_ALIASES.get(k, k): v for k, v in kwargs.items()}
        folder = resolve_checkpoint(name_or_path, **hub)
        files = ProcessorFiles.read(folder)
        image_processor = cls._build_sub(cls.image_processor_class, files.image, kwargs)
        video_processor = cls._build_sub(cls.video_processor_class, files.video, kwargs)
        taken = cls._sub_kwargs(cls.image_processor_class) | cls._sub_kwargs(cls.video_processor_class)
        extra = {
            k: kwargs.get(k, files.processor.get(k))
            for k in cls.processor_fields
            if k in kwargs or k in files.processor
        }
        tokenizer_kwargs = {
            k: v for k, v in kwargs.items() if k not in taken and k not in extra and k != "chat_template"
        }
        tokenizer = Tokenizer.from_pretrained(folder, **tokenizer_kwargs)
        chat_template = kwargs.get("chat_template") or files.chat_template or tokenizer.chat_template
        processor = cls(image_processor, tokenizer, video_processor, chat_template=chat_template, **extra)
        processor._source = (files, {k: v for k, v in kwargs.items() if k in taken})
        return processor

    def save_pretrained(self, save_directory: str | os.PathLike, **ignored: Any) -> list[str]:
        """Write the folder transformers 5 writes: tokenizer files, processor_config.json with the image and
        video processor configs nested (the loaded ones, with load-time overrides), chat_template.jinja.
        Works on a processor loaded with from_pretrained; `push_to_hub` and other options are ignored."""
        source = self.__dict__.get("_source")
        if source is None:
            raise UnsupportedFeatureError(
                "save_pretrained works on a processor loaded with from_pretrained: it writes back the "
                "configuration it was loaded from."
            )
        files, overrides = source
        folder = Path(save_directory)
        written = list(self.tokenizer.save_pretrained(folder))
        config = {key: value for key, value in files.processor.items() if key != "chat_template"}
        for key in self.processor_fields:
            if hasattr(self, key):
                config[key] = getattr(self, key)
        for key, sub, sub_config in (("image_processor", self.image_processor, files.image),
                                     ("video_processor", self.video_processor, files.video)):
            if sub is not None:
                taken = {k: v for k, v in overrides.items() if k in type(sub).accepted_kwargs()}
                config[key] = {**(sub_config or {}), **taken}
        config["processor_class"] = type(self).__name__
        write_json(folder / "processor_config.json", config)
        written.append(str(folder / "processor_config.json"))
        templates = self.chat_template if isinstance(self.chat_template, dict) else {"default": self.chat_template}
        for name, template in templates.items():
            if template is None:
                continue
            path = folder / ("chat_template.jinja" if name == "default" else f"additional_chat_templates/{name}.jinja")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(template, encoding="utf-8")
            written.append(str(path))
        return written

    @staticmethod
    def _sub_kwargs(sub_cls: type | None) -> frozenset[str]:
        return sub_cls.accepted_kwargs() if sub_cls is not None else frozenset()

    @staticmethod
    def _build_sub(sub_cls: type | None, config: dict | None, kwargs: dict[str, Any]):
        if sub_cls is None:
            return None
        return sub_cls.from_dict(config or {}, **kwargs)

    # ---------------------------------------------------------------------------------------- call flow

    def split_kwargs(self, kwargs: dict[str, Any]) -> CallOptions:
        """Route call kwargs like transformers' `_merge_kwargs` (flat kwargs beat per-modality dicts)."""
        kwargs = {KWARG_ALIASES.get(k, k): v for k, v in kwargs.items()}
        common = dict(kwargs.pop("common_kwargs", None) or {})
        text = {**common, **(kwargs.pop("text_kwargs", None) or {})}
        images = {**common, **(kwargs.pop("images_kwargs", None) or {})}
        videos = {**common, **(kwargs.pop("videos_kwargs", None) or {})}
        want_types = kwargs.pop("return_mm_token_type_ids", text.pop("return_mm_token_type_ids", None))
        return_tensors = kwargs.pop("return_tensors", common.get("return_tensors"))
        image_keys = (
            self._sub_kwargs(type(self.image_processor)) if self.image_processor is not None else set()
        )
        video_keys = (
            self._sub_kwargs(type(self.video_processor)) if self.video_processor is not None else set()
        )
        for key, value in kwargs.items():
            if key in TEXT_KWARGS:
                text[key] = value
            if key in image_keys:
                images[key] = value
            if key in video_keys:
                videos[key] = value
        for sub in (text, images, videos):  # one return_tensors for the whole output
            tensors = sub.pop("return_tensors", None)
            return_tensors = return_tensors if return_tensors is not None else tensors
        want_types = self.return_mm_token_type_ids if want_types is None else bool(want_types)
        return CallOptions(text, images, videos, return_tensors, want_types)

    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        videos: Any = None,
        audio: Any = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Tokenize `text` with each media placeholder expanded, and preprocess `images` / `videos`."""
        return self.process(
            images=images, text=text, videos=videos, audio=audio, hash_media=False, **kwargs
        ).features

    def process(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        videos: Any = None,
        audio: Any = None,
        *,
        hash_media: bool = True,
        **kwargs: Any,
    ) -> ProcessorOutput:
        """`__call__` plus the per-item media report (content hashes are skipped with `hash_media=False`)."""
        if audio is not None:
            raise ConfigError(
                f"{type(self).__name__} does not take audio: pass text, images and videos only."
            )
        if images is None and text is None and videos is None:
            raise ValueError(f"{type(self).__name__} needs at least one of text, images or videos.")
        self._check_inputs(text, videos)
        options = self.split_kwargs(kwargs)
        texts = [text] if isinstance(text, str) else (list(text) if text is not None else None)
        image_items = self.image_processor.load(images) if images is not None else []
        self._unit_float_rescale(images, options)
        video_items = self.video_processor.load(videos, options.videos) if videos is not None else []
        if texts is not None:
            self._check_placeholders(texts, len(image_items), len(video_items))
        tensors = options.return_tensors
        image_out = self.image_processor.run(image_items, tensors, **options.images) if image_items else {}
        video_out = self.video_processor.run(video_items, tensors, **options.videos) if video_items else {}
        data, media = self._text_features(texts, image_out, video_out, options)
        data.update({k: v for k, v in {**image_out, **video_out}.items() if k in self._pixel_keys()})
        features = BatchFeature(data, tensor_type=options.return_tensors)
        if hash_media:
            media = self._hash_media(media, image_items, video_items, options)
        return ProcessorOutput(features, media)

    def _check_inputs(self, text: Any, videos: Any) -> None:
        name = type(self).__name__
        texts = [] if text is None else [text] if isinstance(text, str) else text
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise ConfigError(f"{name}: text must be a string or a list of strings, got {text!r:.80}.")
        if videos is not None and self.video_processor is None:
            raise ConfigError(f"{name} takes no videos: this model reads text and images only.")

    def _unit_float_rescale(self, images: Any, options: CallOptions) -> None:
        """`do_rescale=False` is how transformers is told "these floats are already in [0, 1]". ocula reads
        such floats as x*255 uint8 (like transformers' PIL path before resizing), so they still take the
        1/255 step; without this they came out 255 times too large."""
        do_rescale = options.images.get("do_rescale", getattr(self.image_processor, "do_rescale", True))
        if images is None or do_rescale:
            return
        unit = [_is_unit_float(image) for image in flatten_images(images)]
        if all(unit):
            options.images["do_rescale"] = True
        elif any(unit):
            raise UnsupportedFeatureError(
                "do_rescale=False with [0, 1] float images next to other images in one call is ambiguous: "
                "process the float images in a call of their own."
            )

    def _pixel_keys(self) -> list[str]:
        keys = list(getattr(self.image_processor, "model_input_names", []))
        return keys + list(getattr(self.video_processor, "model_input_names", []))

    def _check_placeholders(self, texts: list[str], num_images: int, num_videos: int) -> None:
        for token, count, kind in (
            (self.image_token, num_images, "image"),
            (self.video_token, num_videos, "video"),
        ):
            if token is None:
                continue
            found = sum(t.count(token) for t in texts)
            if found != count:
                raise PlaceholderMismatchError(
                    f"The text has {found} {token} placeholder(s) but {count} {kind}(s) were given: put one "
                    f"{token} in the text for each {kind}, in order (apply_chat_template writes them)."
                )

    def _text_features(
        self, texts, image_out, video_out, options: CallOptions
    ) -> tuple[dict, list[MediaItem]]:
        if texts is None:
            return {}, []
        image_texts = [self.replace_image_token(image_out, i) for i in range(self._count(image_out, "image"))]
        video_texts = [self.replace_video_token(video_out, i) for i in range(self._count(video_out, "video"))]
        expanded, owners = self._expand(texts, image_texts, video_texts)
        encoded = self.tokenizer(expanded, **options.text, return_tensors=None)
        data = dict(encoded.data)
        if options.return_mm_token_type_ids:
            data["mm_token_type_ids"] = self.mm_token_type_ids(data["input_ids"])
        media = self._locate_media(data["input_ids"], owners, image_out, video_out)
        return data, media

    def _count(self, outputs: dict, modality: str) -> int:
        grids = outputs.get(f"{modality}_grid_thw")
        return 0 if grids is None else len(grids)

    def _expand(self, texts: list[str], image_texts: list[str], video_texts: list[str]):
        """Replace the i-th placeholder of each kind (across the batch, in order) by its expansion."""
        tokens = {
            "image": self.image_token if image_texts else None,
            "video": self.video_token if video_texts else None,
        }
        alternatives = [f"(?P<{k}>{re.escape(t)})" for k, t in tokens.items() if t is not None]
        if not alternatives:
            return list(texts), []
        pattern = re.compile("|".join(alternatives))
        pending = {"image": iter(image_texts), "video": iter(video_texts)}
        owners: list[tuple[str, int]] = []  # (modality, sample) per item, in order of appearance

        def substitute(sample: int) -> Any:
            def one(match: re.Match) -> str:
                owners.append((match.lastgroup, sample))
                return next(pending[match.lastgroup])

            return one

        return [pattern.sub(substitute(i), t) for i, t in enumerate(texts)], owners

    def mm_token_type_ids(self, input_ids: list[list[int]]) -> list[list[int]]:
        """0 text, 1 image, 2 video per token (transformers' `create_mm_token_type_ids`), per row."""
        out = []
        for row in input_ids:
            ids = np.asarray(row)
            types = np.zeros_like(ids)
            if self.image_token_id is not None:
                types[ids == self.image_token_id] = 1
            if self.video_token_id is not None:
                types[ids == self.video_token_id] = 2
            out.append(types.tolist())
        return out

    # ------------------------------------------------------------------------------------- media report

    def _locate_media(self, input_ids, owners, image_out, video_out) -> list[MediaItem]:
        """Each item's placeholder offset: its row's placeholder tokens are taken item by item, in order."""
        outputs = {"image": image_out, "video": video_out}
        token_ids = {"image": self.image_token_id, "video": self.video_token_id}
        counters, rows, cursors = {"image": 0, "video": 0}, {"image": 0, "video": 0}, {}
        items = []
        for modality, sample in owners:
            index, token_id = counters[modality], token_ids[modality]
            positions = np.flatnonzero(np.asarray(input_ids[sample]) == token_id)
            num_tokens = self.item_tokens(outputs[modality], modality, index)
            cursor = cursors.get((sample, modality), 0)
            if cursor + num_tokens > len(positions):
                raise PlaceholderMismatchError(
                    f"Row {sample} keeps {len(positions) - cursor} of the {num_tokens} placeholder tokens of "
                    f"{modality} {index}: truncation cut them. Raise max_length or drop truncation."
                )
            num_rows = self.item_rows(outputs[modality], modality, index)
            span = (rows[modality], rows[modality] + num_rows)
            grid = self.item_grid(outputs[modality], modality, index)
            offset = int(positions[cursor])
            items.append(MediaItem(modality, index, sample, token_id, num_tokens, offset, span, grid, ""))
            cursors[(sample, modality)] = cursor + num_tokens
            counters[modality], rows[modality] = index + 1, span[1]
        return sorted(items, key=lambda m: (m.modality != "image", m.index))

    def _hash_media(
        self, media: list[MediaItem], image_items, video_items, options: CallOptions
    ) -> list[MediaItem]:
        from .media import media_hash  # content hashes of the decoded pixels

        out = []
        for item in media:
            source = image_items if item.modality == "image" else video_items
            processor = self.image_processor if item.modality == "image" else self.video_processor
            settings = processor.options_key(options.images if item.modality == "image" else options.videos)
            pixels = source[item.index]
            pixels = getattr(pixels, "frames", pixels)
            out.append(
                dataclasses.replace(item, content_hash=media_hash(pixels, modality=item.modality, **settings))
            )
        return out

    # Family hooks --------------------------------------------------------------------------------------

    def replace_image_token(self, image_outputs: dict, index: int) -> str:
        raise NotImplementedError(f"{type(self).__name__} does not expand image placeholders")

    def replace_video_token(self, video_outputs: dict, index: int) -> str:
        raise NotImplementedError(f"{type(self).__name__} does not expand video placeholders")

    def item_grid(self, outputs: dict, modality: str, index: int) -> tuple[int, ...]:
        grids = outputs.get(f"{modality}_grid_thw")
        return tuple(int(x) for x in grids[index]) if grids is not None else ()

    def item_tokens(self, outputs: dict, modality: str, index: int) -> int:
        text = (
            self.replace_image_token(outputs, index)
            if modality == "image"
            else self.replace_video_token(outputs, index)
        )
        token = self.image_token if modality == "image" else self.video_token
        return text.count(token)

    def item_rows(self, outputs: dict, modality: str, index: int) -> int:
        return int(np.prod(self.item_grid(outputs, modality, index)))

    # ------------------------------------------------------------------------------------ chat template

    def _resolve_chat_template(self, chat_template: str | None) -> str:
        templates = self.chat_template
        if isinstance(templates, dict):
            if chat_template is not None:
                return templates.get(chat_template, chat_template)
            if "default" in templates:
                return templates["default"]
            raise ValueError(
                f"This processor has several chat templates and none is named 'default': pass one of "
                f"{sorted(templates)} as chat_template=."
            )
        if chat_template is not None:
            return chat_template
        if templates is None:
            raise ValueError(
                "This processor has no chat template: pass chat_template= (a jinja string), or add "
                "chat_template.jinja to the checkpoint folder."
            )
        return templates

    def apply_chat_template(
        self,
        conversation: list[dict] | list[list[dict]],
        chat_template: str | None = None,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool | str = False,
        tokenize: bool = False,
        return_tensors: str | None = "auto",
        return_dict: bool = False,
        processor_kwargs: dict | None = None,
        return_assistant_tokens_mask: bool = False,
        **kwargs: Any,
    ) -> str | list[str] | list | BatchFeature:
        """Render a conversation (or a batch); with `tokenize=True` also load its media and run the processor.

        Extra kwargs reach the template (e.g. `add_vision_id=True`); those the processor takes and the
        template does not mention (`fps`, `num_frames`, `padding`, `max_pixels`, ...) reach the processor too.
        """
        if return_assistant_tokens_mask:
            raise UnsupportedFeatureError(
                "return_assistant_tokens_mask is not supported by processors yet: for text-only training "
                "data use tokenizer.apply_chat_template(..., return_assistant_tokens_mask=True)."
            )
        template = self._resolve_chat_template(chat_template)
        conversations, batched = normalize_conversations(conversation)
        call_kwargs = dict(processor_kwargs or {})
        call_kwargs.update(
            {k: v for k, v in kwargs.items() if self._is_call_kwarg(k) and not _mentions(template, k)}
        )
        texts = render_chat_template(
            template,
            conversations,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tools=tools,
            documents=documents,
            **{**self.tokenizer.special_tokens_map, **kwargs},
        )
        if not tokenize:
            return texts if batched else texts[0]
        return self._tokenize_chat(conversations, texts, batched, return_tensors, return_dict, call_kwargs)

    def _is_call_kwarg(self, key: str) -> bool:
        key = KWARG_ALIASES.get(key, key)
        subs = (self.image_processor, self.video_processor)
        return (
            key in TEXT_KWARGS
            or key
            in ("return_mm_token_type_ids", "text_kwargs", "images_kwargs", "videos_kwargs", "common_kwargs")
            or any(s is not None and key in s.accepted_kwargs() for s in subs)
        )

    def _tokenize_chat(self, conversations, texts, batched, return_tensors, return_dict, call_kwargs):
        images, videos = collect_media(conversations)
        bos = self.tokenizer.bos_token
        if bos is not None and texts[0].startswith(bos):
            call_kwargs["add_special_tokens"] = False
        # transformers samples frames as soon as fps or num_frames is given (unless told not to).
        sampling = {KWARG_ALIASES.get(k, k) for k, v in call_kwargs.items() if v is not None} & {
            "fps",
            "num_frames",
        }
        if "do_sample_frames" not in call_kwargs and sampling:
            call_kwargs["do_sample_frames"] = True
        if return_tensors != "auto":
            call_kwargs["return_tensors"] = return_tensors
        if "images" in call_kwargs:
            extra = call_kwargs.pop("images")
            images = [extra] if not batched else extra
        out = self(
            text=texts if batched else texts[0],
            images=images if any(len(x) for x in images) else None,
            videos=videos if any(len(x) for x in videos) else None,
            **call_kwargs,
        )
        return out if return_dict else out["input_ids"]

    # ------------------------------------------------------------------------------------------ decoding

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(*args, **kwargs)

    def post_process_image_text_to_text(
        self,
        generated_outputs: Any,
        skip_special_tokens: bool = True,
        clean_up_tokenization_spaces: bool = False,
        **kwargs: Any,
    ) -> list[str]:
        """Decode generated ids (a [B, S] tensor / array / list) into strings."""
        if isinstance(generated_outputs, torch.Tensor) and generated_outputs.ndim == 1:
            generated_outputs = generated_outputs[None]
        return self.tokenizer.batch_decode(
            generated_outputs,
            skip_special_tokens=skip_special_tokens,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )

    @property
    def model_input_names(self) -> list[str]:
        """transformers' order: image processor, tokenizer, video processor (+ mm_token_type_ids)."""
        names = list(getattr(self.image_processor, "model_input_names", []))
        names += list(getattr(self.tokenizer, "model_input_names", ["input_ids", "attention_mask"]))
        names += list(getattr(self.video_processor, "model_input_names", []))
        return names + (["mm_token_type_ids"] if self.return_mm_token_type_ids else [])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(tokenizer={self.tokenizer!r}, image_processor={self.image_processor!r}, "
            f"video_processor={self.video_processor!r})"
        )


def _mentions(template: str, name: str) -> bool:
    return re.search(rf"\b{re.escape(name)}\b", template) is not None


def normalize_conversations(conversation: Any) -> tuple[list[list[dict]], bool]:
    """Batch a single conversation, drop None-valued keys, OpenAI `image_url` blocks -> image blocks."""
    if isinstance(conversation, (list, tuple)) and not conversation:
        raise ValueError("Cannot apply a chat template to an empty conversation: give at least one message.")
    first = conversation[0]
    batched = isinstance(first, (list, tuple)) or hasattr(first, "messages")
    chats = [getattr(c, "messages", c) for c in conversation] if batched else [conversation]
    out = []
    for chat in chats:
        messages = []
        for message in chat:
            message = {k: v for k, v in message.items() if v is not None}
            if isinstance(message.get("content"), list):
                message["content"] = [_openai_block(block) for block in message["content"]]
            messages.append(message)
        out.append(messages)
    return out, batched


def _openai_block(block: Any) -> Any:
    if isinstance(block, dict) and block.get("type") == "image_url" and "image_url" in block:
        info = block["image_url"]
        return {"type": "image", "url": info.get("url", "") if isinstance(info, dict) else info}
    return block


def collect_media(conversations: list[list[dict]]) -> tuple[list[list[Any]], list[list[Any]]]:
    """The images and videos of each conversation, in order of appearance (transformers' key order)."""
    batch_images, batch_videos = [], []
    for chat in conversations:
        images, videos = [], []
        for message in chat:
            content = message.get("content")
            if not isinstance(content, list):
                continue
            for block in content:
                kind = block.get("type") if isinstance(block, dict) else None
                if kind == "image":
                    images.extend(block[k] for k in ("image", "url", "path", "base64") if k in block)
                elif kind == "video":
                    videos.extend(block[k] for k in ("video", "url", "path") if k in block)
        batch_images.append(images)
        batch_videos.append(videos)
    return batch_images, batch_videos
