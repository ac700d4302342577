"""The connection to ``--upstream``, shared by the workers' completion proxy
(:mod:`ringcast.server.upstream`) and the HTTP processes' passthrough of the routes ringcast
does not own (:mod:`ringcast.server.passthrough`): where the URL points, opening the
connection (TLS checked against the system's CAs or ``--upstream-ca-file``), and a reader
whose every wait is bounded, since a stalled upstream never says so.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

from ringcast.http.client import HTTPError, ResponseParser
from ringcast.server.config import ServeConfig

log = logging.getLogger("ringcast.worker")

UPSTREAM_CONNECT_TIMEOUT = 10.0
# Seconds an upstream may send nothing (no line of its head, no body bytes) before the job
# fails. Generous, because a long prompt's prefill can be silent: no default here can know the
# model. $RINGCAST_UPSTREAM_READ_TIMEOUT overrides it (upstream_read_timeout).
UPSTREAM_READ_TIMEOUT = 600.0

T = TypeVar("T")


CREDENTIAL_HEADERS = frozenset({"authorization", "x-api-key"})
"""The caller's headers that carry a key (lower case, as :class:`~ringcast.http.parse.Request`
holds them)."""


def caller_credentials(
    cfg: ServeConfig, headers: Mapping[str, str], ringcast_has_keys: bool
) -> tuple[tuple[str, str], ...]:
    """The caller's ``Authorization`` and ``X-Api-Key``, as they came, for the upstream: none
    when they are ringcast's own (it has ``--api-key``) or ``--upstream-api-key`` replaces
    them. One rule for the completion proxy and the passthrough."""
    if ringcast_has_keys or cfg.upstream_api_key:
        return ()
    return tuple((k, v) for k, v in headers.items() if k.lower() in CREDENTIAL_HEADERS)


def credential_lines(cfg: ServeConfig, caller: Iterable[tuple[str, str]]) -> list[str]:
    """The header lines that authenticate to the upstream: ``--upstream-api-key`` if given,
    otherwise the caller's (from :func:`caller_credentials`)."""
    if cfg.upstream_api_key:
        return [f"Authorization: Bearer {cfg.upstream_api_key}"]
    return [f"{k}: {v}" for k, v in caller]


class UpstreamError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def upstream_read_timeout() -> float:
    """``$RINGCAST_UPSTREAM_READ_TIMEOUT`` if it is a positive number of seconds, else
    ``UPSTREAM_READ_TIMEOUT`` (with a warning if the variable is set to anything else)."""
    raw = os.environ.get("RINGCAST_UPSTREAM_READ_TIMEOUT", "").strip()
    if not raw:
        return UPSTREAM_READ_TIMEOUT
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if math.isfinite(seconds) and seconds > 0:
        return seconds
    log.warning(
        "RINGCAST_UPSTREAM_READ_TIMEOUT=%r is not a positive number of seconds; "
        "using the default, %g s",
        raw,
        UPSTREAM_READ_TIMEOUT,
    )
    return UPSTREAM_READ_TIMEOUT


class UpstreamReader:
    """The upstream connection's reader, where a read that waits ``timeout`` seconds for a
    byte fails the job (504) instead of hanging it: a stalled upstream never says so."""

    def __init__(self, reader: asyncio.StreamReader, name: str, timeout: float) -> None:
        self._reader = reader
        self.name = name
        self.timeout = timeout
        self.waiting_for = "its response head"
        self.parser = ResponseParser()
        self._pending: list[bytes] = []

    async def read(self, n: int) -> bytes:
        return await self._within(self._reader.read(n))

    async def status(self) -> int:
        """The status of the response, once its head is in (read through ``parser``)."""
        while not self.parser.head_done:
            await self._fill()
        return self.parser.status

    async def body(self) -> AsyncIterator[bytes]:
        """Its body bytes as they arrive (de-chunked, sized or until close)."""
        while True:
            if self._pending:
                data = b"".join(self._pending)
                self._pending.clear()
                yield data
            if self.parser.done:
                return
            if not await self._fill():
                return

    async def _fill(self) -> bool:
        """Feed the next read to the parser; False at a clean end of the body."""
        data = await self.read(65536)
        if not data:
            try:
                self.parser.eof()
            except HTTPError:
                raise UpstreamError(502, "upstream closed the connection mid-response") from None
            return False
        try:
            self._pending += self.parser.feed(data)
        except HTTPError as e:
            raise UpstreamError(
                502, f"upstream {self.name} sent a malformed response: {e}"
            ) from None
        return True

    async def _within(self, read: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(self.timeout):
                return await read
        except TimeoutError:
            raise UpstreamError(
                504,
                f"upstream {self.name} sent nothing for {self.timeout:g} s while ringcast "
                f"waited for {self.waiting_for}; if its prefills take longer, raise "
                "$RINGCAST_UPSTREAM_READ_TIMEOUT (and --idle-timeout, which also ends a "
                "stream that makes no progress)",
            ) from None
        except OSError as e:  # reset, or a TLS error (ssl.SSLError is an OSError)
            raise UpstreamError(
                502, f"upstream {self.name}: the connection was lost ({e})"
            ) from None


@functools.cache
def upstream_tls(ca_file: str) -> ssl.SSLContext:
    """The client TLS context for an https upstream: certificate and host name checked,
    against ``ca_file`` if given, else the system's CAs (made once per process)."""
    return ssl.create_default_context(cafile=ca_file or None)


def default_port(scheme: str) -> int:
    """The port an upstream URL of this scheme means when it names none."""
    return 443 if scheme == "https" else 80


@dataclass(frozen=True)
class UpstreamTarget:
    """Where ``--upstream`` points (a URL ``ringcast serve`` checked at start-up)."""

    tls: bool
    host: str
    port: int
    root: str
    """The URL's path without a trailing ``/`` or ``/v1``: the upstream's own routes
    (``/props``, ``/v1/embeddings``) are below it."""
    authority: str
    """The ``Host`` header: brackets around an IPv6 literal, no port when it is the
    scheme's default."""

    @property
    def name(self) -> str:
        return f"{self.host}:{self.port}"


def upstream_target(upstream: str) -> UpstreamTarget:
    url = urlsplit(upstream)
    if url.scheme not in ("http", "https") or not url.hostname:
        # `ringcast serve` refuses such a URL at start-up (check_upstream).
        raise UpstreamError(500, f"unsupported upstream URL {upstream!r}")
    host = url.hostname
    port = url.port or default_port(url.scheme)
    authority = f"[{host}]" if ":" in host else host
    if port != default_port(url.scheme):
        authority += f":{port}"
    root = url.path.rstrip("/")
    root = root.removesuffix("/v1")
    return UpstreamTarget(url.scheme == "https", host, port, root, authority)


async def connect_upstream(
    cfg: ServeConfig, target: UpstreamTarget
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a connection to the upstream; ``UpstreamError`` (502, 504) saying why not."""
    host, port = target.host, target.port
    try:
        return await asyncio.wait_for(
            asyncio.open_connection(
                host,
                port,
                ssl=upstream_tls(cfg.upstream_ca_file) if target.tls else None,
                server_hostname=host if target.tls else None,
            ),
            UPSTREAM_CONNECT_TIMEOUT,
        )
    except TimeoutError:
        raise UpstreamError(504, f"upstream {host}:{port} did not accept a connection") from None
    except ssl.SSLCertVerificationError as e:
        raise UpstreamError(
            502,
            f"upstream {host}:{port}: TLS certificate not trusted ({e.verify_message}); "
            "for a private CA or a self-signed server give --upstream-ca-file",
        ) from None
    except ssl.SSLError as e:
        raise UpstreamError(502, f"upstream {host}:{port}: TLS handshake failed ({e})") from None
    except OSError as e:
        raise UpstreamError(502, f"upstream {host}:{port} unreachable: {e.strerror}") from None
