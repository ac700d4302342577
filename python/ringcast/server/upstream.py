"""The upstream proxy of the workers (``--upstream URL``, ``http://`` or ``https://``).

It forwards the request (forced to ``stream: true``) to any OpenAI-compatible server and
appends each SSE event as it arrives, unchanged except for ringcast's own ``id:`` line;
cancelling closes the upstream connection, which is how llama-server and vLLM learn to stop.
Certificates are checked against the system's CAs or ``--upstream-ca-file``. An upstream that
sends nothing for ``$RINGCAST_UPSTREAM_READ_TIMEOUT`` seconds (default 600) fails the job with
a 504 error event, and a stream that ends without ``data: [DONE]`` (the upstream died, a proxy
cut it) with a 502 one: a cut answer is never passed off as a whole one.
"""

from __future__ import annotations

import logging
import ssl
from urllib.parse import urlsplit

import msgspec

from ringcast.server.config import ServeConfig
from ringcast.server.emitter import Emitter
from ringcast.server.upstream_link import (
    UPSTREAM_READ_TIMEOUT,
    UpstreamError,
    UpstreamReader,
    connect_upstream,
    credential_lines,
    default_port,
    upstream_target,
    upstream_tls,
)
from ringcast.wire.jobs import Job
from ringcast.wire.sse import iter_sse_data, split_events, strip_id_lines

log = logging.getLogger("ringcast.worker")


def _is_done_event(event: bytes) -> bool:
    return b"[DONE]" in event and iter_sse_data(event) == [b"[DONE]"]


def check_upstream(upstream: str, ca_file: str | None) -> str | None:
    """What is wrong with ``--upstream`` / ``--upstream-ca-file``, or None (checked by
    ``ringcast serve`` before it starts anything)."""
    if not upstream:
        return "--upstream-ca-file only applies with an https --upstream"
    try:
        url = urlsplit(upstream)
        url.port  # noqa: B018 -- raises ValueError for a port that is not a number in range
    except ValueError as e:
        return f"--upstream {upstream!r} is not a valid URL ({e})"
    if url.scheme not in ("http", "https"):
        return f"--upstream {upstream!r}: the URL must start with http:// or https://"
    if not url.hostname:
        return f"--upstream {upstream!r} names no host"
    if url.query or url.fragment or url.username or url.password:
        return (
            f"--upstream {upstream!r}: give scheme, host, port and path only "
            "(the key goes in --upstream-api-key)"
        )
    if ca_file:
        if url.scheme != "https":
            return "--upstream-ca-file only applies with an https --upstream"
        try:
            upstream_tls(ca_file)
        except (OSError, ssl.SSLError) as e:
            return f"--upstream-ca-file {ca_file!r}: cannot load CA certificates ({e})"
    return None


async def proxy_upstream(
    cfg: ServeConfig, job: Job, emitter: Emitter, read_timeout: float = UPSTREAM_READ_TIMEOUT
) -> None:
    """Forward ``job`` to ``cfg.upstream`` and append its SSE events as they arrive.

    Raises ``UpstreamError`` if the upstream cannot be reached, answers anything but 200,
    sends nothing for ``read_timeout`` seconds, or ends its stream without ``data: [DONE]``.
    """
    target = upstream_target(cfg.upstream)
    route = "/chat/completions" if job.route == "chat" else "/completions"
    path = target.root + "/v1" + route
    body = msgspec.json.decode(job.body)
    if isinstance(body, dict):
        body["stream"] = True
    payload = msgspec.json.encode(body)
    host, port, authority = target.host, target.port, target.authority
    raw_reader, writer = await connect_upstream(cfg, target)
    reader = UpstreamReader(raw_reader, f"{host}:{port}", read_timeout)
    try:
        auth = "".join(line + "\r\n" for line in credential_lines(cfg, job.credentials))
        writer.write(
            (
                f"POST {path} HTTP/1.1\r\nHost: {authority}\r\n"
                f"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
                f"Content-Length: {len(payload)}\r\n{auth}Connection: close\r\n\r\n"
            ).encode("latin-1")
            + payload
        )
        status = await reader.status()
        if status != 200:
            raw = bytearray()
            async for data in reader.body():
                raw += data
                if len(raw) > 4096:
                    break
            message = raw.decode("utf-8", "replace")[:1000]
            try:
                err = msgspec.json.decode(bytes(raw))
                message = str(err["error"]["message"])
            except Exception:
                pass
            raise UpstreamError(status, f"upstream answered {status}: {message}")
        reader.waiting_for = "more of its stream"
        buf = bytearray()
        done = False
        async for data in reader.body():
            buf += data
            for piece in split_events(buf):
                event = strip_id_lines(piece.replace(b"\r\n", b"\n"))
                if event.strip():
                    done = done or _is_done_event(event)
                    emitter.raw(event)
                    emitter.count_token()
            if done:
                # The answer is whole: do not wait on an upstream that keeps the connection
                # open after it (the `finally` closes it).
                buf.clear()
                break
        if buf.strip():
            tail = bytes(buf).replace(b"\r\n", b"\n")
            event = strip_id_lines(tail.rstrip(b"\n") + b"\n\n")
            done = done or _is_done_event(event)
            emitter.raw(event)
        if not done:
            # The end of a body is no proof the answer is whole: a close-delimited body ends at
            # any EOF, and a proxy in between may end a chunked one cleanly when its upstream dies.
            raise UpstreamError(
                502,
                f"upstream {host}:{port} closed the stream before `data: [DONE]`: the answer "
                "was cut short (the upstream or a proxy in between failed); see its logs",
            )
    finally:
        # On cancellation this is what tells the upstream to stop generating.
        writer.transport.abort()


# Loopback and wildcard addresses and the IP versions they reach this host by ("::" is
# dual-stack on Linux unless IPV6_V6ONLY is set).
_LOCAL_HOSTS = {
    "localhost": {4, 6},
    "127.0.0.1": {4},
    "0.0.0.0": {4},
    "::1": {6},
    "::": {4, 6},
}


def upstream_is_self(upstream: str, host: str, port: int) -> bool:
    """Whether ``upstream`` (already checked by ``check_upstream``) names the address this
    server listens on: the same port, and the same host or local addresses of one IP version.
    Other names of this host (its LAN address, say) are not recognised."""
    u = urlsplit(upstream)
    up_port = u.port or default_port(u.scheme)
    if port == 0 or up_port != port:
        return False
    up_host, host = (u.hostname or "").lower(), host.lower()
    return up_host == host or bool(_LOCAL_HOSTS.get(up_host, set()) & _LOCAL_HOSTS.get(host, set()))
