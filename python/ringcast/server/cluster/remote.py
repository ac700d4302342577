"""The reading node's side: sessions that this node does not hold, answered from Redis.

:class:`RemoteStore` (one per HTTP process) looks sessions up, lists them, opens readers and
cancels. A :class:`RemoteReader` yields exactly the bytes a reader on the producing node would
(every entry is a verbatim slice of the ring), from any offset: behind the live edge it reads
entries itself (``XREVRANGE`` finds the entry holding the offset, ``XRANGE`` pages on); at the
edge it waits on the session's one :class:`RemoteTail` in this process, which reads new entries
once (``XREAD BLOCK``) for every reader of the session, like the local fan-out pump.

A running session whose producing node's lease is gone (or belongs to another run of that
node) is ended here: the ``END`` script marks it ``failed`` / ``node_lost`` (only if it is still
that node instance's), so its readers get every mirrored byte and then a ``node_lost`` event,
and lookups show it ``failed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ringcast import SessionNotFound
from ringcast.server.cluster import keys
from ringcast.server.cluster.client import Client, redis_errors
from ringcast.server.cluster.mirror import END, FORGET, send_control
from ringcast.server.store import offset_lost, session_ended

log = logging.getLogger("ringcast.server.cluster.remote")
T = TypeVar("T")

TAIL_BLOCK_MS = 200
"""How long a tail's ``XREAD`` blocks; on every silent return it checks the session's state
and its node's lease, so a lost node is noticed within its lease plus this."""
TAILED_MS = 3000
"""A tail marks its session as tailed (``SessionKeys.tailed``) for this long, renewed every
TAILED_RENEW_S while it runs: the producing node's mirror sends a tailed session in its own
phase of the window (see ``Mirror.flush_loop``), the others all at once."""
TAILED_RENEW_S = 1.0
TAIL_KEEP = 1 << 20
"""Bytes a tail keeps behind its edge for readers a little behind; older ones read entries."""
PAGE_ENTRIES = 64
RETRY_S = 0.2
"""Pause before a read that failed on a Redis error is tried again."""
LEASE_CACHE_S = 0.1
LOST_CONFIRM_S = 0.5
"""A node whose lease is gone is taken for lost only if it is still gone this much later."""
MISSING_GRACE_S = 5.0
"""How long a tail waits for a running session that vanished from Redis (a Redis restarted
empty) to be claimed again by its node before it takes the node for lost."""
VISIBLE = ("running", "done", "failed")
"""States a lookup shows; a cancelled session is gone, as it is locally."""


@dataclass
class RemoteInfo:
    conversation_id: str
    owner: str
    state: str
    end: str
    total_bytes: int
    first_available: int
    started_at: float
    completed_at: float
    segment_epoch: int
    node: str
    instance: str
    epoch: int
    """The session's epoch in Redis: bumped by every claim (a new producer, anywhere)."""
    slot: int = 0
    """With ``generation``, the incarnation (as a local session's slot and generation): a
    negative number from the key digest, so it never equals a local slot."""
    readers: int = 0
    """Readers on other nodes are not counted."""

    def __post_init__(self) -> None:
        self.slot = -1 - int(keys.digest(self.owner + chr(0) + self.conversation_id, 12), 16)

    @property
    def generation(self) -> int:
        return self.epoch

    @property
    def is_done(self) -> bool:
        return self.state != "running"


def _s(v: Any) -> str:
    return v.decode("utf-8", "surrogatepass") if isinstance(v, bytes) else str(v)


def parse_info(h: dict[Any, Any]) -> RemoteInfo | None:
    if not h or b"conv" not in h:
        return None

    def g(f: bytes, d: str = "0") -> str:
        return _s(h.get(f, d))

    return RemoteInfo(
        conversation_id=g(b"conv", ""),
        owner=g(b"owner", ""),
        state=g(b"state", "running"),
        end=g(b"end", ""),
        total_bytes=int(g(b"total")),
        first_available=int(g(b"first")),
        started_at=float(g(b"created")),
        completed_at=float(g(b"completed")),
        segment_epoch=int(g(b"segepoch")),
        node=g(b"node", ""),
        instance=g(b"inst", ""),
        epoch=int(g(b"epoch")),
    )


@dataclass
class RemoteStats:
    redis_errors: int = 0
    opened: int = 0
    tails: int = 0
    nodes_lost: int = 0


class RemoteStore:
    def __init__(self, client: Client, node_id: str, ttl_ms: int) -> None:
        self.client = client
        self.node_id = node_id
        self.ttl_ms = ttl_ms
        self.tails: dict[str, RemoteTail] = {}
        self.live: dict[str, RemoteTail] = {}
        """Per session (its keys' base), its newest tail in this process."""
        self.inflight: dict[tuple[str, ...], asyncio.Future[Any]] = {}
        """Redis reads about to be sent, which other callers may share (:meth:`shared`)."""
        self.leases: dict[str, tuple[float, str | None]] = {}
        self.suspects: dict[tuple[str, str], float] = {}
        """Node instances whose lease was found gone, and since when (monotonic)."""
        self.stats = RemoteStats()

    # -- lookups

    async def _lease(self, node: str) -> str | None:
        now = time.monotonic()
        hit = self.leases.get(node)
        if hit is not None and now - hit[0] < LEASE_CACHE_S:
            return hit[1]
        v = await self.client.get(keys.lease_key(node))
        value = _s(v) if v is not None else None
        self.leases[node] = (now, value)
        return value

    async def _settle(self, k: keys.SessionKeys, info: RemoteInfo) -> RemoteInfo:
        """A running session whose node lost its lease is ended ``node_lost`` (atomically, and
        only if it is still that node instance's), then read again."""
        suspect = (info.node, info.instance)
        if info.state != "running" or await self._lease(info.node) == info.instance:
            self.suspects.pop(suspect, None)
            return info
        # Seen gone once: confirm a moment later. Right after a Redis pause (or a restart
        # that lost the keys) the node's renewal may simply not have landed yet.
        now = time.monotonic()
        if now - self.suspects.setdefault(suspect, now) < LOST_CONFIRM_S:
            return info
        del self.suspects[suspect]
        res = await END(
            self.client,
            (k.meta, k.base),
            (f"{time.time():.3f}", self.ttl_ms, "node_lost", "failed", info.node, info.instance),
        )
        if int(res[0]) == 1:
            self.stats.nodes_lost += 1
            log.warning("a stream's producing node lost its lease; the stream ends node_lost")
        again = parse_info(await self.client.hgetall(k.meta))
        return again if again is not None else info

    async def shared(self, key: tuple[str, ...], make: Callable[[], Awaitable[T]]) -> T:
        """``await make()``, shared with the callers that ask for the same ``key`` before it
        is sent (in the same turn of the event loop): a burst of readers opening one stream
        (a page of clients sent to this node at once) costs Redis one lookup and one page
        read, not one per reader. A caller never gets an answer that was asked before it
        arrived: once the call is on its way, the next caller makes its own."""
        fut = self.inflight.get(key)
        if fut is None:
            fut = self.inflight[key] = asyncio.ensure_future(self._send(key, make))
            fut.add_done_callback(_retrieved)
        return await asyncio.shield(fut)

    async def _send(self, key: tuple[str, ...], make: Callable[[], Awaitable[T]]) -> T:
        if self.inflight.get(key) is asyncio.current_task():
            del self.inflight[key]  # sent from here on: no more joiners
        return await make()

    async def info(self, conv: str, owner: str) -> RemoteInfo | None:
        """The session as Redis has it (None if unknown there or cancelled)."""
        return await self.shared(("info", conv, owner), lambda: self._info(conv, owner))

    async def _info(self, conv: str, owner: str) -> RemoteInfo | None:
        k = keys.SessionKeys(conv, owner)
        info = parse_info(await self.client.hgetall(k.meta))
        if info is None or info.owner != owner or info.conversation_id != conv:
            return None
        info = await self._settle(k, info)
        return info if info.state in VISIBLE else None

    async def _infos(self, owner: str, convs: list[str]) -> list[RemoteInfo]:
        if not convs:
            return []
        pipe = self.client.pipeline(transaction=False)
        ks = [keys.SessionKeys(c, owner) for c in convs]
        for k in ks:
            pipe.hgetall(k.meta)
        raw = await pipe.execute()
        out: list[RemoteInfo] = []
        stale: list[str] = []
        for conv, k, h in zip(convs, ks, raw, strict=True):
            info = parse_info(h)
            if info is None:
                stale.append(conv)
                continue
            if info.owner != owner or info.conversation_id != conv:
                continue
            info = await self._settle(k, info)
            if info.state in VISIBLE:
                out.append(info)
        if stale:
            await self._drop_stale(owner, stale)
        return out

    async def _drop_stale(self, owner: str, stale: list[str]) -> None:
        """Drops from the owner's index the ids whose session this lookup did not find
        (expired ones leave their id there). A mirror may have claimed one of them since
        (a new session of that id: its id enters the index once Redis holds it, which may
        be just before this removal), so each one found in Redis after the removal is put
        back: whichever way the two interleave, the index names every session Redis holds."""
        index = keys.owner_index(owner)
        await self.client.zrem(index, *stale)
        pipe = self.client.pipeline(transaction=False)
        for conv in stale:
            pipe.exists(keys.SessionKeys(conv, owner).meta)
        back = [c for c, n in zip(stale, await pipe.execute(), strict=True) if n]
        if back:
            await self.client.zadd(index, dict.fromkeys(back, 0))

    async def sessions(self, owner: str) -> list[RemoteInfo]:
        convs = [_s(c) for c in await self.client.zrange(keys.owner_index(owner), 0, -1)]
        return await self._infos(owner, convs)

    async def lookup_prefix(self, conv: str, owner: str) -> list[RemoteInfo]:
        """The session ``conv`` and every ``conv::…`` (llama-server's lookup rule)."""
        prefix = (conv + "::").encode("utf-8", "surrogatepass")
        index = keys.owner_index(owner)
        found = await self.client.zrangebylex(index, b"[" + prefix, b"[" + prefix + b"\xff")
        return await self._infos(owner, [conv, *(_s(c) for c in found)])

    # -- control

    async def cancel(self, conv: str, owner: str) -> bool:
        """DELETE: a running session is ended ``cancelled`` here and its producing node told to
        stop it; a finished one is removed. True if Redis had it."""
        k = keys.SessionKeys(conv, owner)
        info = parse_info(await self.client.hgetall(k.meta))
        if info is None or info.owner != owner or info.conversation_id != conv:
            return False
        res = await END(
            self.client,
            (k.meta, k.base),
            (f"{time.time():.3f}", min(self.ttl_ms, 60_000), "cancelled", "cancelled", "", ""),
        )
        if int(res[0]) == 1:
            node, epoch = _s(res[1]), int(res[3])
            if node != self.node_id:
                await send_control(self.client, node, "cancel", conv, owner, epoch)
        else:
            await FORGET(self.client, (k.meta, k.base), ())
        await self.client.zrem(k.owner_index, conv)
        return True

    # -- reading

    async def open(
        self, conv: str, owner: str, offset: int, info: RemoteInfo | None = None
    ) -> RemoteReader:
        """A reader at ``offset``; raises ``OffsetLost`` if it is not available,
        ``SessionNotFound`` if Redis has no such session. The caller checks ``offset`` against
        a finished session's total (416). With ``info`` (the incarnation another reader of
        this process opened), no round trip: a second reader of the same incarnation."""
        k = keys.SessionKeys(conv, owner)
        if info is not None:
            return RemoteReader(self, k, info, offset)
        tail = self.live.get(k.base)
        if tail is not None and tail.reason is None:
            # A running stream that this process tails already (the same keys: the same
            # owner and id): its incarnation is the tail's, which an end, a replace or a
            # lost node would have ended; and at or past what the tail holds, the reader
            # reads from it (a gap there is the tail's to report). No round trip.
            reader = RemoteReader(self, k, tail.info, offset)
            if offset < tail.base:
                await reader.fetch()
            self.stats.opened += 1
            return reader
        info = await self.info(conv, owner)
        if info is None:
            raise SessionNotFound(conv)
        if offset < info.first_available:
            raise offset_lost(info.first_available)
        reader = RemoteReader(self, k, info, offset)
        if not (info.is_done and offset > info.total_bytes):
            # A gap or a trim at the offset is a 410 now, not an error event later.
            await reader.fetch()
        self.stats.opened += 1
        return reader

    def tail(self, k: keys.SessionKeys, info: RemoteInfo) -> RemoteTail:
        name = k.stream(info.epoch)
        tail = self.tails.get(name)
        if tail is None:
            tail = self.tails[name] = RemoteTail(self, k, info)
            self.live[k.base] = tail
            self.stats.tails += 1
        tail.refs += 1
        return tail

    def release(self, tail: RemoteTail) -> None:
        tail.refs -= 1
        if tail.refs == 0:
            tail.task.cancel()
            if self.tails.get(tail.stream) is tail:
                del self.tails[tail.stream]
            if self.live.get(tail.keys.base) is tail:
                del self.live[tail.keys.base]


def _walk(entries: list[Any], offset: int) -> tuple[list[bytes], int, str | None]:
    """Bytes from ``offset`` in ``entries`` (ascending), stopping at a gap or an end marker:
    (chunks, offset after them, end marker reason or None). Raises ``OffsetLost`` if
    ``offset`` itself is in a gap or before the first entry."""
    out: list[bytes] = []
    for entry_id, fields in entries:
        start = keys.entry_start(entry_id)
        if b"d" in fields:
            data = fields[b"d"]
            if start + len(data) <= offset:
                continue
            if start > offset:
                if out:
                    break
                raise offset_lost(start)
            out.append(data[offset - start :] if offset > start else data)
            offset = start + len(data)
        elif b"g" in fields:
            end = int(fields[b"g"])
            if end <= offset:
                continue
            if out:
                break
            raise offset_lost(end)
        elif b"e" in fields:
            return out, offset, _s(fields[b"e"])
    return out, offset, None


class RemoteReader:
    """A reader of a session held in Redis, with the surface of ``ringcast.Reader`` that the
    server uses (``read_nowait``, ``aread``, ``close``, ``offset``, the incarnation)."""

    def __init__(
        self, store: RemoteStore, k: keys.SessionKeys, info: RemoteInfo, offset: int
    ) -> None:
        self.store = store
        self.keys = k
        self.info = info
        self.stream = k.stream(info.epoch)
        self.offset = offset
        self.pending = b""
        """Bytes read from entries at ``offset``, not yet returned."""
        self.pending_end: str | None = None
        """The end marker right after ``pending``."""
        self._tail: RemoteTail | None = None

    @property
    def conversation_id(self) -> str:
        return self.info.conversation_id

    @property
    def slot(self) -> int:
        return self.info.slot

    @property
    def generation(self) -> int:
        return self.info.generation

    @property
    def epoch(self) -> int:
        """The producing node's segment epoch, so ``X-Ringcast-Epoch`` is the same there."""
        return self.info.segment_epoch

    async def fetch(self) -> None:
        """Read entries from ``offset`` into ``pending`` (one page; shared by the readers of
        this process that fetch the same offset of the same stream at the same time)."""
        key = ("page", self.stream, str(self.offset))
        self.pending, self.pending_end = await self.store.shared(key, self._page)

    async def _page(self) -> tuple[bytes, str | None]:
        c, offset = self.store.client, self.offset
        back = await c.xrevrange(self.stream, f"{offset}-1", "-", count=1)
        start = _s(back[0][0]) if back else "-"
        entries: Any = await c.xrange(self.stream, start, "+", count=PAGE_ENTRIES)
        chunks, _end, reason = _walk(entries, offset)
        return b"".join(chunks), reason

    def _end(self, reason: str) -> bytes:
        if reason in ("done", "failed"):
            return b""
        raise session_ended(reason)

    def read_nowait(self, max_bytes: int = 1 << 20) -> bytes | None:
        """Bytes at ``offset`` that are here now, ``b""`` at the end of a finished stream,
        None if they must be fetched or waited for. Raises ``SessionEnded`` for an ending
        that is not part of the stream and ``OffsetLost`` at a gap or a trim."""
        if self.pending:
            data = self.pending[:max_bytes]
            self.pending = self.pending[len(data) :]
            self.offset += len(data)
            return data
        if self.pending_end is not None:
            return self._end(self.pending_end)
        got = self._attach().take(self.offset, max_bytes)
        if got is None:
            return None
        data, reason = got
        if data:
            self.offset += len(data)
            return data
        return self._end(reason) if reason is not None else None

    async def aread(self, max_bytes: int = 1 << 20) -> bytes:
        """The next bytes; ``b""`` once a finished stream is read to its end. Redis trouble
        is waited out (the client sees a pause, as in a slow stream), never raised."""
        while True:
            data = self.read_nowait(max_bytes)
            if data is not None:
                return data
            tail = self._attach()
            if self.offset >= tail.base:
                await tail.wait()
                continue
            try:
                await self.fetch()  # behind what the tail holds: read entries
            except redis_errors() as e:
                self.store.stats.redis_errors += 1
                log.warning("remote read: Redis error (%s); retrying", e)
                await asyncio.sleep(RETRY_S)

    def _attach(self) -> RemoteTail:
        if self._tail is None:
            self._tail = self.store.tail(self.keys, self.info)
        return self._tail

    def close(self) -> None:
        if self._tail is not None:
            self.store.release(self._tail)
            self._tail = None


class RemoteTail:
    """The live edge of one session's Redis stream in this process, read once for all its
    readers."""

    def __init__(self, store: RemoteStore, k: keys.SessionKeys, info: RemoteInfo) -> None:
        self.store = store
        self.keys = k
        self.info = info
        self.stream = k.stream(info.epoch)
        self.base = self.end = info.total_bytes
        self.buf = bytearray()
        self.gaps: list[tuple[int, int]] = []
        self.reason: str | None = info.end or info.state if info.is_done else None
        self.refs = 0
        self.missing_since = 0.0
        self.changed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.task = asyncio.get_running_loop().create_task(self.run())

    def take(self, offset: int, max_bytes: int) -> tuple[bytes, str | None] | None:
        """(bytes at ``offset``, end reason if nothing more comes) or None if ``offset`` is
        behind what this tail holds (the reader reads entries itself)."""
        if offset < self.base:
            return None
        for a, b in self.gaps:
            if a <= offset < b:
                raise offset_lost(b)
        if offset < self.end:
            i = offset - self.base
            return bytes(self.buf[i : i + max_bytes]), None
        return b"", self.reason

    async def wait(self) -> None:
        await asyncio.shield(self.changed)

    def _wake(self) -> None:
        if not self.changed.done():
            self.changed.set_result(None)
        self.changed = asyncio.get_running_loop().create_future()

    def _finish(self, reason: str) -> None:
        self.reason = reason
        self._wake()

    async def run(self) -> None:
        c = self.store.client
        last = f"{self.end}-0"

        def take(res: Any) -> None:
            nonlocal last
            for _name, entries in res or []:
                for entry_id, fields in entries:
                    last = _s(entry_id)
                    self._entry(keys.entry_start(entry_id), fields)

        loop = asyncio.get_running_loop()
        marked = 0.0
        while self.reason is None:
            try:
                if loop.time() >= marked:
                    await c.set(self.keys.tailed, b"1", px=TAILED_MS)
                    marked = loop.time() + TAILED_RENEW_S
                res = await c.xread({self.stream: last}, count=256, block=TAIL_BLOCK_MS)
                if res:
                    take(res)
                    self._wake()
                    continue
                final = await self._check()
                if final is None:
                    continue
                # Ended: what was appended before the end is in the stream; read it first.
                while self.reason is None:
                    res = await c.xread({self.stream: last}, count=256)
                    if not res:
                        break
                    take(res)
                if self.reason is None:
                    self._finish(final)
                self._wake()
            except asyncio.CancelledError:
                raise
            except redis_errors() as e:
                self.store.stats.redis_errors += 1
                log.warning("remote tail: Redis error (%s); retrying", e)
                await asyncio.sleep(RETRY_S)

    def _entry(self, start: int, fields: dict[bytes, bytes]) -> None:
        if b"e" in fields:
            self._finish(_s(fields[b"e"]))
            return
        if b"g" in fields:
            end = int(fields[b"g"])
            self.gaps.append((start, end))
            self.buf.clear()
            self.base = self.end = end
            return
        data = fields[b"d"]
        if start != self.end:
            # Never expected (entries are contiguous); readers re-read entries.
            self.buf.clear()
            self.base = start
        self.buf += data
        self.end = start + len(data)
        if len(self.buf) > TAIL_KEEP:
            drop = len(self.buf) - TAIL_KEEP
            del self.buf[:drop]
            self.base += drop

    async def _check(self) -> str | None:
        """Silence: is the session still this epoch, running, on a node that holds its lease?
        The reason it ended, or None while it runs."""
        info = parse_info(await self.store.client.hgetall(self.keys.meta))
        if info is None:
            # Gone from Redis while running: a Redis that restarted empty. The producing
            # node's mirror claims it again (same epoch) within a window of reconnecting,
            # unless that node is gone too.
            now = time.monotonic()
            self.missing_since = self.missing_since or now
            if now - self.missing_since < MISSING_GRACE_S:
                return None
            alive = await self.store._lease(self.info.node) == self.info.instance
            return None if alive else "node_lost"
        self.missing_since = 0.0
        if info.epoch != self.info.epoch:
            return "replaced"
        if info.state == "running":
            info = await self.store._settle(self.keys, info)
        if info.state == "running":
            return None
        return info.end or info.state


def _retrieved(fut: asyncio.Future[Any]) -> None:
    """A shared read's outcome is taken even if all its callers went away meanwhile."""
    if not fut.cancelled():
        fut.exception()


async def close_store(store: RemoteStore) -> None:
    for tail in list(store.tails.values()):
        tail.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await tail.task
    store.tails.clear()
    store.live.clear()
