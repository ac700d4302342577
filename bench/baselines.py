"""Baseline servers for comparisons: the same HTTP API as ``ringcast serve`` (the parts a
replay uses), built the way one would without ringcast.

- ``asyncio``: one process, sessions are ``bytearray``s in a dict, readers wait on an
  ``asyncio.Condition``-like future per session. The simplest correct design; bound to one core.
- ``redis``: one HTTP process, sessions are Redis Streams (one entry per SSE event, carrying
  its start offset). All producers' ``XADD``s go out pipelined together; for each session
  with readers in the process, one ``XREAD BLOCK`` loop mirrors the stream into memory and
  wakes the local readers (Redis round trips per event per process, not per reader). The
  usual way to make streams resumable across processes and machines.

Both frame events exactly like ringcast (``id: <offset>`` lines, :func:`ringcast.wire.sse.
frame_event`), so a reader receives the same bytes from all three and the replay can check them.

Run: ``python bench/baselines.py asyncio --port 8101 --replay trace.jsonl [--speed max]``
or ``python bench/baselines.py redis --redis-url redis://127.0.0.1:6379/0 ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any, cast

from ringcast.trace import ReplaySource, parse_speed
from ringcast.wire.openai import error_json
from ringcast.wire.sse import frame_event

__all__ = ["MemoryStore", "RedisStore", "main", "serve"]

_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
)
_MAX_BODY = 16 * 1024 * 1024


class NotFound(Exception):
    pass


class _MemSession:
    __slots__ = ("buf", "done", "task", "waiter")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.done = False
        self.task: asyncio.Task[None] | None = None
        self.waiter: asyncio.Future[None] | None = None

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)
        self.waiter = None

    async def wait(self) -> None:
        if self.waiter is None:
            self.waiter = asyncio.get_running_loop().create_future()
        await self.waiter


async def _tail(s: _MemSession, pos: int) -> AsyncIterator[bytes]:
    """Every byte of ``s`` from ``pos`` on, as it arrives, until the session is done."""
    while True:
        if pos < len(s.buf):
            chunk = bytes(s.buf[pos:])
            pos += len(chunk)
            yield chunk
        elif s.done:
            return
        else:
            await s.wait()


class MemoryStore:
    """Every session's bytes in this process's memory."""

    def __init__(self) -> None:
        self.sessions: dict[str, _MemSession] = {}

    async def start(self, conv: str, events: AsyncIterator[bytes]) -> None:
        old = self.sessions.get(conv)
        if old is not None and old.task is not None:
            old.task.cancel()
        s = self.sessions[conv] = _MemSession()
        s.task = asyncio.ensure_future(self._produce(s, events))

    async def _produce(self, s: _MemSession, events: AsyncIterator[bytes]) -> None:
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
        return _tail(s, offset)


class RedisStore:
    """Sessions as Redis Streams: entry fields ``o`` (start offset) and ``d`` (framed event);
    an entry with ``end`` marks the end. Keys expire ``ttl`` seconds after the last write."""

    def __init__(self, url: str, ttl: int = 300) -> None:
        import redis.asyncio as aioredis

        # A plain pool: redis-py's BlockingConnectionPool costs ~140 us per checkout here.
        self.redis = aioredis.Redis.from_url(url, max_connections=20000)
        self.ttl = ttl
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.mirrors: dict[str, _MemSession] = {}
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
        mirror = self.mirrors.get(conv)
        if mirror is None:
            if not await self.redis.exists(key):
                raise NotFound(conv)
            mirror = self.mirrors[conv] = _MemSession()
            mirror.task = asyncio.ensure_future(self._mirror(conv, key, mirror))
        return _tail(mirror, offset)

    async def _mirror(self, conv: str, key: str, m: _MemSession) -> None:
        """Copy the stream into this process as it grows: one XREAD BLOCK loop per session,
        however many local readers it has."""
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
            # A finished mirror stays for later readers until the session is replaced.
            if self.mirrors.get(conv) is not m:
                m.buf.clear()


Store = MemoryStore | RedisStore


async def _write_chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(b"%x\r\n%b\r\n" % (len(data), data))
    await writer.drain()


def _simple(status: int, reason: str, body: bytes) -> bytes:
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


async def _handle(
    store: Store, source: ReplaySource, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            if k:
                headers[k.strip().lower()] = v.strip()
        n = int(headers.get("content-length", "0") or 0)
        if n > _MAX_BODY:
            writer.write(_simple(413, "Payload Too Large", error_json(413, "too large", "x")))
            return
        body = await reader.readexactly(n) if n else b""
        url = urllib.parse.urlsplit(target)
        query = urllib.parse.parse_qs(url.query)
        if method == "POST" and url.path in ("/v1/chat/completions", "/v1/completions"):
            conv = headers.get("x-conversation-id") or f"anon-{id(writer)}"
            await store.start(conv, source.events(body))
            stream = await store.read(conv, 0)
        elif method == "GET" and url.path.startswith("/v1/stream"):
            conv = url.path[len("/v1/stream/") :] if url.path.startswith("/v1/stream/") else ""
            conv = urllib.parse.unquote(conv) or query.get("conv_id", [""])[0]
            frm = query.get("from", ["0"])[0] or "0"
            if not frm.isdigit():
                msg = error_json(400, "from must be a non-negative integer", "invalid_request")
                writer.write(_simple(400, "Bad Request", msg))
                return
            try:
                stream = await store.read(conv, int(frm))
            except NotFound:
                msg = error_json(404, "Stream not found or expired", "not_found_error")
                writer.write(_simple(404, "Not Found", msg))
                return
        else:
            writer.write(_simple(404, "Not Found", error_json(404, "no such route", "not_found")))
            return
        writer.write(_SSE_HEAD)
        async for chunk in stream:
            await _write_chunk(writer, chunk)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def serve(kind: str, host: str, port: int, source: ReplaySource, redis_url: str) -> None:
    store: Store = MemoryStore() if kind == "asyncio" else RedisStore(redis_url)
    server = await asyncio.start_server(
        lambda r, w: _handle(store, source, r, w), host, port, backlog=4096, limit=1 << 20
    )
    addr = server.sockets[0].getsockname()
    print(f"ringcast baseline {kind} listening on http://{addr[0]}:{addr[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python bench/baselines.py",
        description="Baseline SSE fan-out servers (in-memory asyncio, Redis Streams) that "
        "replay a trace through the same HTTP API as 'ringcast serve --replay'.",
    )
    ap.add_argument("kind", choices=["asyncio", "redis"])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8101)
    ap.add_argument("--replay", required=True, help="trace file to answer requests from")
    ap.add_argument("--speed", default="1", help="factor over recorded pace, or 'max'")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = ap.parse_args(argv)
    source = ReplaySource(args.replay, parse_speed(args.speed))
    import uvloop

    uvloop.run(serve(args.kind, args.host, args.port, source, args.redis_url))
    return 0


if __name__ == "__main__":
    sys.exit(main())
