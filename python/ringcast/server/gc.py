"""Garbage collection of sessions: LRU eviction, the dead-producer sweep, TTL and idle eviction.

The supervisor runs :func:`sweep_dead_producers` every 200 ms and :func:`collect` every
second; an HTTP process calls :func:`evict_lru` when a create finds the table full.
"""

from __future__ import annotations

import logging
import os
import time

from ringcast._core import Segment, SessionInfo, SessionNotFound
from ringcast.server.config import ANON_OWNER, ServeConfig
from ringcast.server.counters import ManagerCounter, SharedCounters
from ringcast.server.durable_meta import DURABLE_OWNER_PREFIX, DurableMeta, is_durable_owner
from ringcast.server.store import fail_stream

log = logging.getLogger("ringcast.gc")


def last_used(info: SessionInfo) -> float:
    """When a completed session was last used: its completion, or a reader attaching after
    it (``last_access_at``; a reader attaches for every GET, resume and replay)."""
    return max(info.completed_at, info.last_access_at)


FS_EVICT_BATCH = 16
"""The most finished streams evicted at once when the segment's filesystem is full
(:func:`make_room`)."""
FS_RESERVE = 4 << 20
"""The free bytes kept for new streams on the segment's filesystem, at most a quarter of
it (:func:`room_short`)."""


def room_short(path: str) -> bool:
    """Whether the filesystem of the segment at ``path`` has less than its reserve free
    (``FS_RESERVE``, at most a quarter of its size); False if it cannot be told."""
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    reserve = min(FS_RESERVE, st.f_blocks * st.f_frsize // 4)
    return st.f_bavail * st.f_frsize < reserve


def make_room(seg: Segment, path: str) -> int:
    """The filesystem of the segment (at ``path``) is short (:func:`room_short`): evict
    finished streams that nobody is reading, least recently used first, until it is not or
    ``FS_EVICT_BATCH`` went. How many were evicted."""
    done = [i for i in seg.list() if i.is_done and not i.readers]
    done.sort(key=last_used)
    evicted = 0
    for info in done:
        if evicted >= FS_EVICT_BATCH or not room_short(path):
            break
        if seg.evict_slot(info.slot, info.generation, "evicted"):
            evicted += 1
    return evicted


def evict_lru(seg: Segment, count: int, evict_running: bool) -> int:
    """Evict up to ``count`` sessions, least recently used first: completed sessions without
    readers (by :func:`last_used`), then completed ones with readers, then (only if
    ``evict_running``) running ones by last progress. Returns how many were evicted."""
    infos = seg.list()
    done = [i for i in infos if i.is_done]
    done.sort(key=lambda i: (i.readers > 0, last_used(i)))
    order: list[SessionInfo] = done
    if evict_running:
        running = [i for i in infos if not i.is_done]
        running.sort(key=lambda i: i.last_write_at)
        order = done + running
    evicted = 0
    for info in order:
        if evicted >= count:
            break
        if seg.evict_slot(info.slot, info.generation, "evicted"):
            evicted += 1
    return evicted


def fail_session(seg: Segment, conversation_id: str, owner: str, message: str, type_: str) -> bool:
    """Take over a running session whose producer is dead, append an SSE error event and
    finalize it ``failed``. False if the producer is alive or the session is gone (or
    finished: someone else ended it first).

    Gone includes gone since the caller saw it: the manager's sweep picks its candidates
    from a scan without the registry lock, and a ``DELETE`` (or an eviction) may remove one
    before this takes it over."""
    try:
        w = seg.take_over_dead(conversation_id, owner)
    except SessionNotFound:
        return False
    if w is None:
        return False
    fail_stream(w, 500, message, type_)
    return True


def fail_dead_producer(seg: Segment, conversation_id: str, owner: str) -> bool:
    """End a session whose producer died with the in-band ``producer_died`` error event: the
    manager's sweep does it, and so does an HTTP process whose reader found the producer dead
    first (:meth:`ringcast.server.segment_store.SegmentStore.end_dead_producer`), so every
    reader gets the same bytes, whoever wins. False as :func:`fail_session`."""
    return fail_session(seg, conversation_id, owner, "the producer process died", "producer_died")


def sweep_dead_producers(seg: Segment, now: float) -> int:
    n = 0
    # Only the candidates, chosen in Rust (five sweeps a second over every session as Python
    # objects cost the manager ~1.6 ms each at 4,000 sessions, ~40 ms at 100,000): running
    # with a dead producer, or anonymous. A Durable Stream has no producer process (any HTTP
    # process appends to it): never one.
    for info in seg.sweep_candidates(ANON_OWNER, DURABLE_OWNER_PREFIX):
        if info.is_done:
            if info.owner == ANON_OWNER and info.readers == 0 and now - info.completed_at > 2.0:
                # An anonymous stream its HTTP process did not remove once answered: it died
                # (with --workers 0, also its producer, which the branch below failed).
                # Nobody can read it (its id was never given out): do not keep it --ttl long.
                seg.evict(info.conversation_id, info.owner)
            continue
        if not info.producer_alive:
            if fail_dead_producer(seg, info.conversation_id, info.owner):
                n += 1
        elif info.owner == ANON_OWNER and info.readers == 0 and now - info.started_at > 2.0:
            # An anonymous stream nobody can read any more (its HTTP process died).
            seg.evict_and_cancel(info.conversation_id, info.owner)
    return n


def sweep(seg: Segment, counters: SharedCounters) -> None:
    """Fail the sessions whose producer died, and count them."""
    n = sweep_dead_producers(seg, time.time())
    if n:
        log.info("failed %d session(s) whose producer died", n)
        counters.inc(ManagerCounter.DEAD_PRODUCERS, n)


def expire_durable(seg: Segment, meta: DurableMeta, infos: list[SessionInfo], now: float) -> int:
    """Remove Durable Streams whose ``Stream-TTL`` or ``Stream-Expires-At`` passed, rows whose
    session is gone (evicted under pressure), and sessions without a row (a create that died
    before its commit). Returns how many streams expired. Call it inside
    ``meta.transaction()`` with ``infos`` listed inside it too: a create holds that lock from
    its session's birth to its row's, so no session in the listing lacks its row for that
    reason."""
    n = 0
    live = {(i.owner, i.conversation_id): i for i in infos if is_durable_owner(i.owner)}
    rows = meta.all_streams()
    named = {(m.owner, m.name) for m in rows}
    for m in rows:
        info = live.get((m.owner, m.name))
        if m.deleted:
            continue  # a tombstone its forks keep until the last of them goes
        if info is None or (info.slot, info.generation) != (m.slot, m.generation):
            meta.drop(m)
        elif m.expired(now):
            seg.evict_slot(info.slot, info.generation, "evicted")
            meta.drop(m)
            n += 1
    for key, info in live.items():
        if key not in named:
            seg.evict_slot(info.slot, info.generation, "evicted")
    return n


def collect(
    seg: Segment, cfg: ServeConfig, counters: SharedCounters, meta: DurableMeta | None = None
) -> None:
    """TTL, idle and LRU eviction (see SERVER.md, "The manager's sweeps"); Durable Streams
    expire by their own TTL or expiry (``meta``), not by ``--ttl`` or ``--idle-timeout``.
    One listing of the segment serves both."""
    now = time.time()
    if meta is not None:
        with meta.transaction():
            infos = seg.list(owner_prefix=DURABLE_OWNER_PREFIX)
            n = expire_durable(seg, meta, infos, now)
        if n:
            counters.inc(ManagerCounter.EVICTIONS_TTL, n)
    # Only the sessions due, chosen in Rust (a listing of every session as Python objects
    # once a second cost the manager ~0.2 s a second at 100,000 finished sessions). Each is
    # checked again on its snapshot: a scan reads without the registry lock.
    idle = max(cfg.idle_timeout, 0.0)
    for info in seg.expiry_candidates(cfg.ttl, idle, DURABLE_OWNER_PREFIX):
        if is_durable_owner(info.owner):
            continue
        if info.is_done:
            if now - info.completed_at >= cfg.ttl and seg.evict_slot(
                info.slot, info.generation, "evicted"
            ):
                counters.inc(ManagerCounter.EVICTIONS_TTL)
        elif (
            idle > 0
            and now - info.last_write_at >= idle
            and seg.evict_slot(info.slot, info.generation, "evicted")
        ):
            log.info("evicted a running session idle for %.0f s", cfg.idle_timeout)
            counters.inc(ManagerCounter.EVICTIONS_IDLE)
    stats = seg.stats()
    headroom = max(1, stats.max_sessions // 16)
    over = stats.sessions_used - (stats.max_sessions - headroom)
    if cfg.max_memory and stats.bytes_buffered > cfg.max_memory:
        over = max(over, 1)
    if over > 0:
        n = evict_lru(seg, over, cfg.evict_running)
        if n:
            counters.inc(ManagerCounter.EVICTIONS_LRU, n)
