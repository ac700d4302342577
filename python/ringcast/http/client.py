"""A small HTTP/1.1 client for streamed responses, used by ``ringcast record`` and ``replay``.

Both tools need what general-purpose clients hide: the exact body bytes as they arrive, with
their arrival times, and (for the load generator) a cost per chunk low enough that one process
can drive thousands of readers. So this is an incremental response parser (status line,
headers, then a chunked, sized or read-to-close body) plus a coroutine that opens one
request and yields body pieces. No redirects, no keep-alive reuse, no compression.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

__all__ = ["HTTPError", "ResponseParser", "Target", "build_request", "parse_url", "stream"]

_MAX_HEAD = 64 * 1024
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_DECIMAL = re.compile(r"[0-9]{1,19}")
# Control characters other than HTAB (a bare CR or LF among them) in a header value.
_CTL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class HTTPError(Exception):
    """The peer sent something that is not a valid HTTP/1.1 response, or went away."""


@dataclass(frozen=True)
class Target:
    """Where a URL points: scheme, host, port and the path prefix it carries."""

    scheme: str
    host: str
    port: int
    path: str

    @property
    def origin(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"


def parse_url(url: str) -> Target:
    """Split ``http://host:port/prefix``; raises ``ValueError`` naming the URL if it is bad."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r} (expected e.g. http://127.0.0.1:8080)")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return Target(parts.scheme, parts.hostname, port, parts.path.rstrip("/"))


def build_request(
    method: str, target: Target, path: str, headers: dict[str, str], body: bytes | None = None
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {target.host}:{target.port}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + (body or b"")


@dataclass
class ResponseParser:
    """Feed raw socket bytes; get back body pieces once the head is parsed.

    ``feed`` returns the body bytes that the given data completed (de-chunked). ``done`` is set
    when the body ended by its own framing; a read-to-close body ends at ``eof()``. Bytes fed
    past the end of the response (the next response on a kept-alive connection) are kept in
    :attr:`rest`.
    """

    status: int = 0
    headers: list[tuple[str, str]] = field(default_factory=list)
    head_done: bool = False
    done: bool = False
    _buf: bytearray = field(default_factory=bytearray)
    _chunked: bool = False
    _remaining: int = -1  # bytes left in a sized body or the current chunk; -1 = read to close
    _chunk_state: int = 0  # 0: size line, 1: data, 2: CRLF after data, 3: trailers
    _rest: bytes = b""

    @property
    def rest(self) -> bytes:
        """What was fed after the end of this response (empty until it is done)."""
        if not self.done:
            return b""
        return self._rest + (bytes(self._buf) if self._chunked else b"")

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def feed(self, data: bytes) -> list[bytes]:
        if self.done:
            return []
        if not self.head_done:
            self._buf += data
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > _MAX_HEAD:
                    raise HTTPError("response head larger than 64 KiB")
                return []
            self._parse_head(bytes(self._buf[:end]))
            data = bytes(self._buf[end + 4 :])
            self._buf.clear()
            if self.done:  # a response without a body (1xx, 204, 304, Content-Length: 0)
                self._rest = data
                return []
            if not data:
                return []
        if not self._chunked:
            if self._remaining < 0:
                return [data] if data else []
            piece = data[: self._remaining]
            self._remaining -= len(piece)
            if self._remaining == 0:
                self.done = True
                self._rest = data[len(piece) :]
            return [piece] if piece else []
        return self._feed_chunked(data)

    def eof(self) -> None:
        """The connection closed: fine for a read-to-close body, an error otherwise."""
        if self.done:
            return
        if not self.head_done:
            raise HTTPError("connection closed before a complete response head")
        if self._chunked or self._remaining > 0:
            raise HTTPError("connection closed in the middle of the response body")
        self.done = True

    def _parse_head(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if (
            len(parts) < 2
            or not parts[0].startswith("HTTP/1.")
            or not re.fullmatch("[0-9]{3}", parts[1])
        ):
            raise HTTPError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
        self.status = int(parts[1])
        for line in lines[1:]:
            k, sep, v = line.partition(":")
            if not sep or not _TOKEN.fullmatch(k):
                raise HTTPError(f"malformed header line: {line[:80]!r}")
            v = v.strip(" \t")
            if _CTL.search(v):
                raise HTTPError(f"control character in the value of header {k[:40]!r}")
            self.headers.append((k, v))
        self.head_done = True
        te = (self.header("transfer-encoding") or "").lower()
        if "chunked" in te:
            self._chunked = True
        elif (cl := self.header("content-length")) is not None:
            if not _DECIMAL.fullmatch(cl):
                raise HTTPError(f"bad Content-Length: {cl!r}")
            self._remaining = int(cl)
            if self._remaining == 0:
                self.done = True
        elif self.status in (204, 304) or 100 <= self.status < 200:
            self.done = True

    def _feed_chunked(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        buf = self._buf
        buf += data
        pos = 0
        n = len(buf)
        while pos < n and not self.done:
            if self._chunk_state == 1:
                take = min(self._remaining, n - pos)
                out.append(bytes(buf[pos : pos + take]))
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._chunk_state = 2
                continue
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                if n - pos > 4096:
                    raise HTTPError("chunk size line too long")
                break
            line = bytes(buf[pos:eol])
            pos = eol + 2
            if self._chunk_state == 0:
                size_text = line.split(b";", 1)[0].strip()
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise HTTPError(f"bad chunk size line: {line[:40]!r}") from None
                if size == 0:
                    self._chunk_state = 3
                else:
                    self._remaining = size
                    self._chunk_state = 1
            elif self._chunk_state == 2:
                if line:
                    raise HTTPError("chunk data not followed by CRLF")
                self._chunk_state = 0
            elif not line:  # end of trailers
                self.done = True
        del buf[:pos]
        return out


async def stream(
    url: str,
    path: str,
    *,
    method: str = "POST",
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    connect_timeout: float = 5.0,
) -> AsyncIterator[tuple[float, int, list[tuple[str, str]], bytes]]:
    """Send one request; yield ``(arrival_time, status, headers, body_piece)`` as bytes arrive.

    The first item is yielded as soon as the head is parsed (with an empty piece), so callers
    learn the status and time to first byte even when the body is slow. ``arrival_time`` is
    ``time.perf_counter()``. Connection failures raise ``OSError`` within ``connect_timeout``.
    """
    target = parse_url(url)
    ctx = ssl.create_default_context() if target.scheme == "https" else None
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(target.host, target.port, ssl=ctx), connect_timeout
        )
    except TimeoutError:
        raise OSError(f"connect to {target.origin} timed out after {connect_timeout:g}s") from None
    try:
        writer.write(build_request(method, target, target.path + path, headers or {}, body))
        parser = ResponseParser()
        announced = False
        while not parser.done:
            data = await reader.read(65536)
            now = time.perf_counter()
            if not data:
                parser.eof()
                break
            pieces = parser.feed(data)
            if parser.head_done and not announced:
                announced = True
                yield now, parser.status, parser.headers, b""
            for piece in pieces:
                yield now, parser.status, parser.headers, piece
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (OSError, ConnectionError):
            pass
