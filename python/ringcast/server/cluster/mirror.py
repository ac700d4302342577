"""The producing node's side: mirror every session to Redis, obey control, hold the lease.

``--mirror-procs`` mirror processes per node (``python -m ringcast.server.cluster.mirror
CONFIG INDEX``, started and restarted by the supervisor), off the producers' and the
fan-out's paths: they read the rings like any reader. Mirror ``i`` of ``n`` mirrors the
sessions whose segment slot is ``i`` modulo ``n`` (a session keeps its slot for life, so it
has exactly one mirror); every one reads the control stream and renews the node's lease.

- **Flush loop.** Every ``mirror_ms`` it lists the segment's sessions, reads each one's new
  bytes (``Reader.read_nowait``, no waiting) and sends every session's change as one ``SYNC``
  script call, all of them in one pipeline. A session's first call claims it (epoch bumped in
  Redis; a session running elsewhere under the same key is ended ``replaced`` there). The
  mirror advances a session's offset only when Redis acknowledged the bytes, so after an error
  (Redis down, paused, restarted empty) it reads the same bytes again from the ring; a range
  the ring dropped meanwhile is sent as a gap, which remote readers answer with 410.
- **Control.** A ``cancel`` or ``replace`` sent to this node's control stream (a DELETE, or a
  POST that took over the conversation, on another node) ends the local session at once.
- **Lease.** ``SET lease instance PX lease_ms`` every quarter of the lease. Readers elsewhere take
  a missing lease (or another instance's) as the node lost: its running sessions end with
  ``node_lost`` after their mirrored bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from ringcast import OffsetLost, Reader, Segment, SessionEnded, SessionInfo, SessionNotFound
from ringcast.server import rundir
from ringcast.server.child import child_main
from ringcast.server.cluster import keys, scripts
from ringcast.server.cluster.client import (
    Client,
    Script,
    connect,
    is_cluster,
    is_noscript,
    is_refusal,
    redis_errors,
)
from ringcast.server.config import ANON_OWNER, ServeConfig
from ringcast.server.counters import MirrorCounter, SharedCounters, open_child_counters

log = logging.getLogger("ringcast.server.cluster.mirror")

ENTRY_MAX = 256 * 1024
"""Largest stream entry: a window's new bytes of one session are split into entries of at most
this size (a burst after a stall would otherwise make one huge entry), and of at most an
eighth of ``session_bytes``, so trimming (whole entries) keeps at least 7/8 of the budget."""
WINDOW_MAX = 4 * ENTRY_MAX
"""Most bytes of one session sent in one window; a session further behind catches up over the
next windows, so one fast session cannot hold up the window of all the others."""
PHASE_MS = 8.0
"""Spacing of a mirror's passes within a window: a window of ``--mirror-ms`` is split in
``mirror_ms / PHASE_MS`` phases (at most MAX_PHASES), and each session that another node
tails is sent in the phase of its slot (see :meth:`Mirror.flush_loop`)."""
MAX_PHASES = 8
BATCH = 128
"""Sessions per SYNC call on one Redis server: one reply to parse instead of 128 (the client's
cost per reply is what limits a window), and a script short enough not to hold Redis up. A
Redis Cluster gets one session per call (a script's keys must share a slot)."""
_COUNTS = [str(n).encode() for n in range(64)]
"""A SYNC call's per-session argument counts, encoded once."""
CONTROL_BLOCK_MS = 1000
CONTROL_MAXLEN = 10_000

_HELD = (scripts.SYNC_OK, scripts.SYNC_RESYNC, scripts.SYNC_ENDED)
"""SYNC's answers for a session that Redis holds as this node's claim (running, or ended:
done, failed, or cancelled elsewhere): it belongs in its owner's index. (A restarted mirror's
claim of a session that ended meanwhile is answered SYNC_ENDED: its entry is made again
there, in case a lookup dropped it.)"""
SYNC = Script(scripts.SYNC)
END = Script(scripts.END)
FORGET = Script(scripts.FORGET)


def phases(mirror_ms: float) -> int:
    """How many phases a window of ``mirror_ms`` is split in (3 for the default 25 ms)."""
    return max(1, min(MAX_PHASES, int(mirror_ms / PHASE_MS)))


class MirrorConfig(msgspec.Struct, kw_only=True):
    """What a node's mirror needs; the server's configuration fills it in."""

    segment: str
    node_id: str
    instance: str = msgspec.field(default_factory=lambda: secrets.token_hex(8))
    """Identity of this run of the node: a restarted node is a new instance, and the sessions
    of the old one are lost; a restarted mirror process of the same run is not."""
    redis_url: str = ""
    redis_cluster: str = ""
    mirror_ms: float = 25.0
    lease_ms: int = 3000
    session_bytes: int = 4 * 1024 * 1024
    ttl: float = 300.0
    exclude_owners: list[str] = msgspec.field(default_factory=list)
    procs: int = 1
    """Mirror processes of the node (``--mirror-procs``): each mirrors the sessions whose
    segment slot is ``index`` modulo ``procs``, so every session has exactly one."""
    index: int = 0

    @property
    def ttl_ms(self) -> int:
        return max(1, int(self.ttl * 1000))

    @property
    def keep_ms(self) -> int:
        """Expiry of a running session's keys, pushed back on every sync: what a session whose
        node vanished without anyone reading it leaves behind, and for how long."""
        return self.ttl_ms + 60_000


@dataclass
class Tracked:
    """The mirror's view of one local session (slot, generation)."""

    info: SessionInfo
    keys: keys.SessionKeys
    src: str
    reader: Reader | None = None
    next: int = 0
    """First byte not yet acknowledged by Redis."""
    gap_from: int | None = None
    epoch: int = 0
    finished: bool = False
    """Its end is in Redis (or Redis ended it): nothing more to send."""
    synced_at: float = 0.0
    """Start of the last window that left nothing of it unsent (at first, of the window that
    found it): every byte of it not yet in Redis was written after that, so the node's lag in
    seconds is the age of the oldest such time among the sessions that are behind."""
    last_sync: float = 0.0
    sent: int = 0
    """Bytes in the call in flight."""
    ending: tuple[str, str] | None = None
    listed: bool = True
    """In the segment's list at the last full pass (one gone from it is sent at once)."""
    tailed: bool = False
    """Another node tails it (its last sync said so): it is sent in its own phase."""
    phase: int = 0
    reindex: bool = False
    head: str = ""
    """The header of its SYNC calls up to the epoch (src, node, instance)..."""
    mid: str = ""
    """... and between the epoch and the window's time (segment epoch, created)."""


@dataclass
class MirrorStats:
    windows: int = 0
    entries: int = 0
    bytes: int = 0
    gaps: int = 0
    gap_bytes: int = 0
    redis_errors: int = 0
    reconnects: int = 0
    controls: int = 0
    connected: bool = False
    lag_bytes: int = 0
    lag_seconds: float = 0.0
    sessions: int = 0
    last_window_s: float = 0.0


class Mirror:
    def __init__(self, cfg: MirrorConfig, seg: Segment, client: Client) -> None:
        if not cfg.node_id or any(ord(c) < 32 or ord(c) == 127 for c in cfg.node_id):
            raise ValueError(
                f"node id {cfg.node_id!r}: must be non-empty, without control characters"
            )
        if not 0 <= cfg.index < cfg.procs:
            raise ValueError(f"mirror {cfg.index} of {cfg.procs}: no such mirror process")
        self.cfg = cfg
        self.seg = seg
        self.client = client
        self.tracked: dict[tuple[int, int], Tracked] = {}
        self.by_key: dict[tuple[str, str], Tracked] = {}
        self.stats = MirrorStats()
        self.exclude = frozenset(cfg.exclude_owners)
        self.wake = asyncio.Event()
        self.lease_first = False
        self.entry_max = max(1, min(ENTRY_MAX, cfg.session_bytes // 8))
        self.batch = 1 if is_cluster(client) else BATCH
        self.phases = phases(cfg.mirror_ms)
        self.by_phase: list[list[Tracked]] = [[] for _ in range(self.phases)]
        """The running sessions of each phase, as the last full pass found them."""
        self.unindexed: dict[tuple[str, str], Tracked] = {}
        """Sessions Redis holds that their owner's index does not name yet (:meth:`_index`),
        by owner and conversation id."""

    # -- flush loop

    async def run(self) -> None:
        tasks = [
            asyncio.create_task(self.flush_loop()),
            asyncio.create_task(self.control_loop()),
            asyncio.create_task(self.lease_loop()),
        ]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def flush_loop(self) -> None:
        """Windows of ``mirror_ms``, each split in ``phases`` passes ``mirror_ms / phases``
        apart. Phase 0 lists this mirror's sessions (so a new one is claimed within a window)
        and sends every one that no other node tails, and those of phase 0; phase ``j``
        sends the tailed sessions of phase ``j`` (``slot // procs`` modulo ``phases``). A
        session is read once per window, on the same grid, so none of its bytes waits more
        than a window plus a pass; and the tailed sessions' syncs, and with them the other
        nodes' wake-ups and fan-out, come spread over the window instead of in one burst
        (a burst of N streams makes the last of them wait for the fan-out of all the
        others). A phase without tailed sessions costs nothing: no pass, no wake-up; nor
        does a session that nobody reads elsewhere (its burst waits for nobody)."""
        period = self.cfg.mirror_ms / 1000.0
        step = period / self.phases
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await self.flush(0)
            self.stats.last_window_s = loop.time() - start
            for phase in range(1, self.phases):
                if not self.by_phase[phase]:
                    continue
                if await self._sleep(start + phase * step - loop.time()):
                    await self.flush()  # a control message: every session, now
                await self.flush(phase)
            # A window that took longer than the period is followed at once: its sessions
            # are then read less often, and each read sends more.
            if await self._sleep(start + period - loop.time()):
                await self.flush()

    async def _sleep(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True if woken early (a control message ended a session,
        whose end should go to Redis now)."""
        if not self.wake.is_set():
            if seconds <= 0:
                return False
            try:
                await asyncio.wait_for(self.wake.wait(), seconds)
            except TimeoutError:
                return False
        self.wake.clear()
        return True

    def _refresh(self, now: float) -> list[Tracked]:
        """Update the tracked set from the segment's list (this mirror's share of it) and the
        lag figures; the sessions to send this window. One pass over the list, another over
        the tracked set only when some of it left the list."""
        seen: set[tuple[int, int]] = set()
        active: list[Tracked] = []
        lag, oldest = 0, now
        tracked = self.tracked
        for info in self.seg.list(shard=(self.cfg.index, self.cfg.procs)):
            if info.owner in self.exclude:
                continue
            k = (info.slot, info.generation)
            seen.add(k)
            t = tracked.get(k)
            if t is None:
                t = self._track(info, now)
            t.info, t.listed = info, True
            if t.finished:
                continue
            active.append(t)
            behind = info.total_bytes - t.next
            if behind > 0:
                lag += behind
                oldest = min(oldest, t.synced_at)
            else:
                t.synced_at = now
        if len(seen) != len(tracked):
            for k, t in list(tracked.items()):
                if k in seen:
                    continue
                if t.finished:
                    del tracked[k]
                    if self.by_key.get((t.info.owner, t.info.conversation_id)) is t:
                        del self.by_key[(t.info.owner, t.info.conversation_id)]
                    if t.reader is not None:
                        t.reader.close()
                else:  # gone from the segment before its end was sent: _collect says how
                    t.listed = False
                    active.append(t)
                    lag += 1
                    oldest = min(oldest, t.synced_at)
        self.stats.lag_bytes, self.stats.lag_seconds = lag, now - oldest
        self.stats.sessions = len(tracked)
        return active

    def _sessions(self, now: float, phase: int | None) -> list[Tracked]:
        """The sessions a pass of ``phase`` sends (see :meth:`flush_loop`)."""
        if phase:
            return [t for t in self.by_phase[phase] if not t.finished]
        active = self._refresh(now)
        n, procs = self.phases, self.cfg.procs
        by_phase: list[list[Tracked]] = [[] for _ in range(n)]
        first: list[Tracked] = []
        for t in active:
            p = t.info.slot // procs % n if t.tailed else 0
            # Sent now as well: phase 0's own; those that cannot wait for theirs (not claimed
            # yet: a new session is in Redis within a window of its start; gone from the
            # segment); and one moving to a later phase, so that its read never waits more
            # than a window.
            if p == 0 or p > t.phase or t.epoch == 0 or not t.listed:
                first.append(t)
            t.phase = p
            by_phase[p].append(t)
        self.by_phase = by_phase
        return active if phase is None else first

    def _track(self, info: SessionInfo, now: float) -> Tracked:
        src = keys.source_id(self.cfg.node_id, self.seg.epoch, info.slot, info.generation)
        t = Tracked(info, keys.SessionKeys(info.conversation_id, info.owner), src, synced_at=now)
        # The pieces of its SYNC header that are the same in every window, made once.
        t.head = f"{src}\x1f{self.cfg.node_id}\x1f{self.cfg.instance}\x1f"
        t.mid = f"\x1f{self.seg.epoch}\x1f{info.started_at:.3f}"
        self.tracked[(info.slot, info.generation)] = t
        self.by_key[(info.owner, info.conversation_id)] = t
        return t

    def _collect(self, t: Tracked) -> tuple[list[bytes], str, str]:
        """Read what the session's ring has beyond ``t.next`` (at most WINDOW_MAX bytes);
        returns the entries and the state to send (``running`` unless it ended)."""
        conv, owner = t.info.conversation_id, t.info.owner
        chunks: list[bytes] = []
        budget = WINDOW_MAX
        while t.reader is None:
            try:
                t.reader = self.seg.reader(conv, t.next, owner, counted=False)
            except OffsetLost as e:
                if t.gap_from is None:
                    t.gap_from = t.next
                t.next = e.first_available
            except SessionNotFound:
                return chunks, "cancelled", "evicted"
        try:
            while budget > 0:
                data = t.reader.read_nowait(min(budget, self.entry_max))
                if data is None:
                    break
                if not data:
                    return chunks, t.reader.state(), ""
                chunks.append(data)
                budget -= len(data)
        except OffsetLost:
            # Dropped while this window read: send what was read; the reopen finds the gap.
            t.reader.close()
            t.reader = None
        except SessionEnded as e:
            reason = e.reason if e.reason in ("cancelled", "replaced", "evicted") else "evicted"
            if e.reason == "failed":
                return chunks, "failed", ""
            return chunks, "cancelled", reason
        return chunks, "running", ""

    async def flush(self, phase: int | None = None) -> bool:
        """One pass: every session of this mirror (``phase`` None), or those of ``phase``
        (0 also lists the segment: see :meth:`flush_loop`). False if a call to Redis
        failed."""
        if (not self.stats.connected or self.lease_first) and not await self.renew_lease():
            return False  # before any claim: readers elsewhere must find this node alive
        self.lease_first = False
        now = time.time()
        # The header's fields that are the same for every session of this window (its order:
        # scripts.SYNC): 7 now, 8 session bytes, [9 keep ms], 10 ttl ms.
        keep_ms, every = self.cfg.keep_ms, min(30.0, self.cfg.keep_ms / 4000)
        window = f"\x1f{now:.3f}\x1f{self.cfg.session_bytes}\x1f"
        ttl = f"\x1f{self.cfg.ttl_ms}\x1f"
        calls: list[tuple[Tracked, list[Any]]] = []
        for t in self._sessions(now, phase):
            chunks, state, reason = self._collect(t)
            due = now - t.last_sync > every
            if not chunks and state == "running" and t.epoch and t.gap_from is None and not due:
                continue
            claim = t.epoch == 0
            # The owner's index is another key (another slot): added once the claim is in
            # (:meth:`_index`), and again with every expiry refresh.
            t.reindex = claim or due
            start = t.next if t.gap_from is None else t.gap_from
            t.sent = sum(map(len, chunks))
            t.ending = (state, reason) if state != "running" else None
            header = (
                f"{t.head}{t.epoch}{t.mid}{window}{keep_ms if due else 0}{ttl}"
                f"{start}\x1f{t.next}\x1f{state}\x1f{reason}"
            )
            if claim:
                args = [header, t.info.conversation_id, t.info.owner, *chunks]
            else:
                args = [header, "", "", *chunks]
            calls.append((t, args))
        ok = True
        if calls:
            results = await self._execute(calls)
            for (t, args), res in zip(calls, results, strict=True):
                await self._apply(t, args, res, now)
                if t.reindex and not isinstance(res, BaseException) and int(res[0]) in _HELD:
                    self.unindexed[(t.info.owner, t.info.conversation_id)] = t
            self.stats.windows += 1
            ok = not any(isinstance(r, BaseException) for r in results)
        return await self._index() and ok

    async def _index(self) -> bool:
        """Adds the sessions claimed in Redis (or due for a refresh) to their owners' indexes,
        which listings and lookups elsewhere read, once their SYNC has been answered: an entry
        never names a session that Redis does not hold yet. A lookup drops the entries whose
        session it cannot find, and one sent with the claim could land first (in a Redis
        Cluster the index is on another shard; a claim answered NOSCRIPT is sent again after
        its pipeline), so a lookup in that instant dropped it until its refresh 30 s later.
        (A lookup that drops an id puts it back if it then finds the session in Redis:
        ``RemoteStore._drop_stale``.) Kept for the next pass while Redis is unavailable (False
        then); dropped, and said, if Redis refuses the update itself."""
        if not self.unindexed:
            return True
        sent = list(self.unindexed.items())
        by_index: dict[str, list[str]] = {}
        for _, t in sent:
            by_index.setdefault(t.keys.owner_index, []).append(t.info.conversation_id)
        try:
            pipe = self.client.pipeline(transaction=False)
            for index, convs in by_index.items():
                pipe.zadd(index, dict.fromkeys(convs, 0))
                pipe.pexpire(index, self.cfg.keep_ms)
            await pipe.execute()
        except redis_errors() as e:
            if not is_refusal(e):
                self._failed(e)
                return False
            # Redis answered and refused (it is not unavailable): sent again it would refuse
            # again, every pass. Said once for these sessions, which stay out of their index.
            log.warning("mirror: Redis refused an owner index update: %s", e)
        for k, t in sent:
            if self.unindexed.get(k) is t:
                del self.unindexed[k]
        return True

    async def _execute(self, calls: list[tuple[Tracked, list[Any]]]) -> list[Any]:
        """One pipeline: a SYNC call per batch of sessions. Per session: its reply, or the
        exception its batch failed with."""
        batches = [calls[i : i + self.batch] for i in range(0, len(calls), self.batch)]

        def sync_args(batch: list[tuple[Tracked, list[Any]]]) -> tuple[list[str], list[Any]]:
            ks: list[str] = []
            args: list[Any] = []
            for t, a in batch:
                ks += (t.keys.meta, t.keys.base)
                args.append(_COUNTS[len(a)] if len(a) < len(_COUNTS) else len(a))
                args += a
            return ks, args

        try:
            pipe = self.client.pipeline(transaction=False)
            for batch in batches:
                SYNC.queue(pipe, *sync_args(batch))
            raw = await pipe.execute(raise_on_error=False)
        except redis_errors() as e:
            self._failed(e)
            return [e] * len(calls)
        results: list[Any] = []
        for batch, res in zip(batches, raw, strict=True):
            if is_noscript(res):
                try:
                    res = await SYNC(self.client, *sync_args(batch))
                except redis_errors() as e:
                    res = e
            results += [res] * len(batch) if isinstance(res, BaseException) else res
        self._ok()
        return results

    def _failed(self, e: BaseException) -> None:
        self.stats.redis_errors += 1
        # Once per outage, and at the first error even if Redis never answered: a node started
        # against a wrong or unreachable URL says so instead of serving in silence.
        if self.stats.connected or self.stats.redis_errors == 1:
            log.warning(
                "mirror: Redis unavailable (%s); local serving goes on, streams are not "
                "mirrored to the other nodes until it answers",
                e,
            )
        self.stats.connected = False

    def _ok(self) -> None:
        if not self.stats.connected:
            if self.stats.windows or self.stats.redis_errors:
                self.stats.reconnects += 1
                log.warning("mirror: Redis is back; catching up from the rings")
            self.stats.connected = True

    async def _apply(self, t: Tracked, args: list[Any], res: Any, now: float) -> None:
        if isinstance(res, BaseException):
            if not isinstance(res, redis_errors()):
                raise res
            self.stats.redis_errors += 1
            # Unknown whether it was applied: read again from the acknowledged offset.
            self._reopen(t)
            return
        status, epoch, total, _first, old_node, old_inst, rstate, tailed = res
        old_node = old_node.decode() if isinstance(old_node, bytes) else old_node
        old_inst = old_inst.decode() if isinstance(old_inst, bytes) else old_inst
        rstate = rstate.decode() if isinstance(rstate, bytes) else rstate
        t.last_sync = now
        if old_node and (old_node, old_inst) != (self.cfg.node_id, self.cfg.instance):
            await self._send_control(old_node, "replace", t.info, int(epoch) - 1)
        if status == scripts.SYNC_OK:
            if t.gap_from is not None:
                self.stats.gaps += 1
                self.stats.gap_bytes += t.next - t.gap_from
                log.warning(
                    "mirror: bytes %d..%d of a session were dropped from the ring before they "
                    "could be mirrored; remote readers get 410 for them",
                    t.gap_from,
                    t.next,
                )
            t.epoch, t.gap_from, t.tailed = int(epoch), None, bool(int(tailed))
            self.stats.bytes += t.sent
            self.stats.entries += len(args) - 3
            if int(total) != t.next + t.sent:
                self._reopen(t, int(total))
            else:
                t.next = int(total)
                if t.next >= t.info.total_bytes:
                    t.synced_at = now  # all it had at this window's start is in Redis
            if t.ending is not None:
                t.finished = True
        elif status == scripts.SYNC_RESYNC:
            t.epoch = int(epoch)
            self._reopen(t, int(total))
        elif status == scripts.SYNC_GONE:
            # Expired or lost with a Redis restart: claim again and send what the ring holds,
            # after renewing the lease (a Redis that lost its keys lost that one too).
            self.lease_first = True
            t.epoch = 0
            self._reopen(t, 0)
        else:
            # Ended in Redis (DELETE elsewhere, or this node was declared lost), or another
            # producer took the conversation over: stop mirroring it, and end it here too.
            t.finished = True
            reason = "replaced" if status == scripts.SYNC_REPLACED else rstate
            if reason in ("cancelled", "replaced") and not t.info.is_done:
                self.seg.evict_slot(t.info.slot, t.info.generation, reason)
            elif reason == "failed":
                log.warning(
                    "mirror: this node was declared lost; a running session is no longer mirrored"
                )

    def _reopen(self, t: Tracked, offset: int | None = None) -> None:
        if t.reader is not None:
            t.reader.close()
            t.reader = None
        if offset is not None:
            t.next = offset
        t.gap_from = None

    # -- control

    async def _send_control(self, node: str, op: str, info: SessionInfo, epoch: int) -> None:
        with contextlib.suppress(*redis_errors()):
            await send_control(self.client, node, op, info.conversation_id, info.owner, epoch)

    async def control_loop(self) -> None:
        key = keys.control_key(self.cfg.node_id)
        last = "$"
        while True:
            try:
                res: Any = await self.client.xread({key: last}, count=100, block=CONTROL_BLOCK_MS)
            except redis_errors() as e:
                self._failed(e)
                await asyncio.sleep(0.5)
                continue
            for _stream, entries in res or []:
                for entry_id, fields in entries:
                    last = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                    self.control(fields)

    def control(self, fields: dict[bytes, bytes]) -> None:
        try:
            op = fields[b"op"].decode()
            conv = fields[b"conv"].decode("utf-8", "surrogatepass")
            owner = fields[b"owner"].decode("utf-8", "surrogatepass")
            epoch = int(fields[b"epoch"])
        except (KeyError, ValueError):
            log.warning("mirror: malformed control message ignored")
            return
        t = self.by_key.get((owner, conv))
        if t is None or t.epoch != epoch or t.info.is_done:
            return
        self.stats.controls += 1
        reason = "cancelled" if op == "cancel" else "replaced"
        self.seg.evict_slot(t.info.slot, t.info.generation, reason)
        self.wake.set()

    # -- lease

    async def renew_lease(self) -> bool:
        try:
            await self.client.set(
                keys.lease_key(self.cfg.node_id), self.cfg.instance, px=self.cfg.lease_ms
            )
        except redis_errors() as e:
            self._failed(e)
            return False
        self._ok()
        return True

    async def lease_loop(self) -> None:
        while True:
            await self.renew_lease()
            await asyncio.sleep(self.cfg.lease_ms / 4000.0)

    async def drain(self, timeout: float) -> None:
        """Shutting down: flush until every local session's end is in Redis (the workers end
        theirs with ``server_shutdown``), at most ``timeout`` seconds; then mirror 0 gives up
        the lease, so whatever is left ends ``node_lost`` elsewhere at once rather than at its
        expiry (the supervisor stops the node's other mirrors first: their last ends are in
        Redis before the lease goes)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if await self.flush() and all(t.finished for t in self.tracked.values()):
                break
            await asyncio.sleep(self.cfg.mirror_ms / 1000.0)
        if self.cfg.index == 0:
            with contextlib.suppress(*redis_errors()):
                await self.client.delete(keys.lease_key(self.cfg.node_id))


async def send_control(
    client: Client, node: str, op: str, conv: str, owner: str, epoch: int
) -> None:
    await client.xadd(
        keys.control_key(node),
        {"op": op, "conv": conv, "owner": owner, "epoch": str(epoch)},
        maxlen=CONTROL_MAXLEN,
        approximate=True,
    )


def mirror_config(cfg: ServeConfig, index: int = 0) -> MirrorConfig:
    """The settings of mirror process ``index`` of a ``ringcast serve`` node."""
    return MirrorConfig(
        segment=cfg.segment,
        node_id=cfg.node_id,
        instance=cfg.node_instance,
        redis_url=cfg.redis_url,
        redis_cluster=cfg.redis_cluster,
        mirror_ms=cfg.mirror_ms,
        lease_ms=cfg.node_lease_ms,
        session_bytes=cfg.session_bytes,
        ttl=cfg.ttl,
        exclude_owners=[ANON_OWNER],
        procs=cfg.mirror_procs,
        index=index,
    )


def publish(stats: MirrorStats, counters: SharedCounters) -> None:
    """The mirror's figures into its counter row (``/metrics`` reads them from there)."""
    for idx, value in (
        (MirrorCounter.WINDOWS, stats.windows),
        (MirrorCounter.ENTRIES, stats.entries),
        (MirrorCounter.BYTES, stats.bytes),
        (MirrorCounter.GAPS, stats.gaps),
        (MirrorCounter.GAP_BYTES, stats.gap_bytes),
        (MirrorCounter.REDIS_ERRORS, stats.redis_errors),
        (MirrorCounter.RECONNECTS, stats.reconnects),
        (MirrorCounter.CONTROLS, stats.controls),
        (MirrorCounter.LAG_BYTES, stats.lag_bytes),
        (MirrorCounter.LAG_US, int(stats.lag_seconds * 1e6)),
        (MirrorCounter.CONNECTED, int(stats.connected)),
        (MirrorCounter.SESSIONS, stats.sessions),
    ):
        counters.set(idx, value)


async def serve_mirror(cfg: ServeConfig, index: int) -> None:
    """The mirror process of a node (``python -m ringcast.server.cluster.mirror CONFIG 0``,
    spawned and restarted by the supervisor)."""
    counters = open_child_counters(cfg, "mirror", index)
    seg = Segment.open(cfg.segment)
    client = connect(cfg.redis_url, cfg.redis_cluster)
    mirror = Mirror(mirror_config(cfg, index), seg, client)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    task = loop.create_task(mirror.run())
    Path(rundir.ready_file(cfg.run_dir, "mirror", index)).write_text(str(os.getpid()))
    try:
        while not task.done() and not stop.is_set():
            publish(mirror.stats, counters)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)
        if task.done():
            task.result()  # a bug, not Redis trouble: let the supervisor restart the mirror
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        # Shutting down: the supervisor has ended every local stream by now; mirror the ends.
        await mirror.drain(5.0)
        publish(mirror.stats, counters)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.aclose()


def main(argv: list[str] | None = None) -> None:
    child_main("mirror", serve_mirror, argv)


if __name__ == "__main__":
    main()
