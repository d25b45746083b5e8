"""OpenAI chat messages -> the engine's request (prompt token ids + media items), through the model's
own processor: no model-family code here.

Notable features:
- media are read under the server's `MediaPolicy` (security.py) and decoded here, with caps on image
  pixels (checked from the header, before decoding), video frames (sampled uniformly down to the cap)
  and the number of media items, so the processor only ever sees in-memory pixels;
- the conversation is rendered by the checkpoint's chat template with `{"type": "image"}` /
  `{"type": "video"}` markers in order, then one `processor.process` call expands the placeholders,
  preprocesses the pixels and reports each item's placeholder range and content hash;
- everything blocking (fetches, decoding, resizing) runs in a worker thread (`prepare_async`).
"""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ocula.errors import MediaError, MediaTooLargeError, RequestTooLargeError
from ocula.media import load_image, load_video, uniform_indices
from ocula.server.protocol import ChatMessage, ImagePart, TextPart, VideoPart
from ocula.server.security import MediaPolicy, read_media


@dataclass
class MediaLimits:
    max_image_pixels: int = 4096 * 4096  # decoded size cap of one image (checked before decoding)
    max_video_frames: int = 32           # frames kept per video (uniformly sampled down to this)
    max_video_pixels: int = 64 * 1024 * 1024  # decoded pixels of one video, all kept frames together
    max_media_items: int = 16            # images + videos in one request
    max_prompt_tokens: int | None = None  # None: the engine's max_model_len decides


@dataclass
class PreparedPrompt:
    prompt_token_ids: list[int]
    processed: Any                       # ocula.processing_utils.ProcessorOutput (features + media report)


class ChatPreparer:
    """Turns a list of OpenAI `ChatMessage`s into prompt ids and processed media for the engine."""

    def __init__(self, processor: Any, policy: MediaPolicy, limits: MediaLimits | None = None,
                 processor_kwargs: dict[str, Any] | None = None):
        self.processor = processor
        self.policy = policy
        self.limits = limits or MediaLimits()
        self.processor_kwargs = dict(processor_kwargs or {})  # e.g. {"max_pixels": 1003520}

    async def prepare_async(self, messages: list[ChatMessage]) -> PreparedPrompt:
        return await asyncio.to_thread(self.prepare, messages)

    def prepare(self, messages: list[ChatMessage]) -> PreparedPrompt:
        conversation, images, videos = self.conversation(messages)
        text = self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        processed = self._process(text, images, videos)
        prompt = [int(i) for i in processed.features["input_ids"][0]]
        cap = self.limits.max_prompt_tokens
        if cap is not None and len(prompt) > cap:
            raise RequestTooLargeError(
                f"the prompt is {len(prompt)} tokens (media included) but this server takes at most {cap}; "
                "send fewer or smaller images, or a shorter conversation"
            )
        return PreparedPrompt(prompt, processed)

    def conversation(self, messages: list[ChatMessage]) -> tuple[list[dict], list, list]:
        """transformers-style messages with media markers, and the decoded images / videos in order."""
        media_parts = [p for m in messages if isinstance(m.content, list) for p in m.content
                       if not isinstance(p, TextPart)]
        if len(media_parts) > self.limits.max_media_items:
            raise RequestTooLargeError(
                f"the request has {len(media_parts)} images / videos but this server takes at most "
                f"{self.limits.max_media_items} per request"
            )
        images, videos, out = [], [], []
        for message in messages:
            role = "system" if message.role == "developer" else message.role
            content = message.content if message.content is not None else ""
            if isinstance(content, list):
                content = [self._part(part, images, videos) for part in content]
            out.append({"role": role, "content": content})
        return out, images, videos

    def _part(self, part: Any, images: list, videos: list) -> dict:
        if isinstance(part, ImagePart):
            images.append(self.load_image(part.image_url.url))
            return {"type": "image"}
        if isinstance(part, VideoPart):
            videos.append(self.load_video(part.video_url.url))
            return {"type": "video"}
        return {"type": "text", "text": part.text}

    def load_image(self, url: str):
        data = read_media(url, self.policy)
        try:
            return load_image(data, max_pixels=self.limits.max_image_pixels)
        except MediaTooLargeError as error:  # name the server's own setting, not the library argument
            message = str(error).replace("raise max_pixels", "start the server with a larger --max-image-pixels")
            raise MediaTooLargeError(message) from None

    def load_video(self, url: str) -> np.ndarray:
        """Frames uint8 [T, H, W, 3], at most `max_video_frames` of them, evenly spaced."""
        data = read_media(url, self.policy)
        if isinstance(data, Path):
            return self._decode_video(str(data))
        with tempfile.NamedTemporaryFile(suffix=".video") as tmp:  # PyAV probes containers from files
            tmp.write(data)
            tmp.flush()
            return self._decode_video(tmp.name)

    def _decode_video(self, path: str) -> np.ndarray:
        def pick(meta) -> np.ndarray:
            return uniform_indices(meta.total_num_frames, num_frames=self.frames_to_keep(meta))

        try:
            frames, _ = load_video(path, sample_indices_fn=pick)
        except (MediaError, MemoryError):
            raise
        except Exception as error:  # noqa: BLE001 - container parsers raise many types on bad bytes
            raise MediaError(f"Cannot decode the video: {error}. Send an mp4 / webm / mkv file.") from None
        if len(frames) == 0:
            raise MediaError("The video has no frames.")
        return frames

    def frames_to_keep(self, meta: Any) -> int:
        """Frames sampled from a video: the frame cap, lowered so the decoded pixels fit their budget."""
        limits, area = self.limits, (meta.width or 1) * (meta.height or 1)
        if area > limits.max_image_pixels:
            raise MediaTooLargeError(
                f"video frames of {meta.width}x{meta.height} exceed the server's limit of "
                f"{limits.max_image_pixels} pixels per frame; downscale the video"
            )
        return max(1, min(meta.total_num_frames, limits.max_video_frames, limits.max_video_pixels // area))

    def _process(self, text: str, images: list, videos: list):
        tokenizer = self.processor.tokenizer
        bos = getattr(tokenizer, "bos_token", None)
        kwargs = {"add_special_tokens": False} if bos and text.startswith(bos) else {}
        kwargs.update(self.processor_kwargs)
        return self.processor.process(
            text=text, images=images or None, videos=videos or None, return_tensors="pt", **kwargs
        )


def to_engine_media(processed: Any) -> list:
    """The engine's media items of one processed prompt (placeholder range, engine hash, pixel payload)."""
    from ocula.engine.llm import engine_media_items

    return engine_media_items(processed)
