"""The passthrough of ``--upstream``: every route ringcast does not own goes to the upstream
unchanged, so ringcast on llama-server's port is a drop-in for all of it (its WebUI ``/``,
``/props``, ``/slots``, ``/tokenize``, ``/v1/embeddings``, ``/v1/messages``, ...).

Runs in the HTTP process, one upstream connection per request. The method, path, query,
headers and body go up as they are; status, headers and body come back as they are. Both
bodies stream: the request's as the client sends it (:class:`~ringcast.http.protocol.BodyStream`),
the response's as the upstream sends it, each side waiting for the other's buffers to drain,
so a request costs a few buffers of memory whatever its size. Hop-by-hop headers (RFC 9110
7.6.1: ``Connection`` and those it names, ``Keep-Alive``, ``Proxy-*``, ``TE``, ``Trailer``,
``Transfer-Encoding``, ``Upgrade``) are not forwarded, in either direction: each connection
frames its own body. ``Host`` names the upstream. The key headers follow
:func:`~ringcast.server.upstream_link.caller_credentials`, the rule the completion proxy
shares: ringcast's own API key, if it has keys, is checked by the routes before this and not
forwarded; ``--upstream-api-key`` replaces the caller's ``Authorization`` if given; otherwise
the caller's headers, key included, go up unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ringcast.http.client import HTTPError, ResponseParser
from ringcast.http.parse import HttpError, Request
from ringcast.http.protocol import Connection, frame_chunk
from ringcast.server.config import ServeConfig
from ringcast.server.upstream_link import (
    CREDENTIAL_HEADERS,
    UpstreamError,
    UpstreamReader,
    caller_credentials,
    connect_upstream,
    credential_lines,
    upstream_read_timeout,
    upstream_target,
)

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

READ_SIZE = 65536

log = logging.getLogger("ringcast.passthrough")

FRAMING = frozenset({"content-length", "transfer-encoding", "host", "connection"})
"""Headers that frame the request or name its recipient: a client's ``Connection`` that names
one of them is refused, since dropping it as hop-by-hop would let the body it frames reach
the upstream as a second request."""


def _end_to_end(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``headers`` without the hop-by-hop ones (and those their ``Connection`` names)."""
    named = {
        token.strip().lower()
        for k, v in headers
        if k.lower() == "connection"
        for token in v.split(",")
    }
    return [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP and k.lower() not in named]


def refuse_framing_in_connection(req: Request) -> None:
    """400 for a request whose ``Connection`` names a header in :data:`FRAMING`."""
    named = {token.strip().lower() for token in req.headers.get("connection", "").split(",")}
    if named & FRAMING:
        raise HttpError(
            400,
            "Connection may not name " + ", ".join(sorted(named & FRAMING)),
            close=True,
        )


def request_head(
    cfg: ServeConfig, req: Request, root: str, authority: str, strip_auth: bool
) -> bytes:
    """The request head sent upstream: the caller's, end to end, with ``Host`` naming the
    upstream, one connection per request, and the key as the module docstring says. The
    target goes up as the bytes the client sent (after the upstream's path prefix ``root``);
    the framing is ringcast's own: the ``Content-Length`` of the body it forwards, or chunked
    for a chunked body."""
    headers = _end_to_end(list(req.headers.items()))
    # ringcast answered the client's 100-continue itself, and sets the framing itself.
    drop = {"host", "expect", "content-length", *CREDENTIAL_HEADERS}
    lines = [f"Host: {authority}"]
    lines += [f"{k}: {v}" for k, v in headers if k not in drop]
    if req.chunked:  # forwarded as it arrives, so chunked again
        lines.append("Transfer-Encoding: chunked")
    elif "content-length" in req.headers:
        lines.append(f"Content-Length: {req.content_length}")
    lines += credential_lines(cfg, caller_credentials(cfg, dict(headers), strip_auth))
    lines.append("Connection: close")
    start = req.method.encode("ascii") + b" " + root.encode("utf-8") + req.target + b" HTTP/1.1"
    return start + b"\r\n" + ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _send_body(req: Request, writer: asyncio.StreamWriter) -> None:
    """Forward the request body as it arrives, at the pace the upstream takes it."""
    if req.body_stream is None:
        if req.body:
            writer.write(frame_chunk(req.body) if req.chunked else req.body)
    else:
        while data := await req.body_stream.read():
            writer.write(frame_chunk(data) if req.chunked else data)
            await writer.drain()
    if req.chunked:
        writer.write(b"0\r\n\r\n")


async def passthrough(
    cfg: ServeConfig,
    req: Request,
    conn: Connection,
    strip_auth: bool,
) -> None:
    """Answer ``req`` with the upstream's answer to it. Before the response head: an
    :class:`HttpError` (502, 504) if the upstream cannot be reached or answers nothing
    valid. After it: a failure cuts the client's connection, so the body reads as cut short,
    never as whole."""
    refuse_framing_in_connection(req)
    target = upstream_target(cfg.upstream)
    try:
        raw_reader, writer = await connect_upstream(cfg, target)
    except UpstreamError as e:
        raise HttpError(e.code, str(e), "upstream_error") from None
    reader = UpstreamReader(raw_reader, target.name, upstream_read_timeout())
    sender: asyncio.Task[None] | None = None
    started = False
    try:
        writer.write(request_head(cfg, req, target.root, target.authority, strip_auth))
        sender = asyncio.get_running_loop().create_task(_send_body(req, writer))
        parser = ResponseParser()
        while not parser.done:
            data = await reader.read(READ_SIZE)
            if not data:
                parser.eof()
                break
            pieces = parser.feed(data)
            if parser.head_done and not started:
                started = True
                bodyless = req.method == "HEAD" or parser.status in (204, 304)
                length = parser.header("content-length")
                # Headers ringcast sets on every response (its process, its CORS answer) are
                # not sent twice.
                ours = {k.lower() for k, _ in conn.extra_headers} - {"vary"}
                conn.start_response(
                    parser.status,
                    [(k, v) for k, v in _end_to_end(parser.headers) if k.lower() not in ours],
                    req.version,
                    int(length) if length is not None and not bodyless else None,
                    bodyless,
                )
                reader.waiting_for = "more of its response"
                if bodyless:
                    break
            for piece in pieces:
                conn.write_body(piece)
            await conn.drain()
        conn.end_stream()
    except (UpstreamError, HTTPError) as e:
        if not started:
            code = e.code if isinstance(e, UpstreamError) else 502
            if isinstance(e, HTTPError):
                # The path's first segment only: past it may be a conversation id; so may the
                # upstream's header text the error quotes (at DEBUG only).
                first = req.path.split("/")[1]
                log.warning(
                    "upstream %s sent an invalid response to %s /%s, answered 502 "
                    "(details at --log-level DEBUG)",
                    target.name,
                    req.method,
                    first,
                )
                log.debug("upstream %s: invalid response: %s", target.name, e)
            raise HttpError(code, f"upstream {target.name}: {e}", "upstream_error") from None
        # Mid-body: cut the client off; a clean end would pass a cut answer off as whole.
        conn.keep_alive = False
        if conn.transport is not None:
            conn.transport.abort()
    finally:
        if sender is not None:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError, ConnectionError):
                await sender
        writer.transport.abort()
