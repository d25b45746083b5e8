"""Where the server may read media from, and how much: the media URL policy.

Notable features:
- `data:` URIs are always accepted (their size is already bounded by the request byte cap);
- `http(s)://` fetches are bounded in bytes, seconds and redirects; every hop's host is resolved and the
  connection is made to the checked address itself, so a DNS answer that changes between the check and
  the connect (rebinding) cannot reach a loopback, private, link-local or reserved address unless
  `allow_private_urls` is set;
- `file://` URLs are refused unless `allowed_local_path` names a folder; the path is resolved (symlinks
  and `..` included) and must stay inside it; bare paths and other schemes are always refused;
- every refusal is a `MediaPolicyError` (a `MediaError`, so HTTP 400) that says which option allows it.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urljoin, urlparse

from ocula.errors import MediaError, MediaTooLargeError
from ocula.media.fetch import decode_data_uri, describe

_CHUNK = 1 << 16


class MediaPolicyError(MediaError):
    """A media URL the server's policy refuses (scheme, address or folder)."""


@dataclass
class MediaPolicy:
    allowed_local_path: Path | None = None  # folder file:// URLs may read from (None: file:// refused)
    allow_private_urls: bool = False        # let http(s) fetches reach loopback / private addresses
    max_bytes: int = 20 * 1024 * 1024       # largest media body fetched or decoded from a data: URI
    timeout_s: float = 10.0                 # per connection and per read
    deadline_s: float = 30.0                # whole fetch, redirects included (a slow drip is cut)
    max_redirects: int = 3                  # http(s) redirects followed, each re-checked

    def __post_init__(self) -> None:
        if self.allowed_local_path is not None:
            self.allowed_local_path = Path(self.allowed_local_path).expanduser().resolve()


def read_media(url: str, policy: MediaPolicy) -> bytes | Path:
    """Bytes of a `data:` / `http(s)://` source, or the checked local Path of an allowed `file://` URL."""
    if url.startswith("data:"):
        data = decode_data_uri(url)
        _check_size(len(data), policy, "the data: URI")
        return data
    scheme = urlparse(url).scheme.lower()
    if scheme in ("http", "https"):
        return fetch_url(url, policy)
    if scheme == "file":
        return local_file(url, policy)
    raise MediaPolicyError(
        f"Unsupported media URL {describe(url)!r}: use an http(s):// URL, a data: URI, or a file:// URL "
        "inside the folder given to --allowed-local-media-path."
    )


def local_file(url: str, policy: MediaPolicy) -> Path:
    root = policy.allowed_local_path
    if root is None:
        raise MediaPolicyError(
            f"file:// media ({describe(url)!r}) is refused by default: start the server with "
            "--allowed-local-media-path DIR to serve files from DIR, or send the image as a data: URI."
        )
    path = Path(unquote(urlparse(url).path)).resolve()
    if not path.is_relative_to(root):
        raise MediaPolicyError(f"{describe(url)!r} is outside the allowed media folder {root}.")
    if not path.is_file():
        raise MediaError(f"No such media file: {str(path)!r}.")
    _check_size(path.stat().st_size, policy, describe(url))
    return path


def fetch_url(url: str, policy: MediaPolicy) -> bytes:
    """GET with manual redirects: each hop is resolved, checked and connected to by address."""
    deadline = time.monotonic() + policy.deadline_s
    for _ in range(policy.max_redirects + 1):
        response, connection = _open(url, policy)
        try:
            if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
                url = urljoin(url, response.getheader("Location"))
                continue
            if response.status != 200:
                raise MediaError(f"Fetching {describe(url)!r} returned HTTP {response.status}.")
            return _read_capped(response, url, policy, deadline)
        finally:
            connection.close()
    raise MediaError(f"{describe(url)!r} redirected more than {policy.max_redirects} times.")


def _open(url: str, policy: MediaPolicy) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection]:
    parts = urlparse(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise MediaPolicyError(f"Redirect to an unsupported URL {describe(url)!r}.")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    address = resolve_checked(parts.hostname, port, policy)
    connection = _connection(parts.scheme, parts.hostname, address, port, policy.timeout_s)
    path = parts.path or "/"
    try:
        connection.request("GET", path + (f"?{parts.query}" if parts.query else ""),
                           headers={"User-Agent": "ocula", "Host": parts.netloc})
        return connection.getresponse(), connection
    except (OSError, http.client.HTTPException) as error:
        connection.close()
        raise MediaError(f"Could not fetch {describe(url)!r}: {error}.") from None


def resolve_checked(host: str, port: int, policy: MediaPolicy) -> str:
    """The first address `host` resolves to; refused when any address is not public (unless allowed)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as error:
        raise MediaError(f"Cannot resolve media host {host!r}: {error}.") from None
    addresses = [info[4][0] for info in infos]
    if not policy.allow_private_urls:
        for address in addresses:
            if not is_public(address):
                raise MediaPolicyError(
                    f"Media host {host!r} resolves to the non-public address {address}: refused. Start the "
                    "server with --allow-private-media-urls to fetch from local or private networks."
                )
    return addresses[0]


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def _connection(scheme: str, host: str, address: str, port: int, timeout: float) -> http.client.HTTPConnection:
    if scheme == "https":
        return _PinnedHTTPS(host, address, port, timeout)
    return http.client.HTTPConnection(address, port, timeout=timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to a checked address, with the certificate verified for the URL's host name."""

    def __init__(self, host: str, address: str, port: int, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def _read_capped(response: http.client.HTTPResponse, url: str, policy: MediaPolicy, deadline: float) -> bytes:
    declared = int(response.getheader("Content-Length") or 0)
    _check_size(declared, policy, describe(url))
    chunks, size = [], 0
    while chunk := response.read(_CHUNK):
        size += len(chunk)
        _check_size(size, policy, describe(url))
        if time.monotonic() > deadline:
            raise MediaError(f"Fetching {describe(url)!r} took longer than {policy.deadline_s} s.")
        chunks.append(chunk)
    return b"".join(chunks)


def _check_size(size: int, policy: MediaPolicy, name: str) -> None:
    if size > policy.max_bytes:
        raise MediaTooLargeError(
            f"{name} is larger than the server's media limit of {policy.max_bytes} bytes; send a smaller "
            "file (the limit is set when the server starts)."
        )
