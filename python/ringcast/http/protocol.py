"""The ``asyncio.Protocol`` of one server connection: HTTP/1.1 keep-alive and pipelining,
request bodies, and response framing.

- keep-alive and pipelining: one request at a time per connection; later requests wait in the
  buffer, and reading pauses when that buffer grows;
- request heads and chunked bodies parsed by llhttp (:mod:`ringcast.http.parse`);
- ``Content-Length`` and chunked bodies up to ``max_body`` (413 beyond, ``100-continue``
  honoured once the application admitted the head);
- a body the application streams instead of holding (:meth:`HttpApp.streams_body`: a
  request it forwards elsewhere) is handed over as it arrives, as a :class:`BodyStream`, with
  reading paused while more than ``PIPELINE_BUFFER`` of it waits;
- responses: sized (:meth:`Connection.send`) or streamed (:meth:`Connection.start_stream`,
  :meth:`Connection.start_response`; chunked on HTTP/1.1, delimited by closing on HTTP/1.0).
  A fan-out writes one pre-framed chunk to many connections
  (``ringcast.server.fanout.Pump.deliver``, through each transport or from Rust): framing
  once per pass is what keeps a thousand readers cheap.

The class holds connection state only. What a request means is the application's business:
an :class:`HttpApp` gets each parsed :class:`~ringcast.http.parse.Request` with this
connection as its response channel, and says which headers every response carries.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Protocol

from ringcast.http.flow import FlowControl
from ringcast.http.logs import log_failure
from ringcast.http.parse import REASONS, HeadParser, HttpError, Request, RequestBody, too_large
from ringcast.wire.openai import error_json

log = logging.getLogger("ringcast.http")

PIPELINE_BUFFER = 64 * 1024
LINGER_S = 2.0
"""How long a connection that refused a body (413) discards what still arrives before it
closes."""


@dataclass(frozen=True)
class HttpSettings:
    max_body: int
    """Largest request body accepted (413 beyond)."""
    keepalive_timeout: float
    """Seconds an idle keep-alive connection is kept open."""
    write_timeout: float
    """Seconds a client may take nothing from a full write buffer before it is reset."""
    max_conns_per_client: int = 0
    """Open connections one remote address may hold in this process; a connection past it
    is answered 429 and closed at once. 0: no limit."""


class HttpApp(Protocol):
    """What a :class:`Connection` needs from the application behind it."""

    http: HttpSettings
    connections: set[Connection]
    """Open connections (a connection adds and removes itself), for shutdown."""
    connections_per_client: dict[str, int]
    """Open connections per remote address (a connection counts itself in and out)."""

    def admit(self, req: Request, counted: bool = True) -> None:
        """Decide from the head alone whether ``req`` will be served (route, method, key),
        before its body is read: raise :class:`HttpError` to refuse it. What it resolved may
        be left in ``req.admitted`` for :meth:`handle`. A request announcing
        ``Expect: 100-continue`` gets its ``100 Continue`` only once admitted. ``counted``
        False: the request was counted by the process that passed its connection here."""

    async def handle(self, req: Request, conn: Connection) -> None:
        """Answer an admitted ``req`` through ``conn``; raise :class:`HttpError` to answer an
        error."""

    def response_headers(self, req: Request | None) -> list[tuple[str, str]]:
        """Headers every response to ``req`` carries (``None``: a request that could not be
        parsed)."""

    def streams_body(self, req: Request) -> bool:
        """Whether ``req``'s body is handed over as it arrives (``req.body_stream``) rather
        than read whole into ``req.body`` first (and limited by ``max_body``)."""

    def count_status(self, status: int) -> None:
        """An error response was sent."""

    def count_bytes_sent(self, n: int) -> None:
        """``n`` body bytes of a streamed response were written."""

    def count_write_timeout(self) -> None:
        """A connection was reset by the write watchdog."""


class HandedOff(Exception):
    """Raised by a handler that passed its connection to another process
    (:meth:`Connection.pass_to`): the connection is let go here without a byte written."""


class Connection(asyncio.Protocol):
    """One client connection: parser state, response writing and flow control.

    ``passed_in``: the connection was passed here by another process, which read these
    bytes of it (its first request; see ``ringcast.server.passing``); they are parsed as if
    read here."""

    def __init__(self, app: HttpApp, passed_in: bytes | None = None) -> None:
        self.app = app
        self.passed_in = passed_in
        """The bytes another process read before it passed the connection here (its first
        request, counted there); such a connection is never passed on again."""
        self.uncounted = passed_in is not None
        """The next request was counted by the process that passed the connection here."""
        self.head_raw = b""
        """The bytes of the head of the request being handled (a pass sends them on)."""
        self.transport: asyncio.Transport | None = None
        self.flow: FlowControl | None = None
        self.buf = bytearray()
        self.head = HeadParser()
        self.pending: Request | None = None
        """The request whose body is being read, by ``body``."""
        self.body = RequestBody(0, False, None)
        self.busy = False
        self.closed = False
        self.task: asyncio.Task[None] | None = None
        self.reading_paused = False
        self.idle_timer: asyncio.TimerHandle | None = None
        self.keep_alive = True
        self.chunked = False
        self.extra_headers = app.response_headers(None)
        self.body_stream: BodyStream | None = None
        self.refusal: HttpError | None = None
        """The admission step's answer to the pending request, sent once its body is in."""
        self.client = ""
        """The remote address, as counted in ``app.connections_per_client``."""
        self.discarding = False
        """A refused body (413) is still arriving: it is dropped until the connection closes."""
        self.fd = -1
        """The socket's descriptor (-1: none known), for writes that bypass the transport
        while its write buffer is empty (``ringcast.server.fanout.Pump``)."""
        self.fd_inode = 0
        """The socket's inode, taken with :attr:`fd`: that number may be another socket's
        once the transport has closed it."""

    @property
    def write_paused(self) -> bool:
        """The transport's write buffer is above its high-water mark."""
        return self.flow is not None and self.flow.paused

    # -- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        t: asyncio.Transport = transport  # type: ignore[assignment]
        self.transport = t
        self.flow = FlowControl(t, self.app.http.write_timeout, self.app.count_write_timeout)
        # (TCP_NODELAY: set by the event loop on every TCP connection it makes, uvloop's and
        # asyncio's alike; a passed-in socket keeps it.)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                fd = sock.fileno()
                self.fd_inode = os.fstat(fd).st_ino
                self.fd = fd
            except (OSError, AttributeError):
                pass
        self.app.connections.add(self)
        peer = transport.get_extra_info("peername")
        self.client = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        per_client = self.app.connections_per_client
        per_client[self.client] = per_client.get(self.client, 0) + 1
        limit = self.app.http.max_conns_per_client
        if limit and per_client[self.client] > limit:
            # One client holding every file descriptor of the process would lock everyone
            # else out; it gets this answer on its extra connections instead.
            self._reject(
                HttpError(
                    429,
                    f"too many connections from {self.client}: at most {limit} open at once "
                    "per client address and HTTP process (--max-conns-per-client); close "
                    "idle ones or reuse them",
                    close=True,
                )
            )
            return
        self._arm_idle()
        if self.passed_in:
            self.data_received(self.passed_in)

    def data_received(self, data: bytes) -> None:
        if self.discarding:
            return
        self.buf += data
        self._parse()
        if self.busy and len(self.buf) > PIPELINE_BUFFER and not self.reading_paused:
            assert self.transport is not None
            self.transport.pause_reading()
            self.reading_paused = True

    def eof_received(self) -> bool:
        # A client that half-closes is treated as gone: that is how disconnects show up.
        self._lost()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost()

    def pause_writing(self) -> None:
        assert self.flow is not None
        self.flow.pause_writing()

    def resume_writing(self) -> None:
        assert self.flow is not None
        self.flow.resume_writing()

    def pass_to(self, req: Request, give: Callable[[int, bytes], bool], max_bytes: int) -> bool:
        """Passes this connection, while its handler has written nothing of its answer to
        ``req`` (a request without a body), to another process: ``give(fd, data)`` sends
        the socket with the bytes read of it from ``req``'s head on (``data``, at most
        ``max_bytes``). True if it went: the handler then raises :class:`HandedOff`. False
        (it stays here, reading as before): passed here already, bytes still buffered for
        the client, a body, more than ``max_bytes`` read, or ``give`` failed."""
        transport = self.transport
        if (
            transport is None
            or self.closed
            or self.passed_in is not None
            or self.fd < 0
            or req.content_length
            or req.chunked
            or transport.is_closing()
            or transport.get_write_buffer_size()
            or len(self.head_raw) + len(self.buf) > max_bytes
        ):
            return False
        try:
            if os.fstat(self.fd).st_ino != self.fd_inode:
                return False  # the number names another socket by now
        except OSError:
            return False
        was_paused = self.reading_paused
        if not was_paused:
            transport.pause_reading()  # what arrives from now on stays in the socket for them
        if not give(self.fd, self.head_raw + bytes(self.buf)):
            if not was_paused:
                transport.resume_reading()
            return False
        self.buf.clear()
        return True

    # -- internals

    def _lost(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.app.connections.discard(self)
        per_client = self.app.connections_per_client
        left = per_client.get(self.client, 1) - 1
        if left > 0:
            per_client[self.client] = left
        else:
            per_client.pop(self.client, None)
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        if self.task is not None and not self.task.done():
            self.task.cancel()
        if self.flow is not None:
            self.flow.close()
        if self.body_stream is not None:
            self.body_stream.close()

    def _arm_idle(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        self.idle_timer = asyncio.get_running_loop().call_later(
            self.app.http.keepalive_timeout, self._idle_close
        )

    def _idle_close(self) -> None:
        if not self.busy and self.transport is not None:
            self.transport.close()

    def _parse(self) -> None:
        """Read heads and bodies off ``buf``: one request at a time, the next head only once
        the previous request was answered (a streamed body is read on while it is handled)."""
        while not self.closed and not self.discarding:
            req = self.pending
            if req is None:
                if self.busy or not self.buf:
                    return
                try:
                    used = self.head.feed(self.buf)
                except HttpError as e:
                    self._reject(e)
                    return
                if not used:
                    return
                self.head_raw = bytes(self.buf[:used])
                del self.buf[:used]
                req = self.head.request
                assert req is not None
                self.head = HeadParser()
                if not self._start_body(req):
                    return
            try:
                used = self.body.feed(self.buf)
            except HttpError as e:
                if req.body_stream is not None and self.transport is not None:
                    # Its handler may have started the response: the connection is cut
                    # instead, as when the client goes away mid-body.
                    self.transport.close()
                    self._lost()
                    return
                self._reject(e)
                return
            del self.buf[:used]
            if not self.body.done:
                return
            self.pending = None
            if req.body_stream is not None:
                req.body_stream.finish()  # its request is being handled already
                continue
            req.body = self.body.take()
            self._dispatch(req)

    def _start_body(self, req: Request) -> bool:
        """Decide on ``req``'s head: its body limit (413), admission, ``100 Continue``, a
        streamed body. False if it was refused here (the connection closes)."""
        streamed = self.app.streams_body(req)
        limit = None if streamed else self.app.http.max_body
        if limit is not None and req.content_length > limit:
            self._reject(too_large(req.content_length, limit))
            return False
        has_body = req.chunked or req.content_length > 0
        expects = (
            has_body
            and req.version == b"HTTP/1.1"  # ignored from an HTTP/1.0 client (RFC 9110 §10.1.1)
            and req.headers.get("expect", "").lower() == "100-continue"
        )
        try:
            counted, self.uncounted = not self.uncounted, False
            self.app.admit(req, counted=counted)
        except HttpError as e:
            if expects:
                # The client waits for our word before sending the body: it gets the
                # refusal instead, and the connection ends with it.
                self._reject(e)
                return False
            self.refusal = e  # answered once the body that is on its way is read
        self.pending = req
        if expects:
            self._write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if streamed:
            # The body goes to the application as it arrives, while it handles the request.
            self.body_stream = req.body_stream = BodyStream(self)
            self.body = RequestBody(req.content_length, req.chunked, None, self.body_stream.feed)
            self._dispatch(req)
        else:
            self.body = RequestBody(req.content_length, req.chunked, limit)
        return True

    def _dispatch(self, req: Request) -> None:
        self.busy = True
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        self.task = asyncio.get_running_loop().create_task(self._run(req))

    def _reject(self, e: HttpError) -> None:
        self.keep_alive = False
        self.app.count_status(e.status)
        self.busy = True  # nothing more is parsed on this connection
        if e.status == 413 and self.transport is not None:
            # The client is most likely still sending the body refused here. Closing with
            # unread bytes makes the kernel answer with a reset, which can reach the client
            # before it reads the 413 (it then sees "connection reset"); so answer, discard
            # what still arrives for a moment, then close (a lingering close).
            self.send(e.status, error_json(e.status, e.message, e.type), headers=e.headers)
            self.discarding = True
            self.buf.clear()
            asyncio.get_running_loop().call_later(LINGER_S, self.transport.close)
            return
        self.send(e.status, error_json(e.status, e.message, e.type), headers=e.headers, close=True)

    async def _run(self, req: Request) -> None:
        self.keep_alive = req.keep_alive
        self.chunked = False
        self.extra_headers = self.app.response_headers(req)
        refusal, self.refusal = self.refusal, None
        try:
            if refusal is not None:
                raise refusal
            await self.app.handle(req, self)
        except HandedOff:
            # Our descriptor only: the connection lives on in the process it went to.
            self.keep_alive = False
            if self.transport is not None:
                self.transport.close()
            self._lost()
            return
        except HttpError as e:
            self.app.count_status(e.status)
            if e.close or (self.body_stream is not None and not self.body_stream.complete):
                # (A streamed body left unread would be parsed as the next request.)
                self.keep_alive = False
            self.send(
                e.status,
                error_json(e.status, e.message, e.type, e.first_available),
                headers=e.headers,
            )
        except asyncio.CancelledError:
            return
        except ConnectionError:
            return
        except Exception as e:
            # The path's first two segments only: past them may be a conversation id.
            log_failure(log, f"unhandled error in {req.method} {req.path.split('/')[1:3]}", e)
            self.app.count_status(500)
            if not self.closed:
                self.keep_alive = False
                self.send(500, error_json(500, "internal server error", "server_error"))
        if self.body_stream is not None:
            if not self.body_stream.complete:
                # The rest of an unread body would be parsed as the next request.
                self.keep_alive = False
            self.body_stream = None
        self._finish()

    def _finish(self) -> None:
        if self.closed or self.transport is None:
            return
        if not self.keep_alive:
            self.transport.close()
            return
        if self.buf and self.write_paused:
            # Its answers wait unread: the next request waits for them to drain (a client
            # that pipelines requests and never reads grew the write buffer without bound;
            # one that reads nothing for --write-timeout is reset by the watchdog).
            self.task = asyncio.get_running_loop().create_task(self._finish_after_drain())
            return
        self.busy = False
        self.task = None
        if self.reading_paused and len(self.buf) <= PIPELINE_BUFFER:
            # Only once what waits is parsed down: resumed at every answer, each request
            # handled from a full buffer let one more read in, and a client pipelining small
            # requests while reading the answers grew it by hundreds of MiB a second. (Before
            # the next request is parsed: a body it streams may pause reading for itself.)
            self.reading_paused = False
            self.transport.resume_reading()
        self._arm_idle()
        if self.buf:
            self._parse()

    async def _finish_after_drain(self) -> None:
        try:
            await self.drain()
        except ConnectionError:
            return
        self._finish()

    # -- writing

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def _head(self, status: int, headers: list[tuple[str, str]]) -> bytes:
        lines = [f"HTTP/1.1 {status} {reason(status)}"]
        lines += [f"{k}: {v}" for k, v in headers]
        lines.append("Connection: keep-alive" if self.keep_alive else "Connection: close")
        lines += [f"{k}: {v}" for k, v in self.extra_headers]
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

    def start_response(
        self,
        status: int,
        headers: list[tuple[str, str]],
        version: bytes,
        length: int | None,
        bodyless: bool = False,
    ) -> None:
        """Send a response head for a body written with :meth:`write_body`: of ``length``
        bytes (its ``Content-Length`` among ``headers``), else chunked on HTTP/1.1 and
        delimited by closing on HTTP/1.0. ``bodyless``: a response without a body whatever
        its headers say (to HEAD, a 204 or a 304), sent as they are."""
        hs = list(headers)
        if not bodyless and length is None:
            if version == b"HTTP/1.1":
                self.chunked = True
                hs.append(("Transfer-Encoding", "chunked"))
            else:
                self.keep_alive = False
        self._write(self._head(status, hs))

    def write_body(self, data: bytes) -> None:
        if not data or self.transport is None or self.closed:
            return
        if self.chunked:
            self.transport.writelines((b"%x\r\n" % len(data), data, b"\r\n"))
        else:
            self.transport.write(data)
        self.app.count_bytes_sent(len(data))

    def end_stream(self) -> None:
        if self.chunked:
            self._write(b"0\r\n\r\n")
            self.chunked = False

    async def drain(self) -> None:
        if self.flow is None or self.closed:
            return
        await self.flow.drain()


class BodyStream:
    """A request body handed to the application as it arrives (:meth:`HttpApp.streams_body`).

    At most ``PIPELINE_BUFFER`` bytes wait here unread: above that the connection stops
    reading until the application takes them, so a large upload costs bounded memory and
    slows to the pace of whoever consumes it.
    """

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.complete = False
        """The whole body was received (its last bytes may still wait here)."""
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._lost = False
        self._paused = False

    def feed(self, data: bytes) -> None:
        if not data:
            return
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > PIPELINE_BUFFER and not self._paused and self.conn.transport:
            self._paused = True
            self.conn.transport.pause_reading()
        self._wake()

    def finish(self) -> None:
        """The body's last bytes were fed."""
        self.complete = True
        self._wake()

    def close(self) -> None:
        """The connection is gone: a pending :meth:`read` fails."""
        self._lost = True
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def read(self) -> bytes:
        """The next body bytes as they came; ``b""`` once the whole body was read.
        ``ConnectionResetError`` if the client went away before sending all of it."""
        while not self._chunks:
            if self.complete:
                return b""
            if self._lost:
                raise ConnectionResetError("client went away while sending the request body")
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        if self._paused and self.conn.transport is not None and not self.conn.closed:
            self._paused = False
            self.conn.transport.resume_reading()
        return data


def reason(status: int) -> str:
    """The reason phrase of ``status`` (a passed-through upstream's may be any status)."""
    if status in REASONS:
        return REASONS[status]
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def frame_chunk(data: bytes) -> bytes:
    """``data`` as one chunk of a chunked body."""
    return b"%x\r\n%s\r\n" % (len(data), data)
