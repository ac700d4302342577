"""Baseline servers for the benchmarks: the HTTP API of ``ringcast serve`` that a benchmark
uses (``POST /v1/chat/completions`` with ``X-Conversation-Id``, ``GET /v1/stream?conv_id=&from=``
or ``/v1/stream/{id}``), built the way one would without ringcast. ``bench/http_fanout.py`` and
``ringcast replay --compare`` both run them from here.

- ``memory`` (alias ``asyncio``, its name in ``ringcast replay``): one process, each session a
  ``bytearray``, a task per reader woken by a future: the simplest correct design.
- ``memory-broadcast``: the same without a task per reader: the producer writes each event
  straight into every attached reader's transport (one flush per loop turn), the strongest
  single-process design we could write; what ringcast's pumps do inside each process.
- ``redis``: sessions in Redis Streams (one entry per event with its start offset; every
  producer's ``XADD``s go out pipelined together); per session with readers in the process,
  one ``XREAD BLOCK`` loop mirrors the stream into memory and wakes them.
- ``redis-per-reader``: every reader tails with its own ``XREAD BLOCK``: the naive design.

Events come from a trace (``--replay TRACE [--speed X]``, as ``ringcast serve --replay``) or,
without one, from :func:`timestamps`: chat chunks whose content is the producer's clock
(``$BENCH_TPS`` events/s after ``$BENCH_PREFILL`` s, as many as the request's
``max_tokens``), the source ``http_fanout.py`` measures latency with; ``ringcast serve
--generator baselines:timestamped`` produces the same for ringcast. Every event is framed
exactly like ringcast's (``id: <offset>`` lines), so a reader gets the same bytes from all.

    python bench/baselines.py memory --port 0 --replay bench/sample-trace.jsonl --speed max
    python bench/baselines.py redis --redis-url redis://127.0.0.1:6379/0

It prints ``... listening on http://HOST:PORT`` once it serves.

``--procs N`` serves from N processes on one port (``SO_REUSEPORT``; the kernel spreads the
connections), each with its own sessions: a hand-written server given the cores the way
ringcast's ``--http-procs N`` gives them, for streams whose only reader is the ``POST``'s
own response (a ``GET`` lands in whichever process the kernel picks, which may not hold its
stream).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

from ringcast.http.parse import HeadParser, HttpError, Request, parse_offset
from ringcast.server.child import die_with_parent
from ringcast.trace import ReplaySource, parse_speed
from ringcast.wire.openai import error_json
from ringcast.wire.sse import DONE_EVENT, frame_event

KINDS = ("memory", "asyncio", "memory-broadcast", "redis", "redis-per-reader")
MAX_BODY = 16 * 1024 * 1024
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
)

# --------------------------------------------------------------------------------------------
# Event sources


def _pace() -> tuple[float, float]:
    return (float(os.environ.get("BENCH_TPS", "50")), float(os.environ.get("BENCH_PREFILL", "1.0")))


async def timestamps(n: int) -> AsyncIterator[str]:
    """Event contents: when paced, each event's *scheduled* time (``t0 + i / tps``), so a
    producer that runs late because its process is busy (the single-process baselines' readers
    share its loop) shows that delay as latency instead of hiding it (coordinated omission);
    unpaced, the time it was produced."""
    tps, prefill = _pace()
    await asyncio.sleep(prefill)
    loop = asyncio.get_running_loop()
    t0, t0_ns = loop.time(), time.time_ns()
    for i in range(n):
        if tps > 0:
            delay = t0 + i / tps - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            yield str(t0_ns + int(i * 1e9 / tps))
            continue
        if i % 16 == 15:
            await asyncio.sleep(0)
        yield str(time.time_ns())


async def timestamped(ctx: Any) -> AsyncIterator[str]:
    """``ringcast serve --generator baselines:timestamped`` plug-in."""
    async for piece in timestamps(ctx.max_tokens or 16):
        yield piece


def chunk_event(content: str) -> bytes:
    """One unframed ``chat.completion.chunk`` event carrying ``content``."""
    return (
        b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":0,'
        b'"model":"bench","choices":[{"index":0,"delta":{"content":"%s"},'
        b'"finish_reason":null,"logprobs":null}]}\n\n' % content.encode()
    )


async def timestamp_events(body: bytes) -> AsyncIterator[bytes]:
    """The :func:`timestamps` stream for a request body, as events, then ``[DONE]``."""
    async for piece in timestamps(int(json.loads(body).get("max_tokens") or 16)):
        yield chunk_event(piece)
    yield DONE_EVENT


Events = Callable[[bytes], AsyncIterator[bytes]]
"""The unframed events that answer a request body."""


# --------------------------------------------------------------------------------------------
# Stores


class NotFound(Exception):
    pass


class Session:
    """A session's framed bytes in this process, and the readers waiting for more."""

    __slots__ = ("buf", "done", "task", "waiters")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.done = False
        self.task: asyncio.Task[None] | None = None
        self.waiters: list[asyncio.Future[None]] = []

    def wake(self) -> None:
        waiters, self.waiters = self.waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    async def tail(self, pos: int) -> AsyncIterator[bytes]:
        """Every byte from ``pos`` on, as it arrives, until the session is done."""
        while True:
            if pos < len(self.buf):
                data = bytes(self.buf[pos:])
                pos += len(data)
                yield data
            elif self.done:
                return
            else:
                fut = asyncio.get_running_loop().create_future()
                self.waiters.append(fut)
                await fut


class MemoryStore:
    """Every session's bytes in this process's memory; a task per reader."""

    def __init__(self) -> None:
        self.sessions: dict[str, Session] = {}

    async def start(self, conv: str, events: AsyncIterator[bytes]) -> None:
        old = self.sessions.get(conv)
        if old is not None and old.task is not None:
            old.task.cancel()
        s = self.sessions[conv] = Session()
        s.task = asyncio.ensure_future(self._produce(s, events))

    @staticmethod
    async def _produce(s: Session, events: AsyncIterator[bytes]) -> None:
        try:
            async for ev in events:
                s.buf += frame_event(len(s.buf), ev)
                s.wake()
        finally:
            s.done = True
            s.wake()

    async def read(self, conv: str, offset: int) -> AsyncIterator[bytes]:
        s = self.sessions.get(conv)
        if s is None:
            raise NotFound(conv)
        return s.tail(offset)


class Broadcast:
    """A session of :class:`BroadcastStore`: its bytes and the transports of the readers at
    its live edge."""

    __slots__ = ("buf", "done", "pending", "readers", "scheduled")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.pending = bytearray()
        self.scheduled = False
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.readers: list[asyncio.WriteTransport] = []


class BroadcastStore:
    """No task per reader. The producer appends each event and schedules one flush for the
    loop's next turn; the flush frames what accumulated once and writes it straight into every
    attached reader's transport (uvloop sends at once and buffers only what the socket does
    not take), the way ringcast's pumps do: one write per reader per event while the process
    keeps up, the backlog in one write when it falls behind. A reader that attaches gets
    everything so far in one write. With ``linger`` a flusher writes what accumulated at most
    once per linger instead."""

    def __init__(self, linger: float) -> None:
        self.sessions: dict[str, Broadcast] = {}
        self.linger = linger
        self.tasks: set[asyncio.Task[None]] = set()

    @staticmethod
    def send(s: Broadcast) -> None:
        s.scheduled = False
        if s.pending:
            framed = b"%x\r\n%s\r\n" % (len(s.pending), s.pending)
            s.pending = bytearray()
            for t in s.readers:
                if not t.is_closing():
                    t.write(framed)

    async def flusher(self, s: Broadcast) -> None:
        while not s.done.done():
            await asyncio.sleep(self.linger)
            self.send(s)

    async def start(self, conv: str, events: AsyncIterator[bytes]) -> None:
        s = self.sessions[conv] = Broadcast()
        task = asyncio.ensure_future(self._produce(s, events))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _produce(self, s: Broadcast, events: AsyncIterator[bytes]) -> None:
        flusher = asyncio.ensure_future(self.flusher(s)) if self.linger else None
        try:
            async for ev in events:
                framed = frame_event(len(s.buf), ev)
                s.buf += framed
                s.pending += framed
                if flusher is None and not s.scheduled:
                    s.scheduled = True
                    asyncio.get_running_loop().call_soon(self.send, s)
        finally:
            self.send(s)
            s.done.set_result(None)
            if flusher is not None:
                await flusher

    async def attach(self, conv: str, offset: int, w: asyncio.StreamWriter) -> None:
        s = self.sessions.get(conv)
        if s is None:
            raise NotFound(conv)
        w.write(SSE_HEAD)
        if s.done.done():
            if offset < len(s.buf):
                w.write(b"%x\r\n%s\r\n" % (len(s.buf) - offset, s.buf[offset:]))
            return
        # Everything up to the bytes not yet sent to the live readers, then live.
        sent = bytes(s.buf[offset : len(s.buf) - len(s.pending)])
        if sent:
            w.write(b"%x\r\n%s\r\n" % (len(sent), sent))
        s.readers.append(w.transport)
        # (Shielded: a reader cancelled at shutdown would cancel what it awaits, and the
        # producer's set_result after it would raise.)
        await asyncio.shield(s.done)


class RedisStore:
    """Sessions as Redis Streams: entry fields ``o`` (start offset) and ``d`` (framed event);
    an entry with ``end`` marks the end. Keys expire ``ttl`` seconds after the last write.
    Readers share one mirror per session and process, or (``per_reader``) each tail the
    stream themselves."""

    def __init__(self, url: str, per_reader: bool, ttl: int = 300) -> None:
        import redis.asyncio as aioredis

        # A plain pool: redis-py's BlockingConnectionPool costs ~140 us per checkout here.
        self.redis = aioredis.Redis.from_url(url, max_connections=20000)
        self.per_reader = per_reader
        self.ttl = ttl
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.mirrors: dict[str, Session] = {}
        self._pending: list[tuple[str, dict[str, Any]]] = []
        self._flusher: asyncio.Future[None] | None = None

    @staticmethod
    def _key(conv: str) -> str:
        return "ringcast:stream:" + conv

    async def start(self, conv: str, events: AsyncIterator[bytes]) -> None:
        old = self.tasks.pop(conv, None)
        if old is not None:
            old.cancel()
        stale = self.mirrors.pop(conv, None)
        if stale is not None and stale.task is not None:
            stale.task.cancel()
        key = self._key(conv)
        async with self.redis.pipeline(transaction=True) as p:
            p.delete(key)
            p.xadd(key, {"start": b"1"})
            p.expire(key, self.ttl)
            await p.execute()
        self.tasks[conv] = asyncio.ensure_future(self._produce(conv, key, events))

    async def _produce(self, conv: str, key: str, events: AsyncIterator[bytes]) -> None:
        total = 0
        try:
            async for ev in events:
                framed = frame_event(total, ev)
                self._queue((key, {"o": total, "d": framed}))
                total += len(framed)
        finally:
            self._queue((key, {"end": b"1"}))
            self.tasks.pop(conv, None)

    def _queue(self, entry: tuple[str, dict[str, Any]]) -> None:
        # Every producer's XADDs go out through one pipeline per loop iteration (in order, so
        # a session's end marker follows its events): per-command overhead in redis-py
        # (~100 us) would otherwise dominate.
        self._pending.append(entry)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush())

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            async with self.redis.pipeline(transaction=False) as p:
                for key, fields in batch:
                    p.xadd(key, cast(Any, fields))
                    if "end" in fields:
                        p.expire(key, self.ttl)
                await p.execute()

    async def read(self, conv: str, offset: int) -> AsyncIterator[bytes]:
        key = self._key(conv)
        if self.per_reader:
            if not await self.redis.exists(key):
                raise NotFound(conv)
            s = Session()
            s.task = asyncio.ensure_future(self._mirror(key, s))
            return s.tail(offset)
        mirror = self.mirrors.get(conv)
        if mirror is None:
            if not await self.redis.exists(key):
                raise NotFound(conv)
            mirror = self.mirrors[conv] = Session()
            mirror.task = asyncio.ensure_future(self._mirror(key, mirror))
        return mirror.tail(offset)

    async def _mirror(self, key: str, m: Session) -> None:
        """Copy the stream into ``m`` as it grows, one ``XREAD BLOCK`` loop."""
        last = "0-0"
        try:
            while True:
                # redis-py's reply types are a union over protocol versions; this is RESP2.
                got: Any = await self.redis.xread({key: last}, count=1024, block=15000)
                if not got:
                    if not await self.redis.exists(key):
                        return
                    continue
                for entry_id, fields in got[0][1]:
                    last = entry_id
                    if b"end" in fields:
                        return
                    d = fields.get(b"d")
                    if d is not None:
                        m.buf += d
                m.wake()
        finally:
            m.done = True
            m.task = None
            m.wake()


Store = MemoryStore | BroadcastStore | RedisStore


# --------------------------------------------------------------------------------------------
# HTTP


def _simple(status: int, reason: str, message: str, type_: str) -> bytes:
    body = error_json(status, message, type_)
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


def _stream_id(req: Request) -> str:
    if req.path.startswith("/v1/stream/"):
        from urllib.parse import unquote

        return unquote(req.path[len("/v1/stream/") :])
    return req.query_params().get("conv_id", "")


async def _handle(
    store: Store,
    events: Events,
    linger: float,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        try:
            parser = HeadParser()
            parser.feed(bytearray(head))
            req = parser.request
            assert req is not None  # (a whole head)
            if req.chunked:  # (the load tester never sends one)
                raise HttpError(400, "this baseline takes Content-Length bodies only")
            if req.content_length > MAX_BODY:
                raise HttpError(413, f"request body above {MAX_BODY} bytes")
            req.body = await reader.readexactly(req.content_length)
            if req.method == "POST" and req.path in ("/v1/chat/completions", "/v1/completions"):
                conv = req.headers.get("x-conversation-id") or f"anon-{id(writer)}"
                await store.start(conv, events(req.body))
                offset = 0
            elif req.method == "GET" and (
                req.path == "/v1/stream" or req.path.startswith("/v1/stream/")
            ):
                conv = _stream_id(req)
                offset = parse_offset(req.query_params().get("from"), "'from'")
            else:
                writer.write(_simple(404, "Not Found", "no such route", "not_found_error"))
                return
        except HttpError as e:
            writer.write(_simple(e.status, "Error", e.message, e.type))
            return
        try:
            if isinstance(store, BroadcastStore):
                await store.attach(conv, offset, writer)
            else:
                stream = await store.read(conv, offset)
                writer.write(SSE_HEAD)
                async for data in stream:
                    writer.write(b"%x\r\n%s\r\n" % (len(data), data))
                    await writer.drain()
                    if linger:  # the coalescing of ringcast's --coalesce-ms, when asked
                        await asyncio.sleep(linger)
        except NotFound:
            writer.write(
                _simple(404, "Not Found", "Stream not found or expired", "not_found_error")
            )
            return
        writer.write(b"0\r\n\r\n")
        await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    except RuntimeError:
        # uvloop's word for a write to a transport the client closed meanwhile
        if not writer.transport.is_closing():
            raise
    except asyncio.CancelledError:
        # The server stopping (SIGTERM, SIGINT) cancels the requests it serves; asyncio's
        # stream protocol would print each as an error otherwise.
        return
    finally:
        writer.close()


SIBLING_START_S = 30.0
"""How long ``--procs`` waits for each other process to listen."""
MEMORY_KINDS = ("memory", "asyncio", "memory-broadcast")
"""The kinds whose sessions live in the process: the ones ``--procs`` spreads."""


def _port_is_free(host: str, port: int) -> None:
    """Exits unless a plain bind (no ``SO_REUSEPORT``) of ``port`` works: ``--procs`` joins its
    processes on the port with ``SO_REUSEPORT``, which would also join someone else's listener
    of the same user on it."""
    import socket

    try:
        addrs = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise SystemExit(f"--host {host!r}: {e.strerror}") from None
    for family, kind, proto, _, addr in addrs:
        with socket.socket(family, kind, proto) as probe:
            # as asyncio binds: a connection of an earlier server in TIME_WAIT is no listener
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(addr)
            except OSError as e:
                raise SystemExit(f"--port {port}: {e.strerror}") from None


class Siblings:
    """The other processes of ``--procs``: started once the first listens, each watched
    through a pidfd on the loop (no thread per process), ended with the first. One that ends
    by itself sets ``stop`` and is named in :attr:`lost`."""

    def __init__(self, stop: asyncio.Event) -> None:
        self.stop = stop
        self.kids: list[subprocess.Popen[str]] = []
        self.pidfds: list[int] = []
        self.lost: list[int] = []

    async def start(self, argv: list[str], port: int, n: int) -> None:
        """``n`` processes of ``argv`` on ``port``, each once it listens (at most
        SIBLING_START_S each); SystemExit if one does not, or ``stop`` is set meanwhile."""
        loop = asyncio.get_running_loop()
        for k in range(1, n + 1):
            cmd = [sys.executable, __file__, *argv, "--port", str(port)]
            cmd += ["--sibling", f"{k}:{os.getpid()}"]
            # A session of its own: a terminal's Ctrl-C reaches the first process only, which
            # ends the others (they would print tracebacks mid-import otherwise).
            kid = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
            self.kids.append(kid)
            assert kid.stdout is not None
            line = loop.run_in_executor(None, kid.stdout.readline)
            stopped = asyncio.ensure_future(self.stop.wait())
            await asyncio.wait(
                {line, stopped}, timeout=SIBLING_START_S, return_when=asyncio.FIRST_COMPLETED
            )
            stopped.cancel()
            if self.lost:
                raise SystemExit(f"process {self.lost[0]} of --procs ended by itself: stopped")
            if self.stop.is_set():
                raise SystemExit("stopped before every process of --procs listened")
            said = line.result() if line.done() else f"nothing within {SIBLING_START_S:g} s"
            if "listening on" not in said:
                raise SystemExit(f"process {k} of --procs did not start: {said!r}")
            fd = os.pidfd_open(kid.pid)
            self.pidfds.append(fd)
            loop.add_reader(fd, self._ended, k)

    def _ended(self, k: int) -> None:
        asyncio.get_running_loop().remove_reader(self.pidfds[k - 1])
        if not self.stop.is_set():
            self.lost.append(k)
            self.stop.set()

    def end(self, sig: int = signal.SIGTERM) -> None:
        """Signals every one still running and waits for them, 5 s for all together; then
        SIGKILL for any left."""
        loop = asyncio.get_running_loop()
        for fd in self.pidfds:
            loop.remove_reader(fd)
            os.close(fd)
        self.pidfds = []
        for kid in self.kids:
            if kid.poll() is None:
                kid.send_signal(sig)
        deadline = time.monotonic() + 5.0
        for kid in self.kids:
            try:
                kid.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                kid.kill()
                kid.wait()
            if kid.stdout is not None:
                kid.stdout.close()


async def serve(
    kind: str,
    host: str,
    port: int,
    events: Events,
    redis_url: str,
    linger: float,
    reuse_port: bool = False,
    siblings: tuple[list[str], int] = ([], 0),
) -> int:
    """Serves until SIGTERM or SIGINT (0). With ``siblings`` (this command's other arguments
    and a count), that many more processes serve the same port once this one listens
    (``reuse_port``); it prints its ``listening`` line when they all do, and stops (1) if
    one of them ends before it is told to."""
    store: Store
    if kind in ("memory", "asyncio"):
        store = MemoryStore()
    elif kind == "memory-broadcast":
        store = BroadcastStore(linger)
    else:
        store = RedisStore(redis_url, per_reader=kind == "redis-per-reader")
    reader_linger = 0.0 if kind == "memory-broadcast" else linger
    if siblings[1] and port:
        _port_is_free(host, port)
    try:
        server = await asyncio.start_server(
            lambda r, w: _handle(store, events, reader_linger, r, w),
            host,
            port,
            backlog=4096,
            limit=1 << 20,
            reuse_port=reuse_port,
        )
    except OSError as e:  # a host that does not resolve, a port taken
        raise SystemExit(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    others = Siblings(stop)
    async with server:
        if siblings[1] and len(server.sockets) != 1:
            raise SystemExit(
                f"--procs needs a --host of one address; {host!r} gave {len(server.sockets)}"
            )
        addr = server.sockets[0].getsockname()
        started = False
        try:
            await others.start(siblings[0], addr[1], siblings[1])
            started = True
            print(f"ringcast baseline {kind} listening on http://{addr[0]}:{addr[1]}", flush=True)
            await stop.wait()
        finally:
            others.end(signal.SIGTERM if started else signal.SIGKILL)
    if others.lost:
        print(f"process {others.lost[0]} of --procs ended by itself: stopped", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python bench/baselines.py",
        description="Baseline SSE fan-out servers (in memory, in Redis Streams) with the HTTP "
        "API of 'ringcast serve' that the benchmarks use.",
    )
    ap.add_argument("kind", choices=KINDS)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8101, help="0 = pick a free one")
    ap.add_argument("--replay", help="answer requests from this trace (default: timestamps)")
    ap.add_argument("--speed", default="1", help="with --replay: factor over recorded pace, or max")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    ap.add_argument(
        "--coalesce-ms",
        type=float,
        default=0.0,
        help="each reader waits this long after a write before the next (broadcast: one "
        "flush per this long); default 0: written as a hand-written server does",
    )
    ap.add_argument(
        "--procs",
        type=int,
        default=1,
        help="serve from this many processes on one port (SO_REUSEPORT: the kernel spreads "
        "the connections; Linux), each with sessions of its own, so only for streams read by "
        "their POST alone (a GET may land in a process without its stream); the in-memory "
        "kinds, 1 to 64",
    )
    # How --procs starts the others: K:PID, the process's number and its first one's pid.
    ap.add_argument("--sibling", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not 1 <= args.procs <= 64:
        ap.error("--procs must be between 1 and 64")
    if args.procs > 1 and args.kind not in MEMORY_KINDS:
        ap.error(f"--procs spreads the in-memory kinds only ({', '.join(MEMORY_KINDS)})")
    if args.procs > 1 and args.replay:
        ap.error("--procs serves the timestamps source only, not --replay")
    if args.sibling:
        if not re.fullmatch(r"\d+:\d+", args.sibling):
            ap.error("--sibling is K:PID (how --procs starts its other processes)")
        # Ends with the first process, even a kill -9'd one (PR_SET_PDEATHSIG).
        die_with_parent(int(args.sibling.split(":")[1]))
    events: Events
    if args.replay:
        source = ReplaySource(args.replay, parse_speed(args.speed))
        events = source.events
    else:
        events = timestamp_events
    import uvloop

    same = [args.kind, "--host", args.host, "--coalesce-ms", str(args.coalesce_ms)]
    return uvloop.run(
        serve(
            args.kind,
            args.host,
            args.port,
            events,
            args.redis_url,
            args.coalesce_ms / 1000,
            reuse_port=bool(args.sibling) or args.procs > 1,
            siblings=(same, args.procs - 1),
        )
    )


if __name__ == "__main__":
    sys.exit(main())
