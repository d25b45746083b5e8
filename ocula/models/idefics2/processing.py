"""Idefics2 preprocessing: the image processor and the processor that ties it to the text.

Notable features:
- images: uint8 in; optional splitting of the original (not yet resized) image into 4 quarter crops + the
  image itself; each crop resized on its own with one PIL call (bilinear by default; the longest edge capped
  at `size["longest_edge"]` keeping the aspect ratio, then each side raised to at least
  `size["shortest_edge"]`, as transformers does), then rescale + normalise in one table lookup, so the pixels
  are bit-identical to transformers' PIL image processor;
- batches: images are grouped per sample (a nested list, or a flat list split by the `<image>` count of each
  text), padded with zeros to the largest height / width of the whole batch (`pixel_attention_mask` int64,
  1 = real pixel), and each sample is padded to the largest image count with all-zero images:
  `pixel_values` float32 [B, max_images, 3, H, W], `pixel_attention_mask` [B, max_images, H, W];
- numpy / torch arrays (HWC or CHW), paths and URLs are accepted as images (transformers' processor takes
  only PIL images and URLs: see docs/compatibility.md); PIL images reach the processor's pixels as
  transformers' `load_image` leaves them (EXIF-rotated, alpha dropped), the image processor alone composites
  transparency onto white, as transformers' does;
- text: each `<image>` becomes `<fake_token_around_image>` + image_seq_len x `<image>` +
  `<fake_token_around_image>` (x 5 with splitting), adjacent fake tokens merged, a space put after a closing
  fake token that touches a word; BOS comes from the tokenizer;
- `do_image_splitting` given at load time or at call time changes the text expansion and the pixels
  together (transformers 5.23 expands the text with the load-time value only: docs/compatibility.md);
- the media report has one item per crop (a contiguous run of image_seq_len `<image>` tokens; an image's
  crops are separated by fake tokens), with `media_inputs` giving that crop's own model inputs.
Checked against transformers 5.23 `models/idefics2/{image_processing_pil_idefics2, processing_idefics2}.py`
(tests/test_idefics2_processing.py).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from typing import Any, ClassVar

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch

from ...batch import BatchFeature
from ...errors import ConfigError, MediaError, PlaceholderMismatchError
from ...image_processing_utils import (
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    ImageOptions,
    is_image,
    normalize_table,
    pil_resize,
    to_rgb_array,
)
from ...loading import resolve_checkpoint
from ...processing_utils import HUB_KWARGS, MediaItem, ProcessorFiles, ProcessorMixin, ProcessorOutput

__all__ = ["Idefics2ImageProcessor", "Idefics2Processor", "resize_output_size", "split_image"]

CROPS_WHEN_SPLIT = 5  # 4 quarters + the whole image


def resize_output_size(height: int, width: int, shortest_edge: int, longest_edge: int) -> tuple[int, int]:
    """transformers' Idefics2 rule: cap the longest side (aspect kept, truncated), then floor both sides."""
    aspect = width / height
    if width >= height and width > longest_edge:
        width = longest_edge
        height = int(width / aspect)
    elif height > width and height > longest_edge:
        height = longest_edge
        width = int(height * aspect)
    return max(height, shortest_edge), max(width, shortest_edge)


def split_image(image: np.ndarray) -> list[np.ndarray]:
    """[H, W, C] -> the 4 quarters (top-left, top-right, bottom-left, bottom-right) and the image itself."""
    mid_h, mid_w = image.shape[0] // 2, image.shape[1] // 2
    return [image[:mid_h, :mid_w], image[:mid_h, mid_w:], image[mid_h:, :mid_w], image[mid_h:, mid_w:], image]


def _is_image_like(x: Any) -> bool:
    return is_image(x) or isinstance(x, str)


def nest_images(images: Any) -> list[list[Any]]:
    """transformers' `make_nested_list_of_images`: one image, a list (one sample), or a list per sample."""
    if _is_image_like(images):
        return [[images]]
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return [list(images)]
    if isinstance(images, (list, tuple)) and images:
        if all(isinstance(x, (list, tuple)) for x in images):
            return [list(sample) for sample in images]
        if all(_is_image_like(x) for x in images):
            return [list(images)]
    raise MediaError(
        f"Cannot read images from {type(images).__name__}: pass an image (PIL, HWC/CHW array or tensor, path, "
        "URL), a list of them, or one list of images per text."
    )


# ---------------------------------------------------------------------------------------------- images


@dataclasses.dataclass
class Idefics2ImageProcessor(ImageOptions):
    """Images -> `pixel_values` float32 [B, max_images, 3, H, W] and `pixel_attention_mask` int64."""

    size: dict[str, int] = dataclasses.field(
        default_factory=lambda: {"shortest_edge": 378, "longest_edge": 980}
    )
    resample: int = 2  # PIL code; 2 = bilinear
    image_mean: tuple[float, ...] = IMAGENET_STANDARD_MEAN
    image_std: tuple[float, ...] = IMAGENET_STANDARD_STD
    do_pad: bool = True  # pad to the batch's largest image and image count (else every image must match)
    do_image_splitting: bool = False  # 4 quarter crops + the image: 5 images (and 5x the tokens) per image

    model_input_names: ClassVar[list[str]] = ["pixel_values", "pixel_attention_mask"]

    def __post_init__(self) -> None:
        if not isinstance(self.size, dict):
            raise ConfigError(
                f"size must be a dict with 'shortest_edge' and 'longest_edge', got {self.size!r}."
            )
        self.size = dict(self.size)

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs: Any) -> Idefics2ImageProcessor:
        """The image processor of a checkpoint folder or hub id (either layout); kwargs override its options."""
        hub = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
        return cls.from_dict(ProcessorFiles.read(resolve_checkpoint(name_or_path, **hub)).image, **kwargs)

    @property
    def crops(self) -> int:
        """Images each input image becomes."""
        return CROPS_WHEN_SPLIT if self.do_image_splitting else 1

    def load(self, images: Any) -> list[list[np.ndarray]]:
        """Decode every image of every sample into uint8 RGB [H, W, 3]."""
        return [[to_rgb_array(image) for image in sample] for sample in nest_images(images)]

    def run(self, samples: list[list[np.ndarray]], return_tensors: str | None = "pt", **kwargs: Any) -> dict:
        """Split, resize, normalise and pad decoded images, with call-time overrides as keyword arguments."""
        options = self.replace(**kwargs)
        table = options._table()
        processed = [
            [normalized(options._resize(crop), table) for image in sample for crop in options.crops_of(image)]
            for sample in samples
        ]
        values = _pad_batch(processed) if options.do_pad else _stack_unpadded(processed)
        if return_tensors == "pt":
            return values
        return {k: v.numpy() for k, v in values.items()}

    def __call__(self, images: Any, return_tensors: str | None = None, **kwargs: Any) -> BatchFeature:
        return BatchFeature(
            self.run(self.load(images), return_tensors=return_tensors, **kwargs), tensor_type=return_tensors
        )

    preprocess = __call__

    def crops_of(self, image: np.ndarray) -> list[np.ndarray]:
        """The images one input image becomes: its 4 quarters and itself, or itself."""
        if self.do_image_splitting and min(image.shape[:2]) < 2:  # a quarter would be empty
            raise MediaError(
                f"An image of {image.shape[1]}x{image.shape[0]} pixels cannot be split into quarters: pass "
                "one of at least 2x2 pixels, or do_image_splitting=False."
            )
        return split_image(image) if self.do_image_splitting else [image]

    def _resize(self, image: np.ndarray) -> np.ndarray:
        if not self.do_resize:
            return image
        height, width = self._target(*image.shape[:2])
        return pil_resize(image, height, width, self.resample)

    def _target(self, height: int, width: int) -> tuple[int, int]:
        size = self.size
        if size.get("shortest_edge") and size.get("longest_edge"):
            return resize_output_size(height, width, size["shortest_edge"], size["longest_edge"])
        if size.get("height") and size.get("width"):
            return size["height"], size["width"]
        raise MediaError(
            f"size must have 'shortest_edge' and 'longest_edge' (or 'height' and 'width'), got {size}."
        )

    def _table(self) -> np.ndarray:
        return normalize_table(
            self.do_rescale, self.rescale_factor, self.do_normalize, self.image_mean, self.image_std
        )


def normalized(image: np.ndarray, table: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [3, H, W] through the per-channel value table [3, 256]."""
    return torch.from_numpy(np.stack([table[c][image[..., c]] for c in range(table.shape[0])]))


def _pad_batch(samples: list[list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Zero-pad every image to the batch's largest H and W, and every sample to the largest image count."""
    images = [image for sample in samples for image in sample]
    height, width = max(i.shape[1] for i in images), max(i.shape[2] for i in images)
    count = max(len(sample) for sample in samples)
    pixels = torch.zeros(len(samples), count, 3, height, width, dtype=torch.float32)
    mask = torch.zeros(len(samples), count, height, width, dtype=torch.int64)
    for b, sample in enumerate(samples):
        for j, image in enumerate(sample):
            pixels[b, j, :, : image.shape[1], : image.shape[2]] = image
            mask[b, j, : image.shape[1], : image.shape[2]] = 1
    return {"pixel_values": pixels, "pixel_attention_mask": mask}


def _stack_unpadded(samples: list[list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    shapes = {tuple(image.shape) for sample in samples for image in sample}
    counts = {len(sample) for sample in samples}
    if len(shapes) != 1 or len(counts) != 1:
        raise MediaError(
            "With do_pad=False every image (crop) and every sample's image count must match; "
            f"got sizes {sorted(shapes)} and counts {sorted(counts)}. Use do_pad=True."
        )
    return {"pixel_values": torch.stack([torch.stack(sample) for sample in samples])}


# ------------------------------------------------------------------------------------------- processor


class Idefics2Processor(ProcessorMixin):
    """Idefics2's processor: the Llama-style tokenizer, the image processor above and the chat template."""

    image_processor_class = Idefics2ImageProcessor
    default_image_token = "<image>"
    processor_fields = ("image_seq_len",)
    fake_image_token: ClassVar[str] = "<fake_token_around_image>"
    end_of_utterance_token: ClassVar[str] = "<end_of_utterance>"

    def __init__(
        self,
        image_processor: Idefics2ImageProcessor | None = None,
        tokenizer=None,
        video_processor: Any = None,
        chat_template: str | dict[str, str] | None = None,
        *,
        image_seq_len: int = 64,
        **unused: Any,
    ):
        # transformers' positional order is (image_processor, tokenizer, image_seq_len, chat_template)
        if isinstance(video_processor, int):
            image_seq_len, video_processor = video_processor, None
        super().__init__(image_processor, tokenizer, None, chat_template)
        _check_tokens(tokenizer, (self.fake_image_token, self.image_token))
        self.image_seq_len = int(image_seq_len)  # <image> tokens per image (crop): the perceiver's latents
        self.fake_image_token_id = self._token_id(self.fake_image_token)
        self._closing_fake = re.compile(rf"{re.escape(self.fake_image_token)}(?=[^\s<])")

    def expand_text(self, text: str, crops: int) -> str:
        """One prompt with every `<image>` replaced by its fake-token-wrapped run (transformers' spacing rules)."""
        fake = self.fake_image_token
        run = f"{fake}{self.image_token * self.image_seq_len}{fake}" * crops
        text = text.replace(self.image_token, run).replace(f"{fake}{fake}", fake)
        return self._closing_fake.sub(f"{fake} ", text)

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
        """`__call__` plus the per-image media report (content hashes skipped with `hash_media=False`)."""
        if videos is not None or audio is not None:
            raise ConfigError("Idefics2Processor takes text and images only (no videos or audio).")
        if images is None and text is None:
            raise ValueError("Idefics2Processor needs text, images or both.")
        options = self.split_kwargs(kwargs)
        image_options = self.image_processor.replace(**options.images)  # the call's effective options
        texts = [text] if isinstance(text, str) else (list(text) if text is not None else None)
        samples = self._group_images(images, texts) if images is not None else None
        decoded = [[processor_image(image) for image in sample] for sample in samples] if samples else None
        data: dict[str, Any] = {}
        if texts is not None:  # expanded with the same splitting option as the pixels below
            prompts = [self.expand_text(t, image_options.crops) for t in texts]
            data.update(self.tokenizer(prompts, **options.text, return_tensors=None).data)
        if decoded is not None:
            data.update(self.image_processor.run(decoded, options.return_tensors or "np", **options.images))
        features = BatchFeature(data, tensor_type=options.return_tensors)
        media = []
        if decoded and texts is not None:
            media = self._media_items(data["input_ids"], decoded, image_options.crops)
            if hash_media:
                crops = [
                    crop for sample in decoded for image in sample for crop in image_options.crops_of(image)
                ]
                media = self._hash_media(media, crops, [], options)
        return ProcessorOutput(features, media)

    def _group_images(self, images: Any, texts: list[str] | None) -> list[list[Any]]:
        """Images per sample: as nested by the caller, or a flat list split by each text's `<image>` count."""
        flat_input = _is_image_like(images) or (
            isinstance(images, (list, tuple)) and images and not isinstance(images[0], (list, tuple))
        )
        samples = nest_images(images)
        if texts is None:
            return samples
        counts = [t.count(self.image_token) for t in texts]
        if flat_input:
            flat = samples[0]
            if sum(counts) != len(flat):
                raise PlaceholderMismatchError(
                    f"The text has {sum(counts)} {self.image_token} placeholder(s) but {len(flat)} image(s) were "
                    f"given: put one {self.image_token} in the text for each image, in order."
                )
            starts = np.cumsum([0, *counts]).tolist()
            samples = [flat[a:b] for a, b in itertools.pairwise(starts)]
        if [len(s) for s in samples] != counts:
            raise PlaceholderMismatchError(
                f"The texts have {counts} {self.image_token} placeholders but the images per sample are "
                f"{[len(s) for s in samples]}: give each text as many images as it has placeholders."
            )
        return samples

    def _media_items(self, input_ids, samples: list[list[np.ndarray]], crops: int) -> list[MediaItem]:
        """One item per crop (5 per image with splitting, else 1): a contiguous run of `image_seq_len` tokens.

        An image's crops are separated by `<fake_token_around_image>` tokens, so a crop, not an image, is
        the unit whose placeholder tokens are contiguous (and whose features the vision tower computes).
        `rows` index the flattened [B * max_images] axis of pixel_values / pixel_attention_mask, and
        `grid_thw` is (crop index within its image, crops per image).
        """
        per_row, seq = max(len(s) for s in samples) * crops, self.image_seq_len
        items = []
        for b, sample in enumerate(samples):
            slots = _token_positions(input_ids, b, self.image_token_id)
            for c in range(len(sample) * crops):
                if len(slots) < (c + 1) * seq:
                    raise PlaceholderMismatchError(
                        f"Row {b} keeps {max(len(slots) - c * seq, 0)} of the {seq} <image> tokens of crop {c}: "
                        "truncation cut them. Raise max_length or drop truncation."
                    )
                row = b * per_row + c
                item = MediaItem("image", len(items), b, self.image_token_id, seq, slots[c * seq], (row, row + 1),
                                 (c % crops, crops), "")  # fmt: skip
                items.append(item)
        return items

    @staticmethod
    def media_inputs(features: BatchFeature, item: MediaItem) -> dict[str, torch.Tensor]:
        """The model inputs of one reported crop: `pixel_values` [1, 1, 3, H, W] (+ its mask), whose
        `get_media_features` are the `image_seq_len` feature rows of that crop's placeholder run."""
        start, end = item.rows
        out = {}
        for key in ("pixel_values", "pixel_attention_mask"):
            if features.get(key) is not None:
                value = torch.as_tensor(features[key])
                out[key] = value.flatten(0, 1)[start:end][None]  # [1, 1, ...]
        return out

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs: Any) -> dict[str, list[int]]:
        """Placeholder tokens per image (height, width), without pixels: the same for every size."""
        if image_sizes is None:
            return {}
        options = self.split_kwargs(kwargs)
        crops = self.image_processor.replace(**options.images).crops
        return {
            "num_image_tokens": [self.image_seq_len * crops] * len(image_sizes),
            "num_image_patches": [crops] * len(image_sizes),
        }


def _check_tokens(tokenizer, tokens: tuple[str, ...]) -> None:
    """transformers adds missing image tokens to the tokenizer; ocula's tokenizer files must carry them."""
    if tokenizer is None:
        return
    vocab = tokenizer.get_vocab()
    missing = [token for token in tokens if token not in vocab]
    if missing:
        raise ConfigError(
            f"The tokenizer has no {missing} token(s), which Idefics2 prompts need: use the tokenizer files of "
            "an Idefics2 checkpoint (tokenizer.json with <fake_token_around_image> and <image>)."
        )


def processor_image(image: Any) -> np.ndarray:
    """An image as transformers' Idefics2 processor sees it: uint8 RGB [H, W, 3].

    The processor passes every PIL image through transformers' `load_image` (EXIF orientation applied,
    `convert("RGB")`: transparency dropped, not composited onto white as the image processor alone does).
    Arrays, which transformers' processor rejects, are read like the other families read them.
    """
    if isinstance(image, PIL.Image.Image):
        return np.asarray(PIL.ImageOps.exif_transpose(image).convert("RGB"))
    return to_rgb_array(image)


def _token_positions(input_ids, row: int, token_id: int | None) -> list[int]:
    if input_ids is None or token_id is None:
        return []
    return np.flatnonzero(np.asarray(input_ids[row]) == token_id).tolist()
