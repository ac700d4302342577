"""The HTTP processes of ``ringcast serve``: one shared port, readers of the segment.

Each process (``python -m ringcast.server CONFIG INDEX``, spawned by the manager) listens on
the same port with ``SO_REUSEPORT`` and speaks HTTP/1.1 through a small hand-written
``asyncio.Protocol``:

- keep-alive and pipelining (one request at a time per connection; later requests wait in
  the buffer, and reading pauses when that buffer grows);
- ``Content-Length`` bodies up to ``--max-body`` (413 beyond, 100-continue honoured);
  chunked request bodies are refused with 411, since no OpenAI client sends them;
- responses that stream the ring's bytes unchanged in chunked encoding, so a client that
  counts body bytes resumes with ``from=<count>``.

Flow control: the transport's write buffer has a high-water mark; a relay that reaches it
waits for ``resume_writing`` before reading more from the ring. The producer never waits for
a reader: a client that stops reading only falls behind in the ring, and if it falls past the
dropped prefix it gets an in-band ``offset_lost`` event (the bytes it missed are gone). A
client whose full buffer drains by not one byte for ``--write-timeout`` is reset, which ends
its relay and releases its reader.

A streaming POST creates the session here (so DELETE works before the first token), attaches
this process's reader at offset 0, and hands the job to a worker over a Unix socket; the
worker adopts the session and becomes its producer. If the worker connection breaks before
adoption, this process still holds the producer role and finalizes the session ``failed``
with an error event.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import re
import secrets
import signal
import socket
import struct
import time
from pathlib import Path
from typing import cast
from urllib.parse import unquote, unquote_plus

import msgspec

from ringcast._core import (
    InvalidArgument,
    OffsetLost,
    Reader,
    RegistryFull,
    Segment,
    SessionEnded,
    SessionInfo,
    SessionNotFound,
    Writer,
)
from ringcast.manager import (
    ANON_OWNER,
    HttpCounter,
    ManagerCounter,
    ServeConfig,
    SharedCounters,
    WorkerCounter,
    child_main,
    evict_lru,
    http_row,
    loop_of,
    open_child_counters,
    worker_row,
)
from ringcast.protocol import (
    JOB_ACK_ADOPTED,
    JOB_ACK_GONE,
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    Completion,
    CompletionChoice,
    Health,
    Job,
    ModelCard,
    ModelList,
    StreamInfo,
    Usage,
    chat_request_decoder,
    chunk_decoder,
    completion_request_decoder,
    error_event,
    error_json,
    frame_event,
    iter_sse_data,
    job_encoder,
    json_encoder,
    lookup_request_decoder,
)

log = logging.getLogger("ringcast.server")

MAX_HEAD = 16 * 1024
PIPELINE_BUFFER = 64 * 1024
WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024
RELAY_READ = 256 * 1024
# Adaptive coalescing (App.adapt_coalescing): sample period and moving-average weight of the
# event-loop lag; the lag above which a process is behind (the linger may climb to half the
# cap), far behind (to the whole cap), and below which it keeps up (an idle uvloop shows
# ~0.2 ms); the first linger when it falls behind and the decay per sample after.
LAG_PERIOD = 0.010
LAG_SMOOTHING = 0.25
LAG_SLOW_SMOOTHING = 0.05
LAG_HIGH = 0.001
LAG_SEVERE = 0.004
LAG_LOW = 0.0005
LINGER_START = 0.002
LINGER_DECAY = 0.85
HANDOFF_TIMEOUT = 30.0
# Connections the kernel may hold for an HTTP process before it accepts them (it caps this at
# net.core.somaxconn). A network blip reconnects every client of a stream at once; with a
# queue of 100 (asyncio's default) the SYNs past the hundredth were dropped and each of those
# clients waited for its retransmission, 1 s and then 3 s.
LISTEN_BACKLOG = 4096

REASONS = {
    100: "Continue",
    200: "OK",
    204: "No Content",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    410: "Gone",
    411: "Length Required",
    413: "Payload Too Large",
    416: "Range Not Satisfiable",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    410: "offset_lost",
    411: "invalid_request_error",
    413: "invalid_request_error",
    416: "invalid_request_error",
    431: "invalid_request_error",
    500: "server_error",
    503: "unavailable_error",
    505: "invalid_request_error",
}

# Terminal events for readers whose session ended without finishing: (code, message).
END_EVENTS = {
    "cancelled": (410, "the stream was cancelled"),
    "replaced": (409, "the stream was replaced by a newer request with the same conversation id"),
    "evicted": (410, "the stream was evicted (expired, idle or memory full)"),
    "failed": (500, "the stream failed"),
}

EXPOSED_HEADERS = (
    "X-Ringcast-Epoch, X-Ringcast-Offset, X-Ringcast-First-Available, X-Ringcast-Process"
)

_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_DECIMAL = re.compile(r"^[0-9]{1,19}$")


class HttpError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str | None = None,
        close: bool = False,
        first_available: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_ or ERROR_TYPES.get(status, "invalid_request_error")
        self.close = close
        self.first_available = first_available


class Request:
    __slots__ = ("body", "headers", "keep_alive", "method", "path", "query", "version")

    def __init__(
        self, method: str, path: str, query: str, version: bytes, headers: dict[str, str]
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.version = version
        self.headers = headers
        self.body = b""
        conn = headers.get("connection", "").lower()
        if version == b"HTTP/1.1":
            self.keep_alive = "close" not in conn
        else:
            self.keep_alive = "keep-alive" in conn

    def query_params(self) -> dict[str, str]:
        """First value of each parameter, percent- and plus-decoded; 400 on bad UTF-8."""
        out: dict[str, str] = {}
        if not self.query:
            return out
        for part in self.query.split("&"):
            if not part:
                continue
            name, _, value = part.partition("=")
            try:
                name = unquote_plus(name, errors="strict")
                value = unquote_plus(value, errors="strict")
            except UnicodeDecodeError:
                raise HttpError(400, "query string is not valid UTF-8") from None
            out.setdefault(name, value)
        return out


def parse_head(head: bytes) -> Request:
    """Parse a request line and headers (without the final blank line)."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise HttpError(400, "malformed request line", close=True)
    method_b, target_b, version = parts
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise HttpError(505, "only HTTP/1.0 and HTTP/1.1 are supported", close=True)
    if not _TOKEN.match(method_b) or not target_b.startswith(b"/"):
        raise HttpError(400, "malformed request line", close=True)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name_b, sep, value_b = line.partition(b":")
        if not sep or not _TOKEN.match(name_b):
            raise HttpError(400, "malformed header line", close=True)
        name = name_b.decode("ascii").lower()
        value = value_b.strip(b" \t").decode("latin-1")
        if any(c in value for c in "\r\n\x00"):
            raise HttpError(400, "malformed header value", close=True)
        if name in headers:
            if name == "content-length" and headers[name] != value:
                raise HttpError(400, "conflicting Content-Length headers", close=True)
            if name != "content-length":
                headers[name] = headers[name] + ", " + value
        else:
            headers[name] = value
    target = target_b.decode("latin-1")
    path, _, query = target.partition("?")
    return Request(method_b.decode("ascii"), path, query, version, headers)


class Connection(asyncio.Protocol):
    """One client connection: parser state, response writing and flow control."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.pending: Request | None = None
        self.need = 0
        self.busy = False
        self.closed = False
        self.task: asyncio.Task[None] | None = None
        self.write_paused = False
        self.drain_waiter: asyncio.Future[None] | None = None
        self.reading_paused = False
        self.idle_timer: asyncio.TimerHandle | None = None
        self.stall_timer: asyncio.TimerHandle | None = None
        self.stall_size = 0  # write buffer size when its last progress was seen
        self.stall_since = 0.0  # loop time of that progress
        self.keep_alive = True
        self.chunked = False
        self.cors_origin = ""

    # -- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.app.connections.add(self)
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.busy:
            if len(self.buf) > PIPELINE_BUFFER and not self.reading_paused:
                assert self.transport is not None
                self.transport.pause_reading()
                self.reading_paused = True
            return
        self._parse()

    def eof_received(self) -> bool:
        # A client that half-closes is treated as gone: that is how disconnects show up.
        self._lost()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost()

    def pause_writing(self) -> None:
        self.write_paused = True
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self.stall_size = self.transport.get_write_buffer_size()
        self.stall_since = loop.time()
        if self.stall_timer is None:
            self.stall_timer = loop.call_later(self._stall_period(), self._check_stall)

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.stall_timer is not None:
            self.stall_timer.cancel()
            self.stall_timer = None
        waiter, self.drain_waiter = self.drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- internals

    def _lost(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.app.connections.discard(self)
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        if self.stall_timer is not None:
            self.stall_timer.cancel()
            self.stall_timer = None
        if self.task is not None and not self.task.done():
            self.task.cancel()
        waiter, self.drain_waiter = self.drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("client went away"))

    def _arm_idle(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        self.idle_timer = asyncio.get_running_loop().call_later(
            self.app.cfg.keepalive_timeout, self._idle_close
        )

    def _idle_close(self) -> None:
        if not self.busy and self.transport is not None:
            self.transport.close()

    def _stall_period(self) -> float:
        # Checked four times per --write-timeout, so a stall is cut within 1.25 timeouts.
        return self.app.cfg.write_timeout / 4

    def _check_stall(self) -> None:
        """While writing is paused: reset the connection if its client has taken nothing
        from the write buffer for ``--write-timeout``. Without this a client that never reads
        would hold its connection, relay task and ring reader for ever: the idle timer is off
        while a response streams. Progress is a smaller buffer: little is added to a paused
        one (relays wait in :meth:`drain`, pumps detach the connection; at most an
        end-of-stream marker or a pipelined response)."""
        self.stall_timer = None
        if self.closed or not self.write_paused or self.transport is None:
            return
        loop = asyncio.get_running_loop()
        size = self.transport.get_write_buffer_size()
        if size < self.stall_size:
            self.stall_size, self.stall_since = size, loop.time()
        elif loop.time() - self.stall_since >= self.app.cfg.write_timeout:
            log.info(
                "reset a connection whose client read nothing for %.0f s (%d bytes unsent)",
                self.app.cfg.write_timeout,
                size,
            )
            self.app.counters.inc(HttpCounter.WRITE_TIMEOUTS)
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                # An RST, so the kernel drops the unsent bytes too instead of retrying them.
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()
            return
        self.stall_timer = loop.call_later(self._stall_period(), self._check_stall)

    def _parse(self) -> None:
        while not self.busy and not self.closed:
            if self.pending is None:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.buf) > MAX_HEAD:
                        self._reject(HttpError(431, "request head too large", close=True))
                    return
                if end > MAX_HEAD:
                    self._reject(HttpError(431, "request head too large", close=True))
                    return
                head = bytes(self.buf[:end])
                del self.buf[: end + 4]
                try:
                    req = parse_head(head)
                    self.need = self._body_length(req)
                except HttpError as e:
                    self._reject(e)
                    return
                self.pending = req
                if self.need and req.headers.get("expect", "").lower() == "100-continue":
                    self._write(b"HTTP/1.1 100 Continue\r\n\r\n")
            if len(self.buf) < self.need:
                return
            req = self.pending
            req.body = bytes(self.buf[: self.need])
            del self.buf[: self.need]
            self.pending = None
            self.need = 0
            self.busy = True
            if self.idle_timer is not None:
                self.idle_timer.cancel()
            self.task = asyncio.get_running_loop().create_task(self._run(req))

    def _body_length(self, req: Request) -> int:
        if "transfer-encoding" in req.headers:
            raise HttpError(
                411, "chunked request bodies are not supported; send Content-Length", close=True
            )
        cl = req.headers.get("content-length")
        if cl is None:
            return 0
        if not _DECIMAL.match(cl):
            raise HttpError(400, f"invalid Content-Length {cl[:32]!r}", close=True)
        n = int(cl)
        if n > self.app.cfg.max_body:
            raise HttpError(
                413,
                f"request body of {n} bytes exceeds the limit of {self.app.cfg.max_body} bytes",
                close=True,
            )
        return n

    def _reject(self, e: HttpError) -> None:
        self.keep_alive = False
        self.app.count_status(e.status)
        self.send(e.status, error_json(e.status, e.message, e.type), close=True)
        self.busy = True  # nothing more is parsed on this connection

    async def _run(self, req: Request) -> None:
        self.keep_alive = req.keep_alive
        self.chunked = False
        self.cors_origin = self.app.cors_origin(req)
        try:
            await self.app.dispatch(req, self)
        except HttpError as e:
            self.app.count_status(e.status)
            if e.close:
                self.keep_alive = False
            self.send(e.status, error_json(e.status, e.message, e.type, e.first_available))
        except asyncio.CancelledError:
            return
        except ConnectionError:
            return
        except Exception:
            log.exception("unhandled error in %s %s", req.method, req.path.split("/")[1:3])
            self.app.count_status(500)
            if not self.closed:
                self.keep_alive = False
                self.send(500, error_json(500, "internal server error", "server_error"))
        self._finish()

    def _finish(self) -> None:
        if self.closed or self.transport is None:
            return
        if not self.keep_alive:
            self.transport.close()
            return
        self.busy = False
        self.task = None
        if self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()
        self._arm_idle()
        if self.buf:
            self._parse()

    # -- writing

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def _head(self, status: int, headers: list[tuple[str, str]]) -> bytes:
        lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}"]
        lines += [f"{k}: {v}" for k, v in headers]
        lines.append("Connection: keep-alive" if self.keep_alive else "Connection: close")
        lines.append(f"X-Ringcast-Process: {self.app.index}")
        if self.cors_origin:
            lines.append(f"Access-Control-Allow-Origin: {self.cors_origin}")
            lines.append("Access-Control-Expose-Headers: " + EXPOSED_HEADERS)
            lines.append("Vary: Origin")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def send(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json",
        headers: list[tuple[str, str]] | None = None,
        close: bool = False,
    ) -> None:
        if close:
            self.keep_alive = False
        hs = list(headers or [])
        if status != 204:
            hs.append(("Content-Type", content_type))
            hs.append(("Content-Length", str(len(body))))
        self._write(self._head(status, hs) + body)
        if close and self.transport is not None:
            self.transport.close()

    def start_stream(self, headers: list[tuple[str, str]], version: bytes) -> None:
        """Send a 200 ``text/event-stream`` head; the body is chunked on HTTP/1.1 and
        delimited by closing the connection on HTTP/1.0."""
        hs = [
            ("Content-Type", "text/event-stream"),
            ("Cache-Control", "no-cache"),
            ("X-Accel-Buffering", "no"),
            *headers,
        ]
        if version == b"HTTP/1.1":
            self.chunked = True
            hs.append(("Transfer-Encoding", "chunked"))
        else:
            self.keep_alive = False
        self._write(self._head(200, hs))

    def write_body(self, data: bytes) -> None:
        if not data or self.transport is None or self.closed:
            return
        if self.chunked:
            self.transport.writelines((b"%x\r\n" % len(data), data, b"\r\n"))
        else:
            self.transport.write(data)
        self.app.counters.inc(HttpCounter.BYTES_SENT, len(data))

    def write_framed(self, framed: bytes, data: bytes) -> int:
        """Like :meth:`write_body` for a pump's pass: ``framed`` is ``data`` already in its
        chunk framing, shared by every connection. Returns the body bytes sent (0 if closed);
        the caller counts them once for the pass."""
        if self.transport is None or self.closed:
            return 0
        self.transport.write(framed if self.chunked else data)
        return len(data)

    def end_stream(self) -> None:
        if self.chunked:
            self._write(b"0\r\n\r\n")
            self.chunked = False

    async def drain(self) -> None:
        if not self.write_paused or self.closed:
            return
        if self.drain_waiter is None:
            self.drain_waiter = asyncio.get_running_loop().create_future()
        await self.drain_waiter


Outcome = tuple[str, int | str | None]
"""How a pump lets a connection go: ("done", None), ("ended", reason) or ("solo", offset)."""


class Pump:
    """Live-edge fan-out of one session inside one HTTP process.

    Waking a reader task per client costs a notifier round and a task switch per event; with a
    thousand clients on a stream that dominates. A pump holds one ``Reader`` at the live edge,
    and on each wake-up writes the new bytes straight into every joined connection's
    transport (a synchronous call). A joined connection's relay task sleeps on one future
    until the stream ends or the pump detaches it (its write buffer reached the high-water
    mark, or the pump itself fell behind); it then continues on its own reader.
    """

    def __init__(self, app: App, key: tuple[int, int], reader: Reader) -> None:
        self.app = app
        self.key = key
        self.reader = reader
        self.offset = reader.offset
        self.subs: dict[Connection, asyncio.Future[Outcome]] = {}
        self.task = asyncio.get_running_loop().create_task(self.run())

    def join(self, conn: Connection) -> asyncio.Future[Outcome]:
        fut: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self.subs[conn] = fut
        fut.add_done_callback(functools.partial(self._left, conn))
        return fut

    def _left(self, conn: Connection, fut: asyncio.Future[Outcome]) -> None:
        if self.subs.get(conn) is fut:
            del self.subs[conn]
        if not self.subs and not self.task.done():
            self.task.cancel()

    async def run(self) -> None:
        outcome: Outcome = ("solo", 0)
        loop = asyncio.get_running_loop()
        app = self.app
        last_write = 0.0
        # Moving average of the time between this stream's events; it starts at the cap, as
        # if the stream were slow, so one early burst (the role chunk and the first token come
        # together) does not make a model-paced stream wait.
        spacing = app.cfg.coalesce_ms / 1000.0
        try:
            while True:
                # Coalescing: no fan-out pass within `app.linger` of the previous one, so a
                # fast stream reaches each client in fewer, larger writes (one send per client
                # per pass is the cost that dominates fan-out). `app.linger` is 0 while the
                # process keeps up (see `App.adapt_coalescing`), and a stream whose events come
                # further apart than half of it (a model's pace) never waits: it would gain no
                # batching, only delay.
                linger = app.linger
                if linger and spacing < linger / 2:
                    wait = last_write + linger - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                try:
                    data = await self.reader.aread(RELAY_READ)
                except OffsetLost:
                    break  # each connection goes on alone and finds out for itself
                except SessionEnded as e:
                    outcome = ("ended", e.reason)
                    break
                if not data:
                    outcome = ("done", None)
                    break
                self.offset += len(data)
                # Framed once for every chunked connection of this pass.
                framed = b"%x\r\n%s\r\n" % (len(data), data)
                sent = 0
                for conn, fut in list(self.subs.items()):
                    if fut.done():
                        continue
                    sent += conn.write_framed(framed, data)
                    if conn.write_paused or conn.closed:
                        fut.set_result(("solo", self.offset))
                        self.app.counters.inc(HttpCounter.DETACHED)
                if sent:
                    self.app.counters.inc(HttpCounter.BYTES_SENT, sent)
                now = loop.time()
                if last_write:
                    gap = (now - last_write) / max(1, data.count(b"\n\n"))
                    spacing += (gap - spacing) / 4
                last_write = now
        finally:
            if self.app.pumps.get(self.key) is self:
                del self.app.pumps[self.key]
            self.reader.close()
            for fut in list(self.subs.values()):
                if not fut.done():
                    fut.set_result(outcome if outcome[0] != "solo" else ("solo", self.offset))


class App:
    """Routes and the state of one HTTP process."""

    def __init__(
        self, cfg: ServeConfig, index: int, seg: Segment, counters: SharedCounters
    ) -> None:
        self.cfg = cfg
        self.index = index
        self.seg = seg
        self.counters = counters
        self.connections: set[Connection] = set()
        self.background: set[asyncio.Task[None]] = set()
        self.pumps: dict[tuple[int, int], Pump] = {}
        self.next_worker = index
        # Jobs this process has sent to each worker and not yet seen acknowledged: the
        # worker's own gauge counts a job only once it has adopted it.
        self.handing_off = [0] * cfg.workers
        self.key_owners = {d: d[:16] for d in cfg.key_digests}
        self.created = int(time.time())
        # Seconds a pump waits after a pass before the next one (see adapt_coalescing).
        self.linger = cfg.coalesce_ms / 1000.0 if cfg.coalesce == "always" else 0.0
        self.counters.set(HttpCounter.COALESCE_US, int(self.linger * 1e6))

    async def adapt_coalescing(self) -> None:
        """Adaptive coalescing, like a NIC's adaptive interrupt moderation: pumps write on
        every wake-up while this process keeps up, and batch more while it falls behind.

        Every 10 ms, how late the loop woke this task (its lag: time spent running other
        callbacks, or waiting for a CPU) feeds a moving average. Above LAG_HIGH the linger
        doubles (from LINGER_START) up to half the ``--coalesce-ms`` cap (coming down to it
        by LINGER_DECAY per sample from above), and while a slower average (over ~0.2 s,
        where a process far behind shows its long stalls) is above LAG_SEVERE, up to the
        whole cap; below LAG_LOW it decays by LINGER_DECAY per sample (from the cap to
        nothing in ~0.4 s), and in between it holds. It climbs fast and comes down slowly, so
        a loaded process keeps the batching that gives it headroom instead of oscillating at
        the edge of saturation; an idle one goes back to writing every event at once. The two
        ceilings: a process that is merely busy (a loop ~1 ms late) needs a little batching
        and keeps its latency; one that is far behind (at 2.5 M events/s on 2 cores its loop
        was 2-6 ms late at the median, 10-130 ms at p90) needs all the batching it can get,
        or its backlog, not the linger, sets the latency."""
        cap = self.cfg.coalesce_ms / 1000.0
        avg = slow = 0.0
        while True:
            t0 = time.monotonic()
            await asyncio.sleep(LAG_PERIOD)
            lag = max(0.0, time.monotonic() - t0 - LAG_PERIOD)
            avg += (lag - avg) * LAG_SMOOTHING
            slow += (lag - slow) * LAG_SLOW_SMOOTHING
            linger = self.linger
            if avg > LAG_HIGH:
                ceiling = cap if slow > LAG_SEVERE else cap / 2
                if linger > ceiling:  # no longer far behind: back down to the lower ceiling
                    linger = max(ceiling, linger * LINGER_DECAY)
                else:
                    linger = min(ceiling, max(linger * 2.0, LINGER_START))
            elif avg < LAG_LOW:
                linger = linger * LINGER_DECAY if linger > LINGER_START / 4 else 0.0
            if linger != self.linger:
                self.linger = linger
                self.counters.set(HttpCounter.COALESCE_US, int(linger * 1e6))

    # -- helpers

    def track(self, task: asyncio.Task[None]) -> asyncio.Task[None]:
        """Keeps a background task alive until it ends, and logs it if it ends by an
        exception: an error in the coalescing controller would otherwise leave the process
        writing every event at once, and only a garbage collection would ever say why."""
        self.background.add(task)
        task.add_done_callback(self._background_done)
        return task

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self.background.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error(
                "HTTP process %d: background task %s failed",
                self.index,
                task.get_coro().__qualname__,  # type: ignore[union-attr]
                exc_info=exc,
            )

    def count_status(self, status: int) -> None:
        if 400 <= status < 500:
            self.counters.inc(HttpCounter.ERRORS_4XX)
        elif status >= 500:
            self.counters.inc(HttpCounter.ERRORS_5XX)

    def owner(self, req: Request) -> str:
        """The caller's owner namespace; 401 if keys are configured and none matches."""
        if not self.key_owners:
            return ""
        key = req.headers.get("x-api-key", "")
        auth = req.headers.get("authorization", "")
        if not key and auth[:7].lower() == "bearer ":
            key = auth[7:].strip()
        if key:
            owner = self.key_owners.get(hashlib.sha256(key.encode("latin-1")).hexdigest())
            if owner is not None:
                return owner
        raise HttpError(
            401,
            "missing or invalid API key: send 'Authorization: Bearer <key>' or 'X-Api-Key: <key>'",
        )

    def check_conv_id(self, raw: str) -> str:
        """Validate a conversation id: bounded, no control characters; anything else
        printable (``/``, ``:``, spaces, non-ASCII) is accepted."""
        if len(raw.encode("utf-8", "surrogatepass")) > self.cfg.max_id_len:
            raise HttpError(400, f"conversation id is longer than {self.cfg.max_id_len} bytes")
        for c in raw:
            o = ord(c)
            if o < 0x20 or 0x7F <= o < 0xA0 or 0xD800 <= o < 0xE000:
                raise HttpError(400, f"conversation id contains a control character (U+{o:04X})")
        return raw

    def header_conv_id(self, req: Request) -> str | None:
        raw = req.headers.get("x-conversation-id", "")
        if not raw:
            return None
        try:
            value = raw.encode("latin-1").decode("utf-8")
        except UnicodeDecodeError:
            raise HttpError(400, "X-Conversation-Id is not valid UTF-8") from None
        return self.check_conv_id(value)

    def stream_id(self, req: Request, prefix: str) -> str:
        """The id from ``/v1/stream/{id}`` (may contain ``/``) or ``?conv_id=``."""
        if req.path.startswith(prefix + "/") and len(req.path) > len(prefix) + 1:
            try:
                raw = unquote(req.path[len(prefix) + 1 :], errors="strict")
            except UnicodeDecodeError:
                raise HttpError(400, "conversation id is not valid UTF-8") from None
        else:
            raw = req.query_params().get("conv_id", "")
        if not raw:
            raise HttpError(400, "missing conversation id: use ?conv_id=ID or /v1/stream/ID")
        return self.check_conv_id(raw)

    @staticmethod
    def parse_offset(value: str, what: str) -> int:
        if value == "":
            return 0
        if not _DECIMAL.match(value):
            raise HttpError(
                400, f"invalid {what} {value[:32]!r}: expected a non-negative decimal byte offset"
            )
        return int(value)

    def stream_info(self, i: SessionInfo) -> StreamInfo:
        return StreamInfo(
            conversation_id=i.conversation_id,
            is_done=i.is_done,
            total_bytes=i.total_bytes,
            started_at=int(i.started_at),
            completed_at=int(i.completed_at),
            state=i.state,
            first_available=i.first_available,
            epoch=self.seg.epoch,
            readers=i.readers,
        )

    def send_json(self, conn: Connection, obj: object, status: int = 200) -> None:
        conn.send(status, json_encoder.encode(obj))

    # -- dispatch

    def cors_origin(self, req: Request) -> str:
        """The ``Access-Control-Allow-Origin`` value for this request, or ``""``."""
        allowed = self.cfg.cors_origins
        if not allowed:
            return ""
        if "*" in allowed:
            return "*"
        origin = req.headers.get("origin", "")
        return origin if origin in allowed else ""

    async def dispatch(self, req: Request, conn: Connection) -> None:
        self.counters.inc(HttpCounter.REQUESTS)
        path, method = req.path, req.method
        if method == "OPTIONS" and self.cfg.cors_origins:
            # CORS preflight (a browser page on another origin sending keys or a conv id).
            return conn.send(
                204,
                b"",
                headers=[
                    ("Access-Control-Allow-Methods", "GET, POST, DELETE, OPTIONS"),
                    (
                        "Access-Control-Allow-Headers",
                        "Authorization, Content-Type, X-Api-Key, X-Conversation-Id, Last-Event-ID",
                    ),
                    ("Access-Control-Max-Age", "600"),
                ],
            )
        if path == "/v1/chat/completions":
            self.allow(method, "POST")
            return await self.post_completion(req, conn, "chat")
        if path == "/v1/completions":
            self.allow(method, "POST")
            return await self.post_completion(req, conn, "completions")
        if path == "/v1/stream" or path.startswith("/v1/stream/"):
            if method == "DELETE":
                return self.delete_stream(req, conn)
            self.allow(method, "GET")
            return await self.get_stream(req, conn)
        if path == "/v1/streams/lookup":
            self.allow(method, "POST")
            return self.lookup(req, conn)
        if path == "/v1/streams":
            self.allow(method, "GET")
            return self.list_streams(req, conn)
        if path == "/health":
            self.allow(method, "GET")
            return self.send_json(conn, Health("ok", self.index, os.getpid(), self.seg.epoch))
        if path == "/v1/models":
            self.allow(method, "GET")
            self.owner(req)
            return self.send_json(conn, ModelList([ModelCard(self.cfg.model_name, self.created)]))
        if path == "/metrics":
            self.allow(method, "GET")
            return conn.send(200, self.metrics(), "text/plain; version=0.0.4")
        raise HttpError(404, "File Not Found")

    @staticmethod
    def allow(method: str, expected: str) -> None:
        if method != expected:
            raise HttpError(405, f"method {method} not allowed here; use {expected}")

    # -- completions

    def create_session(self, conv: str, owner: str) -> Writer:
        try:
            try:
                return self.seg.create_or_replace(conv, owner)
            except RegistryFull:
                n = evict_lru(self.seg, 1, self.cfg.evict_running)
                self.counters.inc(HttpCounter.EVICTIONS_LRU, n)
                return self.seg.create_or_replace(conv, owner)
        except RegistryFull:
            raise HttpError(
                503, "every session slot holds a running stream; retry later", "unavailable_error"
            ) from None
        except InvalidArgument as e:
            raise HttpError(400, str(e)) from None

    async def post_completion(self, req: Request, conn: Connection, route: str) -> None:
        owner = self.owner(req)
        stream = self.validate_body(req.body, route)
        conv = self.header_conv_id(req)
        anonymous = conv is None
        if conv is None:
            conv, owner = "anon-" + secrets.token_hex(12), ANON_OWNER
        writer = self.create_session(conv, owner)
        reader = self.seg.reader(conv, 0, owner)
        self.counters.inc(HttpCounter.STREAMS_STARTED)
        job = Job(conv, owner, writer.generation, route, req.body)
        self.track(asyncio.get_running_loop().create_task(self.handoff(job, writer)))
        finished = False
        try:
            if stream:
                info = self.seg.get(reader.conversation_id, owner)
                conn.start_stream(self.resume_headers(reader, info, 0), req.version)
                finished = await self.relay(conn, reader, owner)
            else:
                finished = await self.aggregate(conn, reader, route)
        finally:
            if anonymous:
                # The plain OpenAI contract: the generation dies with the connection.
                if finished:
                    self.seg.evict(conv, owner)
                else:
                    self.seg.evict_and_cancel(conv, owner)

    def validate_body(self, body: bytes, route: str) -> bool:
        try:
            if route == "chat":
                c = chat_request_decoder.decode(body)
                mt = c.max_tokens if c.max_tokens is not None else c.max_completion_tokens
                stream, n = c.stream, c.n
            else:
                p = completion_request_decoder.decode(body)
                mt, stream, n = p.max_tokens, p.stream, p.n
        except msgspec.ValidationError as e:
            raise HttpError(400, f"invalid request body: {e}") from None
        except msgspec.DecodeError as e:
            raise HttpError(400, f"request body is not valid JSON: {e}") from None
        if mt is not None and mt < 0:
            raise HttpError(400, "max_tokens must be >= 0")
        if n != 1:
            raise HttpError(400, "only n=1 is supported")
        return stream

    def worker_order(self) -> list[int]:
        """The workers to offer the next job to, least loaded first: fewest active jobs (the
        gauge each worker keeps in the shared counters, plus this process's hand-offs not yet
        acknowledged). Equal loads are taken in turn, starting one further for every job, so
        an idle pool still spreads its jobs. Other HTTP processes dispatching at the same
        moment cannot see each other's hand-offs until a worker adopts them; the rotation
        keeps such a race from sending them all to one worker."""
        n = self.cfg.workers
        start = self.next_worker % n
        self.next_worker += 1
        load = [
            self.counters.read(worker_row(self.cfg, w), WorkerCounter.ACTIVE) + self.handing_off[w]
            for w in range(n)
        ]
        return sorted(range(n), key=lambda w: (load[w], (w - start) % n))

    async def handoff(self, job: Job, writer: Writer) -> None:
        """Give the job to the least loaded worker that takes the connection (the next one
        if it does not); on failure before adoption, fail the session here."""
        payload = job_encoder.encode(job)
        frame = struct.pack("!I", len(payload)) + payload
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10.0
        reason = "no inference worker is available"
        while loop.time() < deadline:
            if writer.cancelled:
                return
            for w in self.worker_order():
                path = os.path.join(self.cfg.run_dir, f"worker-{w}.sock")
                self.handing_off[w] += 1
                try:
                    try:
                        r, wr = await asyncio.open_unix_connection(path)
                    except OSError:
                        continue
                    try:
                        wr.write(frame)
                        ack = await asyncio.wait_for(r.read(1), HANDOFF_TIMEOUT)
                    except (OSError, TimeoutError):
                        ack = b""
                    finally:
                        wr.close()
                finally:
                    self.handing_off[w] -= 1
                if ack in (JOB_ACK_ADOPTED, JOB_ACK_GONE):
                    return
                # The worker may have adopted the job before it failed (the dead-producer sweep
                # ends the session then), so the job is not offered to another one.
                reason = "the inference worker failed before starting the stream"
                break
            else:
                await asyncio.sleep(0.1)  # every worker is restarting
                continue
            break
        # Still the producer (adoption never happened): end the stream visibly.
        self.counters.inc(HttpCounter.HANDOFF_FAILED)
        if writer.write(
            frame_event(writer.total_bytes, error_event(503, reason, "worker_unavailable"))
        ):
            writer.finalize("failed")

    @staticmethod
    def resume_headers(
        reader: Reader, info: SessionInfo | None, offset: int
    ) -> list[tuple[str, str]]:
        """Epoch, served-from offset and first available offset of a stream response (``info``:
        the session as ``Segment.get`` gives it)."""
        first = info.first_available if info is not None else 0
        return [
            ("X-Ringcast-Epoch", str(reader.epoch)),
            ("X-Ringcast-Offset", str(offset)),
            ("X-Ringcast-First-Available", str(first)),
        ]

    async def relay(self, conn: Connection, reader: Reader, owner: str) -> bool:
        """Copy ring bytes to the client until the stream ends; True if it finished.

        A reader behind the ring's end catches up on its own (``solo``); at the end it joins
        the process's :class:`Pump` for the session, which reads once per wake-up and writes to
        every joined connection. A connection whose write buffer fills is detached again and
        goes on solo from where it was, so it never holds up the others.
        """
        self.counters.inc(HttpCounter.READERS_ACTIVE)
        finished = False
        key = (reader.slot, reader.generation)
        conv = reader.conversation_id
        start = reader.offset
        try:
            while True:
                try:
                    data = reader.read_nowait(RELAY_READ)
                    if data is None:
                        pump = self.pumps.get(key)
                        if pump is None:
                            # Not counted: its clients' own readers are.
                            pump = self.pumps[key] = Pump(
                                self,
                                key,
                                self.seg.reader(conv, reader.offset, owner, counted=False),
                            )
                        if pump.offset == reader.offset:
                            outcome, value = await pump.join(conn)
                            if outcome == "done":
                                finished = True
                                break
                            if outcome == "ended":
                                self.write_end(conn, str(value))
                                break
                            # Detached at offset `value`: drain, then go on alone.
                            if conn.write_paused:
                                await conn.drain()
                            assert isinstance(value, int)
                            reader.close()
                            reader = self.seg.reader(conv, value, owner)
                            continue
                        data = await reader.aread(RELAY_READ)
                except OffsetLost as e:
                    self.counters.inc(HttpCounter.OFFSETS_LOST)
                    self.counters.inc(HttpCounter.FELL_BEHIND)
                    conn.write_body(
                        error_event(
                            410,
                            f"this reader fell behind: bytes before offset "
                            f"{e.first_available} were dropped; resume from there",
                            "offset_lost",
                            e.first_available,
                        )
                    )
                    break
                except SessionEnded as e:
                    self.write_end(conn, e.reason)
                    break
                except SessionNotFound:
                    self.write_end(conn, "evicted")
                    break
                if not data:
                    finished = True
                    break
                conn.write_body(data)
                if conn.write_paused:
                    await conn.drain()
            if finished and start > 0:
                # Held beyond the end of a running stream (as llama-server does), which then
                # finished short of that offset: say so instead of ending silently.
                total = self.final_total(reader, self.seg.get(reader.conversation_id, owner))
                if total is not None and start > total:
                    conn.write_body(
                        error_event(
                            416,
                            f"the stream finished with {total} bytes, short of offset {start} "
                            f"that this read asked for; resume from an offset of at most {total}",
                            "invalid_request_error",
                        )
                    )
            conn.end_stream()
        finally:
            reader.close()
            self.counters.inc(HttpCounter.READERS_ACTIVE, -1)
        return finished

    @staticmethod
    def final_total(reader: Reader, info: SessionInfo | None) -> int | None:
        """``total_bytes`` of the reader's session if it is finalized, else None (running, or
        gone: collected, or replaced by a newer session with the same id); ``info`` is what
        ``Segment.get`` gives for its id."""
        if (
            info is None
            or (info.slot, info.generation) != (reader.slot, reader.generation)
            or not info.is_done
        ):
            return None
        return info.total_bytes

    @staticmethod
    def write_end(conn: Connection, reason: str) -> None:
        code, message = END_EVENTS.get(reason, (410, f"stream ended: {reason}"))
        conn.write_body(error_event(code, message, reason))

    async def aggregate(self, conn: Connection, reader: Reader, route: str) -> bool:
        """Non-streaming: read the whole session and answer one JSON completion."""
        body = bytearray()
        try:
            while True:
                data = await reader.aread(RELAY_READ)
                if not data:
                    break
                body += data
        except SessionEnded as e:
            code, message = END_EVENTS.get(e.reason, (410, f"stream ended: {e.reason}"))
            raise HttpError(code if code != 409 else 410, message, e.reason) from None
        except OffsetLost:
            raise HttpError(
                500, "response larger than the session buffer", "server_error"
            ) from None
        finally:
            reader.close()
        text: list[str] = []
        finish: str | None = None
        usage: Usage | None = None
        cid, model, created = "", self.cfg.model_name, int(time.time())
        for data in iter_sse_data(bytes(body)):
            if data == b"[DONE]":
                break
            try:
                chunk = chunk_decoder.decode(data)
            except msgspec.DecodeError:
                continue
            if chunk.error is not None:
                code = chunk.error.code if 400 <= chunk.error.code < 600 else 500
                raise HttpError(code, chunk.error.message, chunk.error.type)
            cid, model, created = chunk.id or cid, chunk.model or model, chunk.created or created
            usage = chunk.usage or usage
            for ch in chunk.choices:
                if ch.index != 0:
                    continue
                piece = ch.delta.content if ch.delta is not None else ch.text
                if piece:
                    text.append(piece)
                finish = ch.finish_reason or finish
        content = "".join(text)
        result: ChatCompletion | Completion
        if route == "chat":
            result = ChatCompletion(
                cid or "chatcmpl-" + secrets.token_hex(12),
                "chat.completion",
                created,
                model,
                [ChatChoice(0, AssistantMessage("assistant", content), finish)],
                usage=usage,
            )
        else:
            result = Completion(
                cid or "cmpl-" + secrets.token_hex(12),
                "text_completion",
                created,
                model,
                [CompletionChoice(0, content, finish)],
                usage=usage,
            )
        self.send_json(conn, result)
        return True

    # -- resumable stream routes

    async def get_stream(self, req: Request, conn: Connection) -> None:
        owner = self.owner(req)
        conv = self.stream_id(req, "/v1/stream")
        last_id = req.headers.get("last-event-id")
        if last_id is not None and last_id != "":
            what = "Last-Event-ID"
            offset = self.parse_offset(last_id, what)
        else:
            what = "'from'"
            offset = self.parse_offset(req.query_params().get("from", ""), what)
        try:
            reader = self.seg.reader(conv, offset, owner)
        except SessionNotFound:
            raise HttpError(404, "Stream not found or expired") from None
        except OffsetLost as e:
            self.counters.inc(HttpCounter.OFFSETS_LOST)
            raise HttpError(
                410,
                f"offset {offset} was dropped from the stream; the first "
                f"available offset is {e.first_available}",
                "offset_lost",
                first_available=e.first_available,
            ) from None
        except InvalidArgument as e:
            raise HttpError(400, str(e)) from None
        # One lookup serves both the end check and the response headers (a lookup reads the
        # process table and the producer's /proc entry).
        info = self.seg.get(conv, owner)
        total = self.final_total(reader, info)
        if total is not None and offset > total:
            # llama-server answers an empty 200 here, so a client with a wrong byte count
            # learns nothing; an offset equal to the total (it has everything) stays a 200.
            reader.close()
            raise HttpError(
                416,
                f"{what} {offset} is beyond the end of the stream, which finished with "
                f"{total} bytes; resume from an offset of at most {total}",
            )
        if offset > 0:
            self.counters.inc(HttpCounter.RESUMES)
        conn.start_stream(self.resume_headers(reader, info, offset), req.version)
        await self.relay(conn, reader, owner)

    def delete_stream(self, req: Request, conn: Connection) -> None:
        owner = self.owner(req)
        conv = self.stream_id(req, "/v1/stream")
        with contextlib.suppress(InvalidArgument):
            self.seg.evict_and_cancel(conv, owner)
        conn.send(204, b"")

    def lookup(self, req: Request, conn: Connection) -> None:
        owner = self.owner(req)
        try:
            body = lookup_request_decoder.decode(req.body) if req.body.strip() else None
        except (msgspec.ValidationError, msgspec.DecodeError) as e:
            raise HttpError(400, f"invalid body: {e}") from None
        out: list[StreamInfo] = []
        seen: set[tuple[int, int]] = set()
        for cid in (body.conversation_ids or []) if body is not None else []:
            if not cid:
                continue
            try:
                infos = self.seg.lookup_prefix(cid, owner)
            except InvalidArgument:
                continue
            for i in infos:
                if (i.slot, i.generation) not in seen:
                    seen.add((i.slot, i.generation))
                    out.append(self.stream_info(i))
        self.send_json(conn, out)

    def list_streams(self, req: Request, conn: Connection) -> None:
        owner = self.owner(req)
        conv = req.query_params().get("conversation_id")
        if conv:
            try:
                infos = self.seg.lookup_prefix(self.check_conv_id(conv), owner)
            except InvalidArgument:
                infos = []
        else:
            infos = self.seg.list(owner)
        self.send_json(conn, [self.stream_info(i) for i in infos])

    # -- metrics

    def metrics(self) -> bytes:
        cfg = self.cfg
        infos = self.seg.list()
        stats = self.seg.stats()
        by_state = {"running": 0, "done": 0, "cancelled": 0, "failed": 0}
        readers = 0
        for i in infos:
            by_state[i.state] = by_state.get(i.state, 0) + 1
            readers += i.readers
        http = [self.counters.read_row(http_row(i)) for i in range(cfg.http_procs)]
        workers = [self.counters.read_row(worker_row(cfg, i)) for i in range(cfg.workers)]
        mgr = self.counters.read_row(0)
        out: list[str] = []

        def metric(
            name: str, kind: str, help_: str, samples: list[tuple[str, int | float]]
        ) -> None:
            out.append(f"# HELP ringcast_{name} {help_}")
            out.append(f"# TYPE ringcast_{name} {kind}")
            out.extend(f"ringcast_{name}{labels} {value}" for labels, value in samples)

        def total(rows: list[tuple[int, ...]], idx: int) -> int:
            return sum(r[idx] for r in rows)

        metric(
            "sessions",
            "gauge",
            "Sessions in the segment by state.",
            [(f'{{state="{s}"}}', n) for s, n in sorted(by_state.items())],
        )
        metric("session_slots", "gauge", "Size of the session table.", [("", stats.max_sessions)])
        metric(
            "bytes_buffered",
            "gauge",
            "Bytes held in live sessions' rings.",
            [("", stats.bytes_buffered)],
        )
        metric(
            "segment_resident_bytes",
            "gauge",
            "Memory the segment file really uses.",
            [("", stats.resident_bytes)],
        )
        metric("readers", "gauge", "Readers attached across all processes.", [("", readers)])
        metric(
            "resumes_total",
            "counter",
            "Stream reads from an offset above 0.",
            [("", total(http, HttpCounter.RESUMES))],
        )
        metric(
            "offsets_lost_total",
            "counter",
            "Reads refused (410) or ended because the offset was dropped.",
            [("", total(http, HttpCounter.OFFSETS_LOST))],
        )
        metric(
            "evictions_total",
            "counter",
            "Sessions evicted, by reason.",
            [
                ('{reason="ttl"}', mgr[ManagerCounter.EVICTIONS_TTL]),
                ('{reason="idle"}', mgr[ManagerCounter.EVICTIONS_IDLE]),
                (
                    '{reason="lru"}',
                    mgr[ManagerCounter.EVICTIONS_LRU] + total(http, HttpCounter.EVICTIONS_LRU),
                ),
            ],
        )
        metric(
            "dead_producers_total",
            "counter",
            "Sessions failed because their producer process died.",
            [("", mgr[ManagerCounter.DEAD_PRODUCERS])],
        )
        metric(
            "restarts_total",
            "counter",
            "Child processes restarted by the manager.",
            [
                ('{role="http"}', mgr[ManagerCounter.RESTARTS_HTTP]),
                ('{role="worker"}', mgr[ManagerCounter.RESTARTS_WORKER]),
            ],
        )
        metric(
            "http_requests_total",
            "counter",
            "Requests per HTTP process.",
            [(f'{{process="{i}"}}', r[HttpCounter.REQUESTS]) for i, r in enumerate(http)],
        )
        metric(
            "http_errors_total",
            "counter",
            "Error responses per HTTP process and class.",
            [
                (f'{{process="{i}",class="{c}"}}', r[idx])
                for i, r in enumerate(http)
                for c, idx in (("4xx", HttpCounter.ERRORS_4XX), ("5xx", HttpCounter.ERRORS_5XX))
            ],
        )
        metric(
            "http_streams_started_total",
            "counter",
            "Completion requests accepted.",
            [(f'{{process="{i}"}}', r[HttpCounter.STREAMS_STARTED]) for i, r in enumerate(http)],
        )
        metric(
            "http_bytes_sent_total",
            "counter",
            "Stream body bytes sent.",
            [(f'{{process="{i}"}}', r[HttpCounter.BYTES_SENT]) for i, r in enumerate(http)],
        )
        metric(
            "http_readers_active",
            "gauge",
            "Streaming responses in progress.",
            [(f'{{process="{i}"}}', r[HttpCounter.READERS_ACTIVE]) for i, r in enumerate(http)],
        )
        metric(
            "http_coalesce_seconds",
            "gauge",
            "How long this process's pumps now wait after a pass (adaptive coalescing).",
            [(f'{{process="{i}"}}', r[HttpCounter.COALESCE_US] / 1e6) for i, r in enumerate(http)],
        )
        metric(
            "slow_readers_detached_total",
            "counter",
            "Clients whose full write buffer detached them from the live fan-out.",
            [("", total(http, HttpCounter.DETACHED))],
        )
        metric(
            "write_timeouts_total",
            "counter",
            "Connections reset because their client read nothing for --write-timeout.",
            [("", total(http, HttpCounter.WRITE_TIMEOUTS))],
        )
        metric(
            "handoff_failures_total",
            "counter",
            "Jobs no worker adopted.",
            [("", total(http, HttpCounter.HANDOFF_FAILED))],
        )
        metric(
            "worker_jobs_total",
            "counter",
            "Jobs per worker and outcome.",
            [
                (f'{{worker="{i}",outcome="{o}"}}', r[idx])
                for i, r in enumerate(workers)
                for o, idx in (
                    ("started", WorkerCounter.JOBS_STARTED),
                    ("done", WorkerCounter.JOBS_DONE),
                    ("failed", WorkerCounter.JOBS_FAILED),
                    ("cancelled", WorkerCounter.JOBS_CANCELLED),
                )
            ],
        )
        metric(
            "worker_jobs_active",
            "gauge",
            "Jobs generating right now.",
            [(f'{{worker="{i}"}}', r[WorkerCounter.ACTIVE]) for i, r in enumerate(workers)],
        )
        metric(
            "worker_tokens_total",
            "counter",
            "Tokens (events) produced.",
            [("", total(workers, WorkerCounter.TOKENS))],
        )
        metric(
            "event_loop_info",
            "gauge",
            "The event loop each child process runs (1 on its line; --event-loop).",
            [
                (f'{{role="{role}",index="{i}",loop="{loop_of(r)}"}}', 1)
                for role, rows in (("http", http), ("worker", workers))
                for i, r in enumerate(rows)
            ],
        )
        return ("\n".join(out) + "\n").encode()


def _bound_socket(cfg: ServeConfig) -> socket.socket:
    """The port, shared with the other HTTP processes; ``create_server`` listens on it."""
    family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((cfg.host, cfg.port))
    sock.setblocking(False)
    return sock


async def serve_http(cfg: ServeConfig, index: int) -> None:
    seg = Segment.open(cfg.segment)
    counters = open_child_counters(cfg, "http", index)
    counters.set(HttpCounter.READERS_ACTIVE, 0)
    app = App(cfg, index, seg, counters)
    loop = asyncio.get_running_loop()
    if cfg.coalesce == "adaptive" and cfg.coalesce_ms > 0:
        app.track(loop.create_task(app.adapt_coalescing()))
    # create_server calls listen() itself, with its own backlog (asyncio's and uvloop's
    # default: 100) unless given one.
    server = await loop.create_server(
        lambda: Connection(app), sock=_bound_socket(cfg), backlog=LISTEN_BACKLOG
    )
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    Path(cfg.run_dir, f"ready-http-{index}").write_text(str(os.getpid()))
    log.debug("HTTP process %d listening", index)
    await stop.wait()
    # Stop accepting, close idle keep-alive connections, let streams end as workers
    # finalize their sessions, then close whatever is left.
    server.close()
    for c in list(app.connections):
        if not c.busy and c.transport is not None:
            c.transport.close()
    deadline = loop.time() + 5.0
    while any(c.busy for c in app.connections) and loop.time() < deadline:
        await asyncio.sleep(0.05)
    for c in list(app.connections):
        if c.transport is not None:
            c.transport.abort()


def main(argv: list[str] | None = None) -> None:
    child_main("http", serve_http, argv)


if __name__ == "__main__":
    main()
