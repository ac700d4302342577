"""Counters shared across the processes of one ``ringcast serve``: a small memory-mapped file
in the run directory, one 256-byte row of 32 little-endian ``u64`` per process (row 0 the
supervisor, then the HTTP processes, then the workers, then the mirror processes of a node
with ``--redis``), each row written by its process only
and summed by whichever HTTP process serves ``/metrics``.
"""

from __future__ import annotations

import asyncio
import enum
import mmap
import os
import struct
import sys

from ringcast.server import rundir
from ringcast.server.config import ServeConfig


class HttpCounter(enum.IntEnum):
    REQUESTS = 0
    ERRORS_4XX = 1
    ERRORS_5XX = 2
    STREAMS_STARTED = 3
    RESUMES = 4
    OFFSETS_LOST = 5
    STEER_REFUSED = 6
    """1 if the kernel refused this process's ``--spread adaptive`` program (a gauge, set at
    start; until 2026-12 this word counted readers ended for falling behind, never shown)."""
    BYTES_SENT = 7
    READERS_ACTIVE = 8
    EVICTIONS_LRU = 9
    HANDOFF_FAILED = 10
    DETACHED = 11
    COALESCE_US = 12
    WRITE_TIMEOUTS = 13
    REDIS_ERRORS = 14
    """Lookups, reads and cancels through Redis that failed (``--redis``)."""
    PASSED = 15
    """``GET /v1/stream`` connections passed to the HTTP process producing their stream
    (:mod:`ringcast.server.passing`)."""
    PASS_FAILED = 16
    """Passes that could not be sent (the producer gone, its queue full): served here."""


class WorkerCounter(enum.IntEnum):
    JOBS_STARTED = 0
    JOBS_DONE = 1
    JOBS_FAILED = 2
    JOBS_CANCELLED = 3
    TOKENS = 4
    ACTIVE = 5


class ManagerCounter(enum.IntEnum):
    EVICTIONS_TTL = 0
    EVICTIONS_IDLE = 1
    EVICTIONS_LRU = 2
    DEAD_PRODUCERS = 3
    RESTARTS_HTTP = 4
    RESTARTS_WORKER = 5
    RESTARTS_MIRROR = 6
    SPREAD_AMONG = 7
    """How many HTTP processes new connections go to (0: all; ``--spread``,
    :mod:`ringcast.server.steering`), set by the manager, applied by the HTTP processes."""


class MirrorCounter(enum.IntEnum):
    """The row of the mirror process (``--redis``; :mod:`ringcast.server.cluster.mirror`)."""

    WINDOWS = 0
    ENTRIES = 1
    BYTES = 2
    GAPS = 3
    GAP_BYTES = 4
    REDIS_ERRORS = 5
    RECONNECTS = 6
    CONTROLS = 7
    LAG_BYTES = 8
    LAG_US = 9
    CONNECTED = 10
    SESSIONS = 11


ROW_WORDS = 32  # 256 bytes: one row never shares a cache line pair with another process's
ROW_LOOP = ROW_WORDS - 1
"""The last word of every child's row: the event loop it runs, an index into LOOP_NAMES,
written once by :func:`open_child_counters` from inside the running loop."""
LOOP_NAMES = ("", "asyncio", "uvloop")  # 0: not recorded yet

assert max(max(HttpCounter), max(WorkerCounter), max(ManagerCounter), max(MirrorCounter)) < ROW_LOOP


class SharedCounters:
    """Rows of 64-bit counters in a shared file; each row has exactly one writing process.

    Row 0 is the manager, rows ``1..H`` the HTTP processes, then the workers (with
    ``--workers 0``, one row of job counters per HTTP process), then the mirror processes. A
    process keeps
    its own values in Python ints and stores them whole (aligned 8-byte stores, which x86-64
    and aarch64 do not tear), so there is no cross-process read-modify-write. A restarted
    process continues its row's counters; gauges are reset by the new process. The last word
    of a child's row (``ROW_LOOP``) says which event loop it runs.
    """

    def __init__(self, path: str, rows: int, create: bool = False) -> None:
        size = rows * ROW_WORDS * 8
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            self._mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.rows = rows
        self._row = -1
        self._base = 0
        self._vals: list[int] = []
        # The words as native unsigned 64-bit integers: a store through it is one aligned
        # 8-byte store, with none of ``struct.pack_into``'s format parsing (a few are made per
        # request). The file is little-endian, as every platform ringcast runs on (the
        # segment's layout assumes it too).
        if sys.byteorder != "little":
            raise RuntimeError("ringcast's shared counters need a little-endian machine")
        self._words = memoryview(self._mm).cast("Q")

    def bind_row(self, row: int) -> None:
        self._row = row
        self._base = row * ROW_WORDS
        self._vals = list(struct.unpack_from(f"<{ROW_WORDS}Q", self._mm, self._base * 8))

    def inc(self, idx: int, n: int = 1) -> None:
        v = self._vals[idx] + n
        if v < 0:
            v = 0
        self._vals[idx] = v
        self._words[self._base + idx] = v

    def set(self, idx: int, v: int) -> None:
        self._vals[idx] = v
        self._words[self._base + idx] = v

    def own(self, idx: int) -> int:
        """One counter of this process's row, as it last stored it."""
        return self._vals[idx]

    def read_row(self, row: int) -> tuple[int, ...]:
        return struct.unpack_from(f"<{ROW_WORDS}Q", self._mm, row * ROW_WORDS * 8)

    def read(self, row: int, idx: int) -> int:
        """One counter of any row (another process's too)."""
        value: int = struct.unpack_from("<Q", self._mm, (row * ROW_WORDS + idx) * 8)[0]
        return value


def counter_rows(cfg: ServeConfig) -> int:
    return 1 + cfg.http_procs + cfg.job_rows + (cfg.mirror_procs if cfg.clustered else 0)


def http_row(index: int) -> int:
    return 1 + index


def worker_row(cfg: ServeConfig, index: int) -> int:
    return 1 + cfg.http_procs + index


def mirror_row(cfg: ServeConfig, index: int) -> int:
    return 1 + cfg.http_procs + cfg.job_rows + index


def read_mirrors(counters: SharedCounters, cfg: ServeConfig) -> tuple[int, ...]:
    """The node's mirror figures (:class:`MirrorCounter`), its mirror processes' rows combined:
    summed, but the lag in time is the largest (the oldest unmirrored byte of any of them) and
    connected is the smallest (connected only while every process is)."""
    rows = [counters.read_row(mirror_row(cfg, i)) for i in range(cfg.mirror_procs)]

    def combine(idx: int, values: list[int]) -> int:
        if idx == MirrorCounter.LAG_US:
            return max(values, default=0)
        if idx == MirrorCounter.CONNECTED:
            return min(values, default=0)
        return sum(values)

    return tuple(combine(idx, [r[idx] for r in rows]) for idx in range(ROW_WORDS))


def child_row(cfg: ServeConfig, role: str, index: int) -> int:
    """The counter row of HTTP process, worker or mirror process ``index`` (``role``
    "http", "worker" or "mirror")."""
    if role == "mirror":
        return mirror_row(cfg, index)
    return http_row(index) if role == "http" else worker_row(cfg, index)


def loop_of(row: tuple[int, ...]) -> str:
    """The event loop a child's counter row says it runs (``"unknown"`` before it starts)."""
    value = row[ROW_LOOP]
    return LOOP_NAMES[value] if 0 < value < len(LOOP_NAMES) else "unknown"


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """``"uvloop"`` or ``"asyncio"``: whose loop class this is."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def open_child_counters(cfg: ServeConfig, role: str, index: int) -> SharedCounters:
    """A child's counters, bound to its row, with the kind of the running loop stored in the
    row (``ROW_LOOP``) so ``/metrics`` and the manager's start-up line report the loop each
    child really runs. Called by the child's main coroutine, inside its loop."""
    counters = SharedCounters(rundir.counters_path(cfg.run_dir), counter_rows(cfg))
    counters.bind_row(child_row(cfg, role, index))
    counters.set(ROW_LOOP, LOOP_NAMES.index(loop_name(asyncio.get_running_loop())))
    return counters
