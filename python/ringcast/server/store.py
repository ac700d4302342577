"""The stream store: the one seam between the server's routes and where a stream's bytes live.

The routes (:mod:`ringcast.server.routes`), the fan-out (:mod:`ringcast.server.fanout`) and the
workers talk to a :class:`StreamStore` and nothing else; they never see a ``Segment``. The
local shared-memory segment is one implementation (:class:`ringcast.server.segment_store.
SegmentStore`); a store for streams that live on other nodes (Redis Streams, issue 12) is
another, and plugs in here without touching the routes or the HTTP layer.

**Selecting a store.** :func:`ringcast.server.segment_store.open_store` builds the store of a
process from its :class:`~ringcast.server.config.ServeConfig`: today always the segment at
``cfg.segment``. A second store adds its settings to ``ServeConfig`` (say ``redis_url``) and a
branch there; nothing else chooses. The tests build stores directly (an in-process fake in
``tests/server/conftest.py`` runs the route tests against the same routes).

**Names.** A stream is keyed by ``(owner, conversation_id)``: the owner is the caller's key
namespace (``""`` without keys), so two keys never see each other's streams, not even their
existence. One key's conversation id names at most one live stream; creating it again
*replaces* the old one. An incarnation of a stream is ``(slot, generation)``: the pair changes
when the stream is replaced, so a reader of the old one is never handed the new one's bytes.
A remote store chooses its own pair (a local index for the stream and its epoch, say); only
equality matters.

**Offsets.** Byte offsets are absolute since the stream began: ``offset`` of a reader is the
next byte it returns; ``total_bytes`` counts every byte ever appended;
``first_available`` is the lowest offset still readable (older bytes were dropped, locally
from the ring, remotely by trimming). Every SSE event carries ``id: <offset after it>``, so
an offset is also a resume point.

**Errors** are the library's own (:mod:`ringcast`), whatever the store:

- ``SessionNotFound``: no such stream for this owner (never created, deleted, expired);
- ``OffsetLost`` with ``first_available``: the offset was dropped;
- ``SessionEnded`` with ``reason`` (``"cancelled"``, ``"replaced"``, ``"evicted"``,
  ``"failed"``; a remote store adds its own, e.g. ``"node_lost"``): the stream ended without
  finishing, raised by a reader's next read;
- ``InvalidArgument``: an id the store cannot hold (too long, ...);
- ``RegistryFull``: no room for another stream, even after eviction;
- ``SegmentError`` from a writer's ``write``: no memory for this stream's next bytes (a full
  shared-memory filesystem); nothing was written, and the writer can still append a short
  error event and finalize (:func:`fail_stream`).

:func:`offset_lost` and :func:`session_ended` build the two that carry a value, for stores
written in Python.

**Terminal events.** A stream ends *finished* (its producer finalized it ``done``: reads then
return ``b""`` at the end), *failed* (the producer, or whoever found it dead, appended an SSE
error event and finalized it ``failed``: readers get that event in the bytes, then ``b""``),
or *ended* (cancelled, replaced, evicted: reads raise ``SessionEnded`` and the routes write
the terminal event of :data:`ringcast.server.routes.END_EVENTS`). A store never invents bytes
in a stream; a remote store whose producer node died ends the stream failed with an error
event, as the dead-producer sweep does locally.

**A dead producer.** A local reader whose producer process died raises
``SessionEnded("producer_died")`` (``ringcast.Reader``), but nothing of that is in the stream
until the manager's sweep ends it in-band. A store that can end it itself
(:class:`EndsDeadProducers`) lets the fan-out do so at once, and every reader then reads the
same terminal event from the stream; with another store the fan-out writes the terminal event
itself, as for ``"cancelled"``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Collection, Sequence
from typing import NamedTuple, Protocol, runtime_checkable

from ringcast._core import OffsetLost, SegmentError, SessionEnded
from ringcast.wire.sse import error_event, frame_event


class StreamReader(Protocol):
    """A reader of one stream incarnation from an absolute offset (``ringcast.Reader`` is
    one). Not shared between tasks; :meth:`close` releases it (a counted reader stops being
    counted in ``readers``)."""

    @property
    def conversation_id(self) -> str: ...
    @property
    def slot(self) -> int: ...
    @property
    def generation(self) -> int: ...
    @property
    def epoch(self) -> int:
        """The store's epoch (``X-Ringcast-Epoch``): it changes when the store is recreated,
        so a client can tell that its offsets refer to another store."""
        ...

    @property
    def offset(self) -> int:
        """The next byte this reader returns."""
        ...

    def read_nowait(self, max_bytes: int = ...) -> bytes | None:
        """The bytes from :attr:`offset` on that are there now (at most ``max_bytes``),
        ``b""`` at the end of a finished stream, or None if it must wait. Raises
        ``OffsetLost``, ``SessionEnded``, ``SessionNotFound``."""
        ...

    def aread(self, max_bytes: int = ...) -> Awaitable[bytes]:
        """Like :meth:`read_nowait`, but waits for bytes instead of returning None."""
        ...

    def close(self) -> None: ...


class StreamWriter(Protocol):
    """The producer's handle of one stream incarnation (``ringcast.Writer`` is one). A store
    hands it out by :meth:`StreamStore.create` (to the HTTP process that took the request) and
    :meth:`StreamStore.adopt` (to the worker the job was handed to: from then on the first
    handle's writes fail)."""

    @property
    def generation(self) -> int: ...
    @property
    def total_bytes(self) -> int: ...
    @property
    def cancelled(self) -> bool:
        """The stream was cancelled, replaced or evicted: stop producing."""
        ...

    def write(self, data: bytes, progress: bool = True, defer_wake: bool = False) -> bool:
        """Append ``data``; False if the stream is no longer this writer's (cancelled,
        replaced, evicted, or adopted by another handle). ``progress=False``: keep-alive bytes
        that do not count as progress for the idle timeout. ``defer_wake=True``: readers
        waiting in other processes may learn of the bytes only at the store's next
        :meth:`StreamStore.flush_wakes` (a producer batching the appends of a turn)."""
        ...

    def write_event(self, event: bytes, defer_wake: bool = False) -> bool:
        """Append one SSE event framed with its ``id:`` line, as
        ``write(frame_event(total_bytes, event))`` does, the offset taken as the bytes go in;
        returns as :meth:`write`."""
        ...

    def finalize(self, state: str = "done", defer_wake: bool = False) -> bool:
        """End the stream ``"done"`` or ``"failed"``; False if it was no longer this
        writer's. ``defer_wake`` as for :meth:`write`."""
        ...


class StreamView(Protocol):
    """What a lookup, a listing or the GC sees of one stream (``ringcast.SessionInfo`` is
    one). Times are unix seconds; ``completed_at`` is 0 while running."""

    @property
    def conversation_id(self) -> str: ...
    @property
    def owner(self) -> str: ...
    @property
    def slot(self) -> int: ...
    @property
    def generation(self) -> int: ...
    @property
    def state(self) -> str:
        """``"running"``, ``"done"``, ``"failed"`` or ``"cancelled"``."""
        ...

    @property
    def is_done(self) -> bool: ...
    @property
    def total_bytes(self) -> int: ...
    @property
    def first_available(self) -> int: ...
    @property
    def readers(self) -> int:
        """Counted readers attached, in every process (and, for a remote store, node)."""
        ...

    @property
    def started_at(self) -> float: ...
    @property
    def completed_at(self) -> float: ...


class StoreStats(Protocol):
    """Capacity figures for ``/metrics`` (``ringcast.SegmentStats`` is one)."""

    @property
    def max_sessions(self) -> int: ...
    @property
    def bytes_buffered(self) -> int: ...
    @property
    def resident_bytes(self) -> int: ...
    @property
    def lru_evictions(self) -> int:
        """Finished streams the store itself evicted to make room for a create."""
        ...


class Quota(NamedTuple):
    """A cap on running streams that :meth:`StreamStore.create` checks in the same step as
    the create, so that it holds exactly whatever process creates: the running streams of
    each ``(owner, id prefix)`` group in ``counted`` (prefix ``""``: all of that owner's)
    may number at most ``max_running`` once the create is done."""

    max_running: int
    counted: list[tuple[str, str]]


def quota_message(max_running: int) -> str:
    """What a create refused by the ``--max-sessions-per-key`` quota is told (with a 429)."""
    return (
        f"this API key already has {max_running} running streams, its limit "
        f"(--max-sessions-per-key {max_running}); wait for one to finish or DELETE one"
    )


class StreamStore(Protocol):
    """Where streams live, as the routes and workers see it. See the module docstring for
    names, offsets, errors and terminal events.

    Methods that may need a network round trip in a remote store are coroutines; the local
    store answers them at once. The synchronous ones are on paths that must not wait
    (a worker adopting a job, a pump's reads)."""

    @property
    def epoch(self) -> int:
        """This store's epoch (see :attr:`StreamReader.epoch`)."""
        ...

    def create(self, conversation_id: str, owner: str, quota: Quota | None = None) -> StreamWriter:
        """Create the stream, replacing (``SessionEnded("replaced")`` for its readers) a live
        one with the same name; one winner under concurrent creates. Full: the store evicts
        what its policy allows (completed streams least recently used first) and retries,
        then raises ``RegistryFull``. ``InvalidArgument`` for an id it cannot hold.
        ``QuotaExceeded`` if ``quota`` would be exceeded (a replaced running stream that the
        quota counts makes room for its replacement)."""
        ...

    def adopt(self, conversation_id: str, owner: str, generation: int) -> StreamWriter:
        """Take over the producer role of incarnation ``generation`` (the hand-off of a job
        to a worker). ``SessionNotFound`` / ``SessionEnded`` if it was deleted or replaced
        meanwhile."""
        ...

    async def open_reader(
        self, conversation_id: str, offset: int, owner: str, *, counted: bool = True
    ) -> StreamReader:
        """A reader of the current incarnation from ``offset``. Raises ``SessionNotFound``,
        ``OffsetLost`` (offset below ``first_available``), ``InvalidArgument``. An offset past
        the end is allowed (the reader waits for it; the routes answer 416 for a finished
        stream). ``counted=False``: not counted in ``readers`` (the fan-out's own reader)."""
        ...

    async def get(self, conversation_id: str, owner: str) -> StreamView | None:
        """The current incarnation, or None."""
        ...

    async def lookup_prefix(self, prefix: str, owner: str) -> Sequence[StreamView]:
        """The stream of ``owner`` with exactly this id plus every one whose id starts with
        ``prefix + "::"`` (llama-server's lookup rule). ``InvalidArgument`` for an id it
        cannot hold."""
        ...

    async def list(self, owner: str | None = None) -> Sequence[StreamView]:
        """Every stream of ``owner``; ``None``: of every owner (``/metrics``)."""
        ...

    async def cancel(self, conversation_id: str, owner: str) -> None:
        """Delete the stream: readers end with ``"cancelled"``, its producer sees
        ``cancelled`` (a remote store sends the producing node a control message). Unknown
        ids are fine; ``InvalidArgument`` for an id it cannot hold."""
        ...

    async def remove(self, conversation_id: str, owner: str) -> None:
        """Drop a stream nobody will read again (an anonymous request's, once answered):
        like :meth:`cancel` without waking a producer that has already finished."""
        ...

    def stats(self) -> StoreStats: ...

    def cancelled_among(self, writers: Sequence[StreamWriter]) -> Sequence[int]:
        """The positions in ``writers`` (this store's) of those whose stream was cancelled,
        replaced or evicted: what ``cancelled`` says of each, in one call for a process's
        whole set of producers."""
        ...

    def silent_among(self, writers: Sequence[StreamWriter], seconds: float) -> Sequence[int]:
        """The positions in ``writers`` (this store's) of those whose stream runs, is still
        theirs, and had no write that counts as progress for ``seconds`` or longer (a
        keep-alive is not progress): the streams due a keep-alive, in one call."""
        ...

    def flush_wakes(
        self, own: Collection[StreamWriter] = (), loop: asyncio.AbstractEventLoop | None = None
    ) -> int:
        """Tell the waiting readers about every append made with ``defer_wake=True`` through
        this store's writers since the last call (one wake-up per reading process for the
        whole batch); how many other processes were told. ``own`` and ``loop``: the writers
        of those appends and the running loop, given by a producer whose readers share that
        loop: its own readers of their streams are told directly, here and now, not the way
        other processes are."""
        ...


@runtime_checkable
class EndsDeadProducers(Protocol):
    """A store that can end a stream whose producer died, in-band (the local segment)."""

    def end_dead_producer(self, conversation_id: str, owner: str) -> bool:
        """Take over the stream if its producer is dead, append the ``producer_died`` error
        event and finalize it ``failed``, as the manager's sweep does
        (:func:`ringcast.server.gc.fail_dead_producer`). False if someone else ended it first
        (the sweep, another HTTP process), its producer is alive, or it is gone: the stream
        then holds its own end, or readers learn of it from the store."""
        ...


@runtime_checkable
class MakesRoom(Protocol):
    """A store whose streams share a filesystem that may fill (the local segment)."""

    def make_room(self) -> int:
        """Evict finished streams, least recently used first, to give their pages back to
        a filesystem that is full; how many."""
        ...


class StoreUnavailable(Exception):
    """A store that needs another system (Redis) for this stream cannot reach it: the routes
    answer 503. Never raised for a stream this node holds."""


def offset_lost(first_available: int) -> OffsetLost:
    """An ``OffsetLost`` as the library raises it, for stores written in Python."""
    e = OffsetLost(f"offset dropped; the first available offset is {first_available}")
    e.first_available = first_available
    return e


def session_ended(reason: str) -> SessionEnded:
    """A ``SessionEnded`` as the library raises it, for stores written in Python."""
    e = SessionEnded(f"the session ended: {reason}")
    e.reason = reason
    return e


def fail_stream(writer: StreamWriter, code: int, message: str, type_: str) -> bool:
    """End a stream *failed*, visibly: append an SSE error event (``{"error": {code, message,
    type}}``, framed with its ``id:``) and finalize it ``failed``. Whoever holds the producer
    role does this: the worker when its job fails, the HTTP process when no worker adopted the
    job, the GC for a stream whose producer died. False if the stream was no longer this
    writer's (its readers then learn why from the store). Out of memory even for the event,
    the stream is still finalized."""
    try:
        if not writer.write(frame_event(writer.total_bytes, error_event(code, message, type_))):
            return False
    except SegmentError:
        pass
    return writer.finalize("failed")
