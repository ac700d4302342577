"""Durable Streams across nodes: a generic stream's metadata beside its bytes in Redis.

A generic stream (``/ds/v1/stream/<name>``) is a session of the node that created it; the
mirror copies its bytes to Redis like any session's. What the ring does not hold (content
type, TTL or expiry, when it was last used, a deletion that forks outlive) is in that node's
SQLite file (:mod:`ringcast.server.durable_meta`); the owning node's HTTP processes copy it
here, as ``ds.*`` fields of the session's own hash (``rc:{…}:m``: the same key, so the same
hash slot, and it expires, is removed and is re-created with the session's keys). Another
node reads it to serve catch-up, long-poll, SSE and HEAD from the mirrored bytes, and to
learn where to forward what only the owner can do: appends, closes, deletes, and creates or
forks at the stream's name (the owner's ``--advertise-url``, ``ds.url``).

**Binding.** ``ds.src`` names the incarnation the fields describe, in the mirror's own
``src`` format (node, segment epoch, slot, generation): fields whose ``ds.src`` is not the
``src`` the mirror claimed describe another incarnation, and are not used. The fields are
written when the owner creates the stream, before the mirror's first window claims it;
:meth:`ClusterPeers.lookup` waits up to :data:`CLAIM_WAIT_S` for that claim.

**What the owner acknowledged.** ``ds.acked`` is ``<total>:<closed>:<src>``: the bytes (and
closure) the owning node had answered a writer with when it last did (the create's 201, each
append's answer), written before that answer. The mirror's ``total`` follows within a flush
window; until then another node would read a shorter stream and call it up to date (an empty
stream right after a create with a body, whose first window the mirror may claim with no
bytes yet). So :meth:`ClusterPeers.lookup` for a read also waits, within the same
:data:`CLAIM_WAIT_S`, until Redis holds what was acknowledged, and past that hands the
acknowledged total on (:attr:`RemoteStream.acked`): the reads there serve what Redis holds
and do not call it up to date (``ringcast.server.durable``). A write is forwarded to the
owner, which holds every byte: its lookup does not wait.

Producer state (``Producer-Id`` epochs and sequences, ``Stream-Seq``) is not copied: every
append runs on the owning node, which alone validates it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from ringcast.server.cluster import keys
from ringcast.server.cluster.client import Client, Script, is_noscript, redis_errors
from ringcast.server.cluster.mirror import mirror_config
from ringcast.server.cluster.remote import RemoteStore
from ringcast.server.cluster.scripts import ACK as ACK_SOURCE
from ringcast.server.cluster.store import CLAIM_POLL_S, CLAIM_WAIT_S, ClusterStore
from ringcast.server.config import ServeConfig
from ringcast.server.durable_meta import RemoteStream, StreamMeta, StreamPeers
from ringcast.server.store import StoreUnavailable, StreamStore

log = logging.getLogger("ringcast.server.cluster.ds")

ACK = Script(ACK_SOURCE)

TOMBSTONE_MS = 60_000
"""How long other nodes answer 410 for a deleted stream that forks outlive."""
PUBLISH_TIMEOUT_S = 1.0
"""A create or an update waits at most this long for Redis before it answers anyway."""

F_SRC, F_NODE, F_URL = b"ds.src", b"ds.node", b"ds.url"
F_CT, F_TTL, F_EXP, F_EXPTS = b"ds.ct", b"ds.ttl", b"ds.exp", b"ds.expts"
F_TOUCHED, F_DELETED = b"ds.touched", b"ds.deleted"
F_ACKED = b"ds.acked"


def _s(v: bytes) -> str:
    return v.decode("utf-8", "surrogatepass")


def _opt(v: object) -> str:
    return "" if v is None else str(v)


class ClusterPeers:
    """The :class:`~ringcast.server.durable_meta.StreamPeers` of an HTTP process of a node
    with ``--redis`` or ``--redis-cluster``."""

    def __init__(
        self,
        remote: RemoteStore,
        node_id: str,
        url: str,
        segment_epoch: int,
        keep_ms: int,
        on_error: Callable[[], None],
    ) -> None:
        self.remote = remote
        self._node_id = node_id
        self.url = url
        self.segment_epoch = segment_epoch
        self.keep_ms = keep_ms
        self.on_error = on_error
        self.acks = AckSender(remote.client, keep_ms, on_error)

    @property
    def node_id(self) -> str:
        return self._node_id

    def _src(self, m: StreamMeta) -> str:
        return keys.source_id(self._node_id, self.segment_epoch, m.slot, m.generation)

    def _acked(self, m: StreamMeta, total: int, closed: bool) -> str:
        return f"{total}:{int(closed)}:{self._src(m)}"

    async def acknowledge(self, m: StreamMeta, total: int, closed: bool) -> None:
        await self.acks.send(keys.SessionKeys(m.name, m.owner).meta, total, closed, self._src(m))

    async def publish(
        self, m: StreamMeta, acked: tuple[int, bool] | None = None, **fields: object
    ) -> None:
        get = {**{f: getattr(m, f) for f in ("ttl", "expires_at", "expires_ts")}, **fields}
        touched = fields.get("touched_at", m.touched_at)
        deleted = fields.get("deleted", m.deleted)
        mapping = {
            F_SRC: self._src(m),
            F_NODE: self._node_id,
            F_URL: self.url,
            F_CT: m.content_type,
            F_TTL: _opt(get["ttl"]),
            F_EXP: _opt(get["expires_at"]),
            F_EXPTS: _opt(get["expires_ts"]),
            F_TOUCHED: f"{touched:.3f}",
            F_DELETED: "1" if deleted else "0",
        }
        if acked is not None:
            mapping[F_ACKED] = self._acked(m, *acked)
        k = keys.SessionKeys(m.name, m.owner)
        errors: tuple[type[BaseException], ...] = (*redis_errors(), TimeoutError)
        try:
            pipe = self.remote.client.pipeline(transaction=False)
            pipe.hset(k.meta, mapping=mapping)  # type: ignore[arg-type]
            if deleted:
                # A tombstone: its session's keys are gone or going (a cancelled session's
                # expire within a minute); other nodes answer 410 until then.
                pipe.pexpire(k.meta, TOMBSTONE_MS)
            else:
                # A hash made here (before the mirror's claim) expires unless the claim
                # comes; one the mirror keeps already has its expiry, which NX leaves alone.
                pipe.pexpire(k.meta, self.keep_ms, nx=True)
            await asyncio.wait_for(pipe.execute(), PUBLISH_TIMEOUT_S)
        except errors as e:
            self.on_error()
            log.warning("Redis: a stream's metadata was not copied (%s)", e or "timed out")

    async def lookup(self, name: str, owner: str, read: bool = False) -> RemoteStream | None:
        try:
            return await self._lookup(name, owner, read)
        except redis_errors() as e:
            self.on_error()
            raise StoreUnavailable(f"the stream is not on this node and Redis failed: {e}") from e

    async def _lookup(self, name: str, owner: str, read: bool) -> RemoteStream | None:
        k = keys.SessionKeys(name, owner)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CLAIM_WAIT_S
        acked: int | None = None
        while True:
            h: Any = await self.remote.client.hgetall(k.meta)
            src = h.get(F_SRC)
            if src is None or _s(h.get(F_NODE, b"")) == self._node_id:
                return None  # not a stream, or this node's (its own rows govern)
            if h.get(F_DELETED) == b"1":
                break
            claimed = h.get(b"src") == src
            acked = _acked_ahead(h, src) if claimed and read else None
            if claimed and acked is None:
                break  # Redis holds all the owner acknowledged (or it has ended there)
            if loop.time() >= deadline:
                if not claimed:
                    return None
                break  # the mirror is behind: reads serve what Redis holds, not up to date
            await asyncio.sleep(CLAIM_POLL_S)
        meta = StreamMeta(
            owner=owner,
            name=name,
            slot=-1,
            generation=-1,
            content_type=_s(h.get(F_CT, b"")),
            ttl=int(h[F_TTL]) if h.get(F_TTL) else None,
            expires_at=_s(h[F_EXP]) if h.get(F_EXP) else None,
            expires_ts=float(h[F_EXPTS]) if h.get(F_EXPTS) else None,
            touched_at=float(h.get(F_TOUCHED, b"0")),
            stream_seq=None,
            closed_by=None,
            fork=None,
            deleted=h.get(F_DELETED) == b"1",
            forks=0,
            source=None,
        )
        node, url = _s(h[F_NODE]), _s(h.get(F_URL, b""))
        if not meta.deleted:
            info = await self.remote.info(name, owner)
            if info is None:
                return None
            meta.slot, meta.generation = info.slot, info.generation
        return RemoteStream(meta, node, url, acked or 0)


class AckSender:
    """The ``ds.acked`` records of one HTTP process (:meth:`ClusterPeers.acknowledge`), sent
    one pipeline at a time: the records of the appends answered while one is in flight go in
    the next (the latest per stream), so concurrent appends share a round trip and the
    client's per-call cost (redis-py's asyncio client: ~0.2 ms of CPU a call on the loaded
    2-core VM, about what the append itself costs). An append waits for the pipeline that
    carries its record, so a read elsewhere that starts after its answer sees it; from a
    failed pipeline until one goes through, appends do not wait (so at most one waits on a
    Redis in trouble, for :data:`PUBLISH_TIMEOUT_S`; while it fails, no other node can read
    the stream anyway)."""

    def __init__(self, client: Client, keep_ms: int, on_error: Callable[[], None]) -> None:
        self.client = client
        self.keep_ms = keep_ms
        self.on_error = on_error
        self.pending: dict[str, tuple[int, int, str]] = {}
        """Meta key -> (total, closed, src) of the records not sent yet."""
        self.sent: asyncio.Future[None] | None = None
        """Done once ``pending`` is sent (or failed)."""
        self.task: asyncio.Task[None] | None = None
        self.healthy = True

    async def send(self, meta_key: str, total: int, closed: bool, src: str) -> None:
        rec = (total, int(closed), src)
        old = self.pending.get(meta_key)
        if old is None or old[2] != src or rec[:2] > old[:2]:
            self.pending[meta_key] = rec
        loop = asyncio.get_running_loop()
        if self.sent is None:
            self.sent = loop.create_future()
        sent = self.sent
        if self.task is None:
            self.task = loop.create_task(self._run())
        if self.healthy:
            await asyncio.shield(sent)

    async def _run(self) -> None:
        try:
            while self.pending:
                batch, sent = self.pending, self.sent
                self.pending, self.sent = {}, None
                try:
                    await self._send(batch)
                finally:
                    if sent is not None and not sent.done():
                        sent.set_result(None)
        finally:
            self.task = None

    async def _send(self, batch: dict[str, tuple[int, int, str]]) -> None:
        errors: tuple[type[BaseException], ...] = (*redis_errors(), TimeoutError)
        calls = [((k,), (*rec, self.keep_ms)) for k, rec in batch.items()]
        try:
            # asyncio.timeout, not wait_for: no task per call on this per-append path.
            async with asyncio.timeout(PUBLISH_TIMEOUT_S):
                pipe = self.client.pipeline(transaction=False)
                for ks, args in calls:
                    ACK.queue(pipe, ks, args)
                res = await pipe.execute(raise_on_error=False)
                for (ks, args), r in zip(calls, res, strict=True):
                    if is_noscript(r):  # a Redis that restarted, or a shard new to the script
                        r = await ACK(self.client, ks, args)
                    if isinstance(r, BaseException):
                        raise r
        except errors as e:
            if self.healthy:
                log.warning(
                    "Redis: appends' totals are not copied (%s); appends go on without "
                    "waiting for Redis until it answers",
                    e or "timed out",
                )
            self.healthy = False
            self.on_error()
        else:
            self.healthy = True


def _acked_ahead(h: dict[bytes, bytes], src: bytes) -> int | None:
    """The total the owning node acknowledged, if Redis does not hold all of it yet; None
    if it does, or if nothing more will come (the stream ended there, as a lost node's
    does)."""
    raw = h.get(F_ACKED)
    if raw is None or h.get(b"state", b"running") != b"running":
        return None
    total, closed, of = raw.split(b":", 2)
    if of != src:
        return None  # acknowledged for another incarnation of the name
    # An acknowledged close is held once Redis ended the stream (ruled out above).
    if int(h.get(b"total", b"0")) >= int(total) and closed == b"0":
        return None
    return int(total)


def stream_peers(cfg: ServeConfig, store: StreamStore) -> StreamPeers | None:
    """The other nodes of an HTTP process whose store is a :class:`ClusterStore`, else None."""
    if not isinstance(store, ClusterStore):
        return None
    return ClusterPeers(
        store.remote,
        cfg.node_id,
        cfg.advertise_url,
        store.epoch,
        mirror_config(cfg).keep_ms,
        store.on_error,
    )
