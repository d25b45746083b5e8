"""Bytes of a media source: `http(s)://` URL, `data:` URI, `file://` URL or a local path.

Notable features:
- downloads have a timeout and a size cap (checked against Content-Length and while reading);
- every failure is a `MediaError` naming the source (data URIs abbreviated) and what to do.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlparse

from ..errors import MediaError, MediaTooLargeError

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
_CHUNK = 1 << 16
# transformers also takes a bare base64 payload; long, path-free strings only, so typos stay typos
_BASE64 = re.compile(r"[A-Za-z0-9+/\s]{64,}={0,2}")


def describe(source: str) -> str:
    """A short printable name for a source (data URIs can be megabytes long)."""
    return source if len(source) <= 80 else f"{source[:60]}...({len(source)} chars)"


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def local_path(source: str | os.PathLike) -> Path | None:
    """The local file a `file://` URL or path names; None for URLs and data URIs."""
    text = os.fspath(source)
    if text.startswith("file://"):
        return Path(unquote(urlparse(text).path))
    if is_url(text) or text.startswith("data:"):
        return None
    return Path(text).expanduser()


def decode_data_uri(uri: str) -> bytes:
    """Payload of `data:<mime>[;base64],<data>`."""
    header, sep, payload = uri.partition(",")
    if not sep:
        raise MediaError(f"Malformed data URI {describe(uri)!r}: expected 'data:<mime>;base64,<data>'.")
    if not header.endswith(";base64"):
        return unquote(payload).encode("latin-1")
    try:
        return base64.b64decode(payload, validate=False)
    except (binascii.Error, ValueError) as error:
        raise MediaError(f"Data URI {describe(uri)!r} is not valid base64 ({error}).") from None


def _raw_base64(text: str) -> bytes | None:
    try:
        return base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError):
        return None


def download(url: str, *, timeout: float = DEFAULT_TIMEOUT_S, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """GET `url` (redirects followed), refusing bodies over `max_bytes`."""
    request = urllib.request.Request(url, headers={"User-Agent": "ocula"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            declared = int(response.headers.get("Content-Length") or 0)
            if declared > max_bytes:
                raise _too_big(url, declared, max_bytes)
            return _read_capped(response, url, max_bytes)
    except MediaError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise MediaError(
            f"Could not download {describe(url)!r}: {error}. Check the URL and network."
        ) from None


def _read_capped(response, url: str, max_bytes: int) -> bytes:
    chunks, size = [], 0
    while chunk := response.read(_CHUNK):
        size += len(chunk)
        if size > max_bytes:
            raise _too_big(url, size, max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_big(url: str, size: int, max_bytes: int) -> MediaTooLargeError:
    return MediaTooLargeError(
        f"{describe(url)!r} is larger than the {max_bytes} byte limit (at least {size} bytes); "
        "pass a smaller file or raise max_bytes."
    )


def read_source(
    source: str | os.PathLike, *, timeout: float = DEFAULT_TIMEOUT_S, max_bytes: int = DEFAULT_MAX_BYTES
) -> bytes | Path:
    """Bytes for URLs and data URIs, the checked local Path otherwise (decoders read files themselves)."""
    text = os.fspath(source)
    if is_url(text):
        return download(text, timeout=timeout, max_bytes=max_bytes)
    if text.startswith("data:"):
        return decode_data_uri(text)
    path = local_path(text)
    if not path.is_file() and _BASE64.fullmatch(text) and (raw := _raw_base64(text)):
        return raw
    if not path.is_file():
        raise MediaError(
            f"No such media file: {describe(text)!r}. Pass an existing path, an http(s):// URL, "
            "a data: URI, or an in-memory image / array."
        )
    return path
