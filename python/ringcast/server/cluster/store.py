"""The cluster stream store: this node's segment first, then Redis.

A :class:`ClusterStore` is the :class:`~ringcast.server.store.StreamStore` of an HTTP process of
a node started with ``--redis`` or ``--redis-cluster``. Streams produced here are created,
adopted, read and fanned out from the local segment exactly as without Redis (the mirror
process copies them to Redis off these paths); a stream this node does not hold is looked up,
read, listed and cancelled through Redis (:class:`~ringcast.server.cluster.remote.RemoteStore`).

Redis trouble never breaks local serving: lookups and listings merge what Redis answers within
:data:`REMOTE_LOOKUP_S` and otherwise show the local streams alone; a DELETE always cancels
locally. Only a read of a stream that is not here needs Redis, and fails with
:class:`StoreUnavailable` (503) when it cannot be reached.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import TypeVar

from ringcast._core import Segment, SegmentStats, SessionNotFound, Writer
from ringcast.server.cluster.client import connect, redis_errors
from ringcast.server.cluster.remote import RemoteInfo, RemoteReader, RemoteStore
from ringcast.server.config import ServeConfig
from ringcast.server.segment_store import SegmentStore
from ringcast.server.store import (
    Quota,
    StoreUnavailable,
    StreamReader,
    StreamView,
    StreamWriter,
)

log = logging.getLogger("ringcast.server.cluster")

REMOTE_LOOKUP_S = 1.0
"""How long a lookup, listing or DELETE waits for Redis before answering with what this node
has (a DELETE has cancelled the local stream by then)."""

OPENED_KEEP = 4096
T = TypeVar("T")

CLAIM_POLL_S = 0.02
CLAIM_WAIT_S = 0.5
"""How long a read on this node waits at least for another node's mirror to claim a stream
created there a moment ago (the claim comes within a flush window, later on a busy machine):
a Durable Stream's lookup (``ringcast.server.cluster.ds``), and :func:`claim_wait`."""


def claim_wait(mirror_ms: float) -> float:
    """How long a read of a conversation that neither this node nor Redis has waits for it
    to appear before the 404: a stream started on another node a moment ago is in Redis once
    that node's mirror has claimed it, within a flush window of its start. Two windows and
    0.1 s of slack, at least :data:`CLAIM_WAIT_S` (0.5 s at the default ``--mirror-ms``)."""
    return max(CLAIM_WAIT_S, 2 * mirror_ms / 1000 + 0.1)


class ClusterStore:
    def __init__(
        self,
        local: SegmentStore,
        remote: RemoteStore,
        on_error: Callable[[], None],
        claim_wait: float = 0.0,
    ) -> None:
        self.local = local
        self.remote = remote
        self.on_error = on_error
        self.claim_wait = claim_wait
        """How long a read waits for a conversation that is nowhere yet (:func:`claim_wait`)."""
        self.opened: dict[tuple[str, str], RemoteInfo] = {}
        """The incarnation last opened from Redis, per stream (oldest first, bounded)."""

    @property
    def epoch(self) -> int:
        return self.local.epoch

    def create(self, conversation_id: str, owner: str, quota: Quota | None = None) -> Writer:
        # The quota counts this node's running streams: a stream runs on the node that
        # created it.
        return self.local.create(conversation_id, owner, quota)

    def adopt(self, conversation_id: str, owner: str, generation: int) -> Writer:
        return self.local.adopt(conversation_id, owner, generation)

    async def _remote(self, call: Awaitable[T], default: T, wait: float | None) -> T:
        errors: tuple[type[BaseException], ...] = (*redis_errors(), TimeoutError)
        try:
            return await asyncio.wait_for(call, wait)
        except errors as e:
            self.on_error()
            log.warning("Redis: %s; answering with this node's streams", e or "timed out")
            return default

    async def open_reader(
        self, conversation_id: str, offset: int, owner: str, *, counted: bool = True
    ) -> StreamReader | RemoteReader:
        try:
            return await self.local.open_reader(conversation_id, offset, owner, counted=counted)
        except SessionNotFound:
            pass
        key = (owner, conversation_id)
        known = self.opened.get(key)
        if known is not None and not counted:
            # The fan-out's reader at the edge, for the incarnation a client's reader of this
            # process just opened: the same one, and no round trip.
            return await self.remote.open(conversation_id, owner, offset, known)
        try:
            reader = await self._open_remote(conversation_id, owner, offset)
        except redis_errors() as e:
            self.on_error()
            if known is not None:
                # A relay reopening where it was (after a slow client caught up): its reads
                # wait Redis out.
                return await self.remote.open(conversation_id, owner, offset, known)
            raise StoreUnavailable(f"the stream is not on this node and Redis failed: {e}") from e
        self.opened[key] = reader.info
        if len(self.opened) > OPENED_KEEP:
            del self.opened[next(iter(self.opened))]
        return reader

    async def _open_remote(self, conversation_id: str, owner: str, offset: int) -> RemoteReader:
        """``RemoteStore.open``, which a conversation that Redis does not have yet (started
        on another node a moment ago: its mirror has not claimed it) is given
        :attr:`claim_wait` to appear in before ``SessionNotFound``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.claim_wait
        while True:
            try:
                return await self.remote.open(conversation_id, owner, offset)
            except SessionNotFound:
                if loop.time() >= deadline:
                    raise
            await asyncio.sleep(CLAIM_POLL_S)

    async def get(self, conversation_id: str, owner: str) -> StreamView | RemoteInfo | None:
        info = await self.local.get(conversation_id, owner)
        if info is not None:
            return info
        return await self._remote(self.remote.info(conversation_id, owner), None, None)

    @staticmethod
    def _merge(
        local: Sequence[StreamView], remote: Sequence[RemoteInfo]
    ) -> list[StreamView | RemoteInfo]:
        here = {i.conversation_id for i in local}
        return [*local, *(i for i in remote if i.conversation_id not in here)]

    async def lookup_prefix(self, prefix: str, owner: str) -> list[StreamView | RemoteInfo]:
        local = await self.local.lookup_prefix(prefix, owner)
        remote = await self._remote(self.remote.lookup_prefix(prefix, owner), [], REMOTE_LOOKUP_S)
        return self._merge(local, remote)

    async def list(self, owner: str | None = None) -> list[StreamView | RemoteInfo]:
        local = await self.local.list(owner)
        if owner is None:
            return list(local)  # /metrics: this node's streams
        remote = await self._remote(self.remote.sessions(owner), [], REMOTE_LOOKUP_S)
        return self._merge(local, remote)

    async def cancel(self, conversation_id: str, owner: str) -> None:
        await self.local.cancel(conversation_id, owner)
        await self._remote(self.remote.cancel(conversation_id, owner), False, REMOTE_LOOKUP_S)

    async def remove(self, conversation_id: str, owner: str) -> None:
        await self.local.remove(conversation_id, owner)

    def stats(self) -> SegmentStats:
        return self.local.stats()

    def cancelled_among(self, writers: Sequence[StreamWriter]) -> Sequence[int]:
        return self.local.cancelled_among(writers)

    def silent_among(self, writers: Sequence[StreamWriter], seconds: float) -> Sequence[int]:
        return self.local.silent_among(writers, seconds)

    def flush_wakes(
        self, own: Collection[StreamWriter] = (), loop: asyncio.AbstractEventLoop | None = None
    ) -> int:
        return self.local.flush_wakes(own, loop)

    def end_dead_producer(self, conversation_id: str, owner: str) -> bool:
        # Only a local reader learns that its producer died (a Redis one never does).
        return self.local.end_dead_producer(conversation_id, owner)


def open_cluster_store(
    cfg: ServeConfig, on_evicted: Callable[[int], None], on_error: Callable[[], None]
) -> ClusterStore:
    """The store of an HTTP process of a node with ``--redis`` / ``--redis-cluster``."""
    local = SegmentStore(Segment.open(cfg.segment), cfg.evict_running, on_evicted)
    client = connect(cfg.redis_url, cfg.redis_cluster)
    return ClusterStore(
        local,
        RemoteStore(client, cfg.node_id, int(cfg.ttl * 1000)),
        on_error,
        claim_wait(cfg.mirror_ms),
    )
