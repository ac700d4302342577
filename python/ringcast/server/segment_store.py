"""The local stream store: sessions in the shared-memory segment of this machine.

Every process of one ``ringcast serve`` opens the same segment file; a ``ringcast.Reader``,
``Writer`` and ``SessionInfo`` already are a :class:`~ringcast.server.store.StreamReader`,
``StreamWriter`` and ``StreamView``, so this store hands them out unwrapped (the fan-out's
reads cost nothing extra).
"""

from __future__ import annotations

import asyncio
import builtins
import operator
import time
from collections.abc import Callable, Collection, Sequence
from typing import cast

from ringcast import _aio
from ringcast._core import (
    Notifier,
    Reader,
    RegistryFull,
    Segment,
    SegmentError,
    SegmentStats,
    SessionInfo,
    Writer,
)
from ringcast.server.config import ServeConfig
from ringcast.server.gc import evict_lru, fail_dead_producer, make_room, room_short
from ringcast.server.store import Quota, StreamStore, StreamWriter

_SLOT = operator.attrgetter("slot")
"""A writer's slot (this store's writers are the segment's: ``create``, ``adopt``)."""


NO_ROOM_RETRY_S = 1.0
"""After :meth:`SegmentStore.make_room` found nothing to evict (every stream running or being
read), how long creates skip it: each look lists every session."""


class SegmentStore:
    """:class:`~ringcast.server.store.StreamStore` over a ``ringcast.Segment``."""

    def __init__(
        self,
        segment: Segment,
        evict_running: bool = False,
        on_evicted: Callable[[int], None] | None = None,
    ) -> None:
        self.segment = segment
        self.evict_running = evict_running
        self.on_evicted = on_evicted
        """Called with the number of sessions a full create evicted (``/metrics`` counts
        them)."""
        self._no_room_until = 0.0
        """Until when :meth:`make_room` does not look again (it found nothing to evict)."""
        self._notifier: Notifier | None = None
        self._poke: tuple[asyncio.AbstractEventLoop, Callable[[list[int]], int]] | None = None
        """``_aio.poker`` of the loop of the last own-loop flush, and that loop."""

    @property
    def epoch(self) -> int:
        return self.segment.epoch

    def create(self, conversation_id: str, owner: str, quota: Quota | None = None) -> Writer:
        if room_short(self.segment.path):
            # Finished streams (kept for resumes) fill the filesystem: the least recently
            # used give their pages back before this one needs them (a statvfs a create).
            self.make_room()
        try:
            # A full table evicts its least recently used finished session inside this call.
            return self._create(conversation_id, owner, quota)
        except SegmentError:
            # No room on the filesystem for the slot's pages: finished streams (kept for
            # resumes) give theirs back, least recently used first, and it is tried again.
            if not self.make_room():
                raise
            return self._create(conversation_id, owner, quota)
        except RegistryFull:
            # Every slot holds a running stream: only ``--evict-running`` may end one.
            if not self.evict_running:
                raise
            n = evict_lru(self.segment, 1, self.evict_running)
            if self.on_evicted is not None:
                self.on_evicted(n)
            return self._create(conversation_id, owner, quota)

    def make_room(self) -> int:
        """Evicts finished streams nobody reads, least recently used first, so that a full
        filesystem backs new ones (``store.MakesRoom``, :func:`ringcast.server.gc.make_room`);
        how many."""
        now = time.monotonic()
        if now < self._no_room_until:
            return 0  # nothing could go a moment ago: not another listing of every session
        n = make_room(self.segment, self.segment.path)
        if n and self.on_evicted is not None:
            self.on_evicted(n)
        if not n:
            self._no_room_until = now + NO_ROOM_RETRY_S
        return n

    def _create(self, conversation_id: str, owner: str, quota: Quota | None) -> Writer:
        if quota is None:
            return self.segment.create_or_replace(conversation_id, owner)
        return self.segment.create_or_replace(
            conversation_id, owner, max_running=quota.max_running, counted=quota.counted
        )

    def adopt(self, conversation_id: str, owner: str, generation: int) -> Writer:
        return self.segment.adopt(conversation_id, owner, generation)

    async def open_reader(
        self, conversation_id: str, offset: int, owner: str, *, counted: bool = True
    ) -> Reader:
        return self.segment.reader(conversation_id, offset, owner, counted=counted)

    async def get(self, conversation_id: str, owner: str) -> SessionInfo | None:
        return self.segment.get(conversation_id, owner)

    async def lookup_prefix(self, prefix: str, owner: str) -> list[SessionInfo]:
        return self.segment.lookup_prefix(prefix, owner)

    async def list(self, owner: str | None = None) -> list[SessionInfo]:
        return self.segment.list(owner)

    async def cancel(self, conversation_id: str, owner: str) -> None:
        self.segment.evict_and_cancel(conversation_id, owner)

    async def remove(self, conversation_id: str, owner: str) -> None:
        self.segment.evict(conversation_id, owner)

    def stats(self) -> SegmentStats:
        return self.segment.stats()

    def cancelled_among(self, writers: Sequence[StreamWriter]) -> Sequence[int]:
        # This store's writers are the segment's (``create``, ``adopt``).
        return Writer.cancelled_among(cast("builtins.list[Writer]", writers))

    def silent_among(self, writers: Sequence[StreamWriter], seconds: float) -> Sequence[int]:
        return Writer.silent_among(cast("builtins.list[Writer]", writers), seconds)

    def flush_wakes(
        self, own: Collection[StreamWriter] = (), loop: asyncio.AbstractEventLoop | None = None
    ) -> int:
        if not own or loop is None:
            return self.segment.flush_wakes()
        # This process's readers are told here, by a direct call into its loop's hub; the
        # datagram the flush would send this process's own notifier is left out.
        sent = self.segment.flush_wakes(skip_own=True)
        held = self._poke
        if held is None or held[0] is not loop:
            if self._notifier is None:
                self._notifier = self.segment.notifier()
            poke = _aio.poker(loop, self._notifier)
            if poke is None:
                return sent  # no reader of this process has waited on this loop yet
            held = self._poke = (loop, poke)
        held[1](list(map(_SLOT, own)))
        return sent

    def end_dead_producer(self, conversation_id: str, owner: str) -> bool:
        """See :class:`~ringcast.server.store.EndsDeadProducers`."""
        return fail_dead_producer(self.segment, conversation_id, owner)


def open_store(cfg: ServeConfig, on_evicted: Callable[[int], None] | None = None) -> StreamStore:
    """The stream store of a child process of ``ringcast serve`` (see
    :mod:`ringcast.server.store`, "Selecting a store")."""
    return SegmentStore(Segment.open(cfg.segment), cfg.evict_running, on_evicted)
