"""The ``ringcast serve`` manager: segment, children, garbage collection, shutdown.

One manager process owns the deployment:

- creates the shared-memory segment, or re-attaches to an existing one of the same layout and
  sizes (so finished streams survive a manager restart or crash);
- reserves the TCP port (a bound, non-listening ``SO_REUSEPORT`` socket) and spawns
  ``--http-procs`` HTTP processes that each listen on it with ``SO_REUSEPORT`` — the kernel
  spreads connections over them — and ``--workers`` inference workers on Unix sockets;
- restarts any child that dies (with back-off if it keeps dying);
- sweeps for sessions whose producer died (``SessionInfo.producer_alive``) every 200 ms, takes
  them over, appends an in-band SSE error event and finalizes them ``failed``;
- collects garbage every second: completed sessions older than ``--ttl``, running sessions
  without progress for ``--idle-timeout``, and — when the table or ``--max-memory`` is nearly
  full — completed sessions least recently used first (running ones only with
  ``--evict-running``);
- on SIGINT/SIGTERM stops the HTTP processes' listeners, lets the workers finalize their
  running sessions with an error event, and removes the segment unless ``--keep-segment``.

Children are separate interpreters (``python -m ringcast.server`` / ``ringcast.worker``), not
forks: the manager maps the segment, and forking a process with a mapped segment and runtime
threads is a trap. They read their configuration from a 0600 JSON file in the run directory
(API key digests and an upstream key must not appear in ``ps``), and die with the manager
(``PR_SET_PDEATHSIG``).

Metrics shared across processes live in a small memory-mapped file of 64-bit counters
(:class:`SharedCounters`): one 128-byte row per process role and index, written only by that
process, summed by whichever HTTP process serves ``/metrics``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import enum
import fcntl
import hashlib
import logging
import math
import mmap
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec

from ringcast._core import Segment, SegmentError, SessionInfo
from ringcast.protocol import error_event, frame_event

log = logging.getLogger("ringcast.manager")

ANON_OWNER = "~anon"
"""Owner namespace of requests without ``X-Conversation-Id``: never listed, never addressable
by clients (their ids are random), cancelled when the client disconnects."""


def owner_for_key(key: str | None) -> str:
    """The owner tag of an API key: a short digest, so the key itself is never stored."""
    if not key:
        return ""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Configuration shared with children


class ServeConfig(msgspec.Struct, kw_only=True):
    host: str = "127.0.0.1"
    port: int = 8080
    http_procs: int = 0
    workers: int = 1
    segment: str = ""
    max_sessions: int = 1024
    session_bytes: int = 4 * 1024 * 1024
    max_id_len: int = 256
    ttl: float = 300.0
    idle_timeout: float = 600.0
    max_memory: int = 0
    evict_running: bool = False
    keep_segment: bool = False
    key_digests: list[str] = msgspec.field(default_factory=list)
    model_name: str = "ringcast-synthetic"
    tokens_per_s: float = 50.0
    prefill_s: float = 0.0
    default_max_tokens: int = 64
    upstream: str = ""
    upstream_api_key: str = ""
    upstream_ca_file: str = ""
    generator: str = ""
    replay: str = ""
    replay_speed: float = 1.0  # 0 = as fast as possible
    max_body: int = 1 << 20
    keepalive_timeout: float = 75.0
    write_timeout: float = 120.0
    sse_ping_interval: float = 30.0
    coalesce_ms: float = 40.0
    coalesce: str = "adaptive"  # or "always"
    cors_origins: list[str] = msgspec.field(default_factory=list)
    run_dir: str = ""
    log_level: str = "INFO"
    event_loop: str = "uvloop"


config_decoder = msgspec.json.Decoder(ServeConfig)


def load_config(path: str) -> ServeConfig:
    with open(path, "rb") as f:
        return config_decoder.decode(f.read())


# --------------------------------------------------------------------------------------------
# Shared counters


class HttpCounter(enum.IntEnum):
    REQUESTS = 0
    ERRORS_4XX = 1
    ERRORS_5XX = 2
    STREAMS_STARTED = 3
    RESUMES = 4
    OFFSETS_LOST = 5
    FELL_BEHIND = 6
    BYTES_SENT = 7
    READERS_ACTIVE = 8
    EVICTIONS_LRU = 9
    HANDOFF_FAILED = 10
    DETACHED = 11
    COALESCE_US = 12
    WRITE_TIMEOUTS = 13


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


ROW_WORDS = 16  # 128 bytes: one row never shares a cache line pair with another process's
ROW_LOOP = ROW_WORDS - 1
"""The last word of every child's row: the event loop it runs, an index into LOOP_NAMES,
written once by :func:`open_child_counters` from inside the running loop."""
LOOP_NAMES = ("", "asyncio", "uvloop")  # 0: not recorded yet

assert max(max(HttpCounter), max(WorkerCounter), max(ManagerCounter)) < ROW_LOOP


class SharedCounters:
    """Rows of 64-bit counters in a shared file; each row has exactly one writing process.

    Row 0 is the manager, rows ``1..H`` the HTTP processes, then the workers. A process keeps
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
        self._vals: list[int] = []

    def bind_row(self, row: int) -> None:
        self._row = row
        base = row * ROW_WORDS * 8
        self._vals = list(struct.unpack_from(f"<{ROW_WORDS}Q", self._mm, base))

    def inc(self, idx: int, n: int = 1) -> None:
        v = self._vals[idx] + n
        if v < 0:
            v = 0
        self._vals[idx] = v
        struct.pack_into("<Q", self._mm, (self._row * ROW_WORDS + idx) * 8, v)

    def set(self, idx: int, v: int) -> None:
        self._vals[idx] = v
        struct.pack_into("<Q", self._mm, (self._row * ROW_WORDS + idx) * 8, v)

    def read_row(self, row: int) -> tuple[int, ...]:
        return struct.unpack_from(f"<{ROW_WORDS}Q", self._mm, row * ROW_WORDS * 8)

    def read(self, row: int, idx: int) -> int:
        """One counter of any row (another process's too)."""
        value: int = struct.unpack_from("<Q", self._mm, (row * ROW_WORDS + idx) * 8)[0]
        return value


def counter_rows(cfg: ServeConfig) -> int:
    return 1 + cfg.http_procs + cfg.workers


def http_row(index: int) -> int:
    return 1 + index


def worker_row(cfg: ServeConfig, index: int) -> int:
    return 1 + cfg.http_procs + index


def child_row(cfg: ServeConfig, role: str, index: int) -> int:
    """The counter row of HTTP process or worker ``index`` (``role`` "http" or "worker")."""
    return http_row(index) if role == "http" else worker_row(cfg, index)


def loop_of(row: tuple[int, ...]) -> str:
    """The event loop a child's counter row says it runs (``"unknown"`` before it starts)."""
    value = row[ROW_LOOP]
    return LOOP_NAMES[value] if 0 < value < len(LOOP_NAMES) else "unknown"


# --------------------------------------------------------------------------------------------
# Helpers used by children too


def die_with_parent() -> None:
    """Ask the kernel to SIGTERM this process when the manager dies (Linux only)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    manager = os.environ.get("RINGCAST_MANAGER_PID")
    if manager and os.getppid() != int(manager):
        # The manager died before prctl took effect.
        os.kill(os.getpid(), signal.SIGTERM)


def child_main(
    role: str,
    serve: Callable[[ServeConfig, int], Coroutine[Any, Any, None]],
    argv: list[str] | None,
) -> None:
    """Entry point of a child process, run as ``python -m ringcast.<module> CONFIG INDEX``."""
    args = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the manager orchestrates shutdown
    die_with_parent()
    cfg = load_config(args[0])
    index = int(args[1])
    logging.basicConfig(
        level=cfg.log_level, format=f"%(asctime)s ringcast.{role}[{index}] %(message)s"
    )
    run_loop(cfg, serve(cfg, index))


def run_loop(cfg: ServeConfig, main: Coroutine[Any, Any, None]) -> None:
    """Run a child's main coroutine on uvloop (default) or the stdlib asyncio loop."""
    if cfg.event_loop == "asyncio":
        asyncio.run(main)
    else:
        import uvloop

        uvloop.run(main)


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """``"uvloop"`` or ``"asyncio"``: whose loop class this is."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def open_child_counters(cfg: ServeConfig, role: str, index: int) -> SharedCounters:
    """A child's counters, bound to its row, with the kind of the running loop stored in the
    row (``ROW_LOOP``) so ``/metrics`` and the manager's start-up line report the loop each
    child really runs. Called by the child's main coroutine, inside its loop."""
    counters = SharedCounters(os.path.join(cfg.run_dir, "counters"), counter_rows(cfg))
    counters.bind_row(child_row(cfg, role, index))
    counters.set(ROW_LOOP, LOOP_NAMES.index(loop_name(asyncio.get_running_loop())))
    return counters


def last_used(info: SessionInfo) -> float:
    """When a completed session was last used: its completion, or a reader attaching after
    it (``last_access_at``; a reader attaches for every GET, resume and replay)."""
    return max(info.completed_at, info.last_access_at)


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


def fail_session(seg: Segment, info: SessionInfo, message: str, type_: str) -> bool:
    """Take over a running session whose producer is dead, append an SSE error event and
    finalize it ``failed``. False if the producer is alive or the session is gone."""
    w = seg.take_over_dead(info.conversation_id, info.owner)
    if w is None:
        return False
    w.write(frame_event(w.total_bytes, error_event(500, message, type_)))
    w.finalize("failed")
    return True


def sweep_dead_producers(seg: Segment, now: float) -> int:
    n = 0
    for info in seg.list():
        if info.is_done:
            continue
        if not info.producer_alive:
            if fail_session(seg, info, "the producer process died", "producer_died"):
                n += 1
        elif info.owner == ANON_OWNER and info.readers == 0 and now - info.started_at > 2.0:
            # An anonymous stream nobody can read any more (its HTTP process died).
            seg.evict_and_cancel(info.conversation_id, info.owner)
    return n


# --------------------------------------------------------------------------------------------
# The manager


class Child:
    def __init__(self, role: str, index: int) -> None:
        self.role = role
        self.index = index
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.backoff = 0.1
        self.restart_at = 0.0


class Manager:
    def __init__(
        self, cfg: ServeConfig, config_path: str, seg: Segment, counters: SharedCounters
    ) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.seg = seg
        self.counters = counters
        self.children = [Child("http", i) for i in range(cfg.http_procs)]
        self.children += [Child("worker", i) for i in range(cfg.workers)]
        self.stopping = False

    # -- children

    def spawn(self, child: Child) -> None:
        module = "ringcast.server" if child.role == "http" else "ringcast.worker"
        env = dict(os.environ, RINGCAST_MANAGER_PID=str(os.getpid()))
        ready = Path(self.cfg.run_dir, f"ready-{child.role}-{child.index}")
        with contextlib.suppress(FileNotFoundError):
            ready.unlink()
        child.proc = subprocess.Popen(
            [sys.executable, "-m", module, self.config_path, str(child.index)],
            env=env,
            stdin=subprocess.DEVNULL,
        )
        child.started = time.monotonic()
        log.debug("started %s %d pid %d", child.role, child.index, child.proc.pid)

    def wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            missing = [
                c
                for c in self.children
                if not Path(self.cfg.run_dir, f"ready-{c.role}-{c.index}").exists()
            ]
            if not missing:
                return True
            for c in missing:
                if c.proc is not None and c.proc.poll() is not None:
                    log.error(
                        "%s process %d exited with %s during start-up",
                        c.role,
                        c.index,
                        c.proc.returncode,
                    )
                    return False
            time.sleep(0.02)
        return False

    def event_loops(self) -> str:
        """The event loop the children run, as they recorded it (see :func:`open_child_counters`):
        one name, or each child's if they differ."""
        names = {
            f"{c.role} {c.index}": loop_of(
                self.counters.read_row(child_row(self.cfg, c.role, c.index))
            )
            for c in self.children
        }
        if len(set(names.values())) == 1:
            return next(iter(names.values()))
        return ", ".join(f"{who}: {name}" for who, name in names.items())

    def check_children(self, now: float) -> None:
        for c in self.children:
            if c.proc is None:
                if now >= c.restart_at:
                    self.spawn(c)
                continue
            rc = c.proc.poll()
            if rc is None:
                continue
            log.warning(
                "%s process %d (pid %d) exited with %s; restarting", c.role, c.index, c.proc.pid, rc
            )
            self.counters.inc(
                ManagerCounter.RESTARTS_HTTP if c.role == "http" else ManagerCounter.RESTARTS_WORKER
            )
            lived = now - c.started
            c.backoff = 0.1 if lived > 5.0 else min(c.backoff * 2, 5.0)
            c.proc = None
            c.restart_at = now + (0.0 if lived > 5.0 else c.backoff)
            if c.role == "worker":
                # Its sessions are orphaned now: fail them at once, not at the next sweep.
                self.sweep()

    # -- collection

    def sweep(self) -> None:
        n = sweep_dead_producers(self.seg, time.time())
        if n:
            log.info("failed %d session(s) whose producer died", n)
            self.counters.inc(ManagerCounter.DEAD_PRODUCERS, n)

    def collect(self) -> None:
        cfg = self.cfg
        now = time.time()
        for info in self.seg.list():
            if info.is_done:
                if now - info.completed_at >= cfg.ttl and self.seg.evict_slot(
                    info.slot, info.generation, "evicted"
                ):
                    self.counters.inc(ManagerCounter.EVICTIONS_TTL)
            elif (
                cfg.idle_timeout > 0
                and now - info.last_write_at >= cfg.idle_timeout
                and self.seg.evict_slot(info.slot, info.generation, "evicted")
            ):
                log.info("evicted a running session idle for %.0f s", cfg.idle_timeout)
                self.counters.inc(ManagerCounter.EVICTIONS_IDLE)
        stats = self.seg.stats()
        headroom = max(1, stats.max_sessions // 16)
        over = stats.sessions_used - (stats.max_sessions - headroom)
        if cfg.max_memory and stats.bytes_buffered > cfg.max_memory:
            over = max(over, 1)
        if over > 0:
            n = evict_lru(self.seg, over, cfg.evict_running)
            if n:
                self.counters.inc(ManagerCounter.EVICTIONS_LRU, n)

    # -- main loop

    def run(self) -> None:
        last_sweep = last_gc = 0.0
        while not self.stopping:
            now = time.monotonic()
            self.check_children(now)
            if now - last_sweep >= 0.2:
                last_sweep = now
                self.sweep()
            if now - last_gc >= 1.0:
                last_gc = now
                self.collect()
            time.sleep(0.05)

    def shutdown(self) -> None:
        """Stop listeners first, then workers (they finalize their sessions), then wait."""
        procs = [c.proc for c in self.children if c.proc is not None]
        for role in ("http", "worker"):
            for c in self.children:
                if c.role == role and c.proc is not None and c.proc.poll() is None:
                    c.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 8.0
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        # Whatever is still running lost its producer: finalize it with an error event.
        for info in self.seg.list():
            if not info.is_done:
                fail_session(self.seg, info, "the server shut down", "server_shutdown")


# --------------------------------------------------------------------------------------------
# ringcast serve


def _reserve_port(host: str, port: int) -> socket.socket:
    """Bind (not listen) with ``SO_REUSEPORT``, after checking that nobody listens there.

    ``SO_REUSEPORT`` lets any process of the same user join a port, so a second server on a
    busy port would silently share its connections; a plain bind first refuses that (and
    resolves port 0).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
        port = probe.getsockname()[1]
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind((host, port))
    return s


def _lock_segment(path: str) -> int | None:
    """An exclusive ``flock`` on the segment file for the manager's lifetime (released by the
    kernel if it dies), so two managers never drive one segment. None if another holds it."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


RUN_DIR_PREFIX = "ringcast-run-"
"""Run directories are ``<tmp>/ringcast-run-<manager pid>-<random>``."""


RUN_DIR_LOCK = "manager.lock"
"""In a run directory: a file its manager holds an exclusive ``flock`` on while it runs."""


def _run_dir_in_use(path: str, pid: int) -> bool:
    """Whether the manager of a run directory still runs: it holds the directory's lock (the
    kernel drops it when the manager dies, whatever pid namespace it lives in). A directory
    without a lock file (its manager is between making it and locking it) falls back to
    whether the pid in its name exists here."""
    try:
        fd = os.open(os.path.join(path, RUN_DIR_LOCK), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True  # held: its manager runs
    finally:
        os.close(fd)
    return False


def lock_run_dir(path: str) -> int:
    """Creates and locks the run directory's lock file; the descriptor stays open (and the
    lock held) for the manager's lifetime."""
    fd = os.open(os.path.join(path, RUN_DIR_LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def sweep_stale_run_dirs(base: str) -> list[str]:
    """Removes the run directories of managers that are gone: a manager killed with ``kill
    -9`` runs no clean-up, and its directory (worker sockets, config, counters) would stay.
    Only this user's directories, and only those whose manager no longer holds their lock
    (see ``_run_dir_in_use``). Returns what it removed."""
    removed: list[str] = []
    try:
        entries = list(os.scandir(base))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(RUN_DIR_PREFIX):
            continue
        try:
            pid = int(entry.name[len(RUN_DIR_PREFIX) :].split("-", 1)[0])
            if not entry.is_dir(follow_symlinks=False):
                continue
            if entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
        except (ValueError, OSError):
            continue
        if _run_dir_in_use(entry.path, pid):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(entry.path)
    return removed


def _default_segment(port: int) -> str:
    base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    return os.path.join(base, f"ringcast-{port}.seg")


# Loopback and wildcard addresses and the IP versions they reach this host by ("::" is
# dual-stack on Linux unless IPV6_V6ONLY is set).
_LOCAL_HOSTS = {
    "localhost": {4, 6},
    "127.0.0.1": {4},
    "0.0.0.0": {4},
    "::1": {6},
    "::": {4, 6},
}


def default_port(scheme: str) -> int:
    """The port an upstream URL of this scheme means when it names none."""
    return 443 if scheme == "https" else 80


def upstream_is_self(upstream: str, host: str, port: int) -> bool:
    """Whether ``upstream`` (already checked by ``check_upstream``) names the address this
    server listens on: the same port, and the same host or local addresses of one IP version.
    Other names of this host (its LAN address, say) are not recognised."""
    u = urlsplit(upstream)
    up_port = u.port or default_port(u.scheme)
    if port == 0 or up_port != port:
        return False
    up_host, host = (u.hostname or "").lower(), host.lower()
    return up_host == host or bool(_LOCAL_HOSTS.get(up_host, set()) & _LOCAL_HOSTS.get(host, set()))


def _read_keys(args: argparse.Namespace) -> list[str]:
    """The API keys; ValueError for an empty key or a key file without one (either would
    start a server with no authentication at all, which the caller evidently did not want)."""
    keys = list(args.api_key or [])
    if any(not k.strip() for k in keys):
        raise ValueError("--api-key is empty")
    if args.api_key_file:
        from_file = []
        with open(args.api_key_file, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line and not line.startswith("#"):
                    from_file.append(line)
        if not from_file:
            raise ValueError(f"--api-key-file {args.api_key_file} holds no key")
        keys += from_file
    env_key = os.environ.get("RINGCAST_API_KEY")
    if env_key is not None:
        if not env_key.strip():
            raise ValueError("$RINGCAST_API_KEY is set but empty")
        keys.append(env_key)
    return keys


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    return ServeConfig(
        host=args.host,
        port=args.port,
        http_procs=args.http_procs or (os.cpu_count() or 1),
        workers=args.workers,
        segment=args.segment or "",
        max_sessions=args.max_sessions,
        session_bytes=args.session_bytes,
        max_id_len=args.max_id_len,
        ttl=args.ttl,
        idle_timeout=args.idle_timeout,
        max_memory=args.max_memory,
        evict_running=args.evict_running,
        keep_segment=args.keep_segment,
        key_digests=[key_digest(k) for k in _read_keys(args)],
        model_name=args.model_name,
        tokens_per_s=args.tokens_per_s,
        prefill_s=args.prefill_s,
        default_max_tokens=args.default_max_tokens,
        upstream=args.upstream or "",
        upstream_api_key=args.upstream_api_key or os.environ.get("RINGCAST_UPSTREAM_KEY", ""),
        upstream_ca_file=os.path.abspath(args.upstream_ca_file) if args.upstream_ca_file else "",
        generator=args.generator or "",
        max_body=args.max_body,
        log_level=args.log_level,
        sse_ping_interval=args.sse_ping_interval,
        write_timeout=args.write_timeout,
        coalesce_ms=args.coalesce_ms,
        coalesce=args.coalesce,
        cors_origins=args.cors_origin or [],
        replay=os.path.abspath(args.replay) if args.replay else "",
        replay_speed=args.speed,
        event_loop=args.event_loop,
    )


def serve(cfg: ServeConfig) -> int:
    logging.basicConfig(level=cfg.log_level, format="%(asctime)s %(name)s %(message)s")
    try:
        reservation = _reserve_port(cfg.host, cfg.port)
    except OSError as e:
        print(
            f"ringcast serve: cannot bind {cfg.host}:{cfg.port}: {e.strerror}; pick another --port",
            file=sys.stderr,
        )
        return 2
    cfg.port = reservation.getsockname()[1]
    cfg.segment = cfg.segment or _default_segment(cfg.port)
    try:
        existed = os.path.exists(cfg.segment)
        seg = Segment.open_or_create(
            cfg.segment,
            max_sessions=cfg.max_sessions,
            session_bytes=cfg.session_bytes,
            max_id_len=cfg.max_id_len,
        )
    except (SegmentError, OSError, ValueError) as e:
        print(f"ringcast serve: cannot use segment {cfg.segment}: {e}", file=sys.stderr)
        return 2
    lock_fd = _lock_segment(cfg.segment)
    if lock_fd is None:
        seg.close()
        print(
            f"ringcast serve: segment {cfg.segment} is in use by another ringcast serve; "
            "stop it or pick another --segment",
            file=sys.stderr,
        )
        return 2
    for stale in sweep_stale_run_dirs(tempfile.gettempdir()):
        log.info("removed %s, left by a manager that was killed", stale)
    cfg.run_dir = tempfile.mkdtemp(prefix=f"{RUN_DIR_PREFIX}{os.getpid()}-")
    run_lock_fd = lock_run_dir(cfg.run_dir)
    config_path = os.path.join(cfg.run_dir, "config.json")
    fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(msgspec.json.encode(cfg))
    counters = SharedCounters(os.path.join(cfg.run_dir, "counters"), counter_rows(cfg), create=True)
    counters.bind_row(0)
    mgr = Manager(cfg, config_path, seg, counters)

    def on_signal(signum: int, frame: Any) -> None:
        mgr.stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    if existed:
        # Re-attached: sessions left running by a previous manager have no producer now.
        mgr.sweep()
    try:
        for c in mgr.children:
            mgr.spawn(c)
        if not mgr.wait_ready(60.0):
            print("ringcast serve: children failed to start", file=sys.stderr)
            mgr.stopping = True
        else:
            print(
                f"ringcast serve: listening on http://{cfg.host}:{cfg.port} "
                f"({cfg.http_procs} HTTP processes, {cfg.workers} workers, "
                f"{mgr.event_loops()} event loop, "
                f"segment {cfg.segment}, {'re-attached' if existed else 'created'})",
                flush=True,
            )
            mgr.run()
    finally:
        mgr.shutdown()
        reservation.close()
        if not cfg.keep_segment:
            with contextlib.suppress(OSError):
                seg.unlink()
        seg.close()
        os.close(lock_fd)
        shutil.rmtree(cfg.run_dir, ignore_errors=True)
        os.close(run_lock_fd)
        log.info("stopped")
    return 0


SERVE_DESCRIPTION = """\
Serve OpenAI-compatible streaming completions whose streams survive disconnects.

A request with an X-Conversation-Id header creates a session: its SSE bytes are kept in a
shared-memory ring, generation continues if the client goes away, and any number of clients
can read it from any byte offset through any HTTP process:

  POST   /v1/chat/completions, /v1/completions   (stream true or false)
  GET    /v1/stream?conv_id=ID&from=N            (or /v1/stream/ID?from=N, or Last-Event-ID)
  POST   /v1/streams/lookup   {"conversation_ids": [...]}
  GET    /v1/streams[?conversation_id=X]         (only the caller's key's sessions)
  DELETE /v1/stream?conv_id=ID                   (cancel; 204 also for unknown ids)
  GET    /health, /v1/models, /metrics

Without --upstream or --generator the workers run a synthetic model (deterministic text at
--tokens-per-s), which is handy for testing clients and for benchmarks.
"""

SERVE_EPILOG = """\
examples:
  ringcast serve --port 8080
  ringcast serve --upstream http://127.0.0.1:8081 --workers 2 --api-key-file keys.txt
      (llama-server started with --port 8081, since ringcast takes llama-server's 8080)
  ringcast serve --generator mypkg.model:generate --ttl 600 --keep-segment

Each SSE event carries `id: <byte offset after it>`, so a client resumes with
from=<bytes received> or Last-Event-ID. An offset that was dropped answers 410 with the first
available offset; one past the end of a finished stream, 416 with its length. Sessions belong
to the API key that created them.
"""


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``ringcast serve``."""
    net = parser.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="address to listen on (%(default)s)")
    net.add_argument(
        "--port",
        type=int,
        default=8080,
        help="TCP port, shared by all HTTP processes, llama-server's default; 0 = pick a "
        "free one (%(default)s)",
    )
    net.add_argument(
        "--http-procs",
        type=int,
        default=0,
        metavar="N",
        help="HTTP processes sharing the port via SO_REUSEPORT (default: one per CPU core)",
    )
    net.add_argument(
        "--max-body",
        type=int,
        default=1 << 20,
        metavar="BYTES",
        help="largest request body accepted; larger gets 413 (%(default)s)",
    )
    net.add_argument(
        "--write-timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="close a connection whose client has read nothing for this long while its "
        "write buffer is full, releasing its reader (%(default)s)",
    )
    net.add_argument(
        "--coalesce-ms",
        type=float,
        default=40.0,
        metavar="MS",
        help="the most a stream's next write to its readers waits for more bytes to send "
        "along (one send per client per write is the cost of fan-out); only streams whose "
        "events come faster than half the wait are held; adaptive waits up to half of it "
        "while a process is behind and all of it while far behind; 0 = never wait "
        "(%(default)s)",
    )
    net.add_argument(
        "--coalesce",
        choices=["adaptive", "always"],
        default="adaptive",
        help="adaptive: wait only while this HTTP process falls behind (event-loop lag), "
        "from 0 when it keeps up to --coalesce-ms; always: wait --coalesce-ms (%(default)s)",
    )
    net.add_argument(
        "--cors-origin",
        action="append",
        metavar="ORIGIN",
        help="allow browser pages from this origin (or '*') to call the API; "
        "repeatable. Default: no CORS headers",
    )
    auth = parser.add_argument_group("authentication")
    auth.add_argument(
        "--api-key",
        action="append",
        metavar="KEY",
        help="accept this key (Bearer or X-Api-Key); repeatable. Sessions are "
        "namespaced per key. Also read from $RINGCAST_API_KEY",
    )
    auth.add_argument(
        "--api-key-file", metavar="PATH", help="file with one key per line (# comments allowed)"
    )
    model = parser.add_argument_group("generation")
    model.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="inference worker processes (%(default)s)",
    )
    model.add_argument(
        "--upstream",
        metavar="URL",
        help="proxy to this OpenAI-compatible server instead of the synthetic model: "
        "http://HOST[:PORT][/PATH] (e.g. llama-server) or https://... (certificates "
        "checked against the system's CAs)",
    )
    model.add_argument(
        "--upstream-ca-file",
        metavar="PEM",
        help="trust the CA certificates in this PEM file (instead of the system's) for an "
        "https upstream, e.g. a private CA or a self-signed server",
    )
    model.add_argument(
        "--upstream-api-key",
        metavar="KEY",
        help="Bearer key sent upstream (or $RINGCAST_UPSTREAM_KEY)",
    )
    model.add_argument(
        "--generator",
        metavar="MODULE:FUNC",
        help="your async generator of text pieces; see ringcast.worker",
    )
    from ringcast.replay import speed_arg

    model.add_argument(
        "--replay",
        metavar="TRACE",
        help="answer requests by replaying a recorded trace (ringcast record, "
        "ringcast trace synth) at recorded pace; see docs/REPLAY.md",
    )
    model.add_argument(
        "--speed",
        type=speed_arg,
        default=1.0,
        metavar="X|max",
        help="with --replay: X times the recorded pace, or max (%(default)s)",
    )
    model.add_argument(
        "--model-name",
        default="ringcast-synthetic",
        help="model id reported by /v1/models (%(default)s)",
    )
    model.add_argument(
        "--tokens-per-s",
        type=float,
        default=50.0,
        help="synthetic model speed; 0 = as fast as possible (%(default)s)",
    )
    model.add_argument(
        "--prefill-s",
        type=float,
        default=0.0,
        help="synthetic prompt-processing delay before the first token",
    )
    model.add_argument(
        "--sse-ping-interval",
        type=float,
        default=30.0,
        metavar="S",
        help="append ': ping' to a running stream silent for this long, so slow "
        "prefills do not look dead; 0 = never (%(default)s)",
    )
    model.add_argument(
        "--default-max-tokens",
        type=int,
        default=64,
        help="synthetic tokens when the request sets no max_tokens",
    )
    store = parser.add_argument_group("sessions and memory")
    store.add_argument(
        "--segment",
        metavar="PATH",
        help="segment file (default /dev/shm/ringcast-<port>.seg); an existing "
        "segment with the same sizes is re-attached",
    )
    store.add_argument(
        "--max-sessions", type=int, default=1024, help="session table slots (%(default)s)"
    )
    store.add_argument(
        "--session-bytes",
        type=int,
        default=4 * 1024 * 1024,
        help="ring size per session; older bytes are dropped (%(default)s)",
    )
    store.add_argument(
        "--max-id-len", type=int, default=256, help="longest conversation id in bytes (%(default)s)"
    )
    store.add_argument(
        "--ttl", type=float, default=300.0, help="seconds a completed session is kept (%(default)s)"
    )
    store.add_argument(
        "--idle-timeout",
        type=float,
        default=600.0,
        help="evict a running session without progress for this long; 0 = never (%(default)s)",
    )
    store.add_argument(
        "--max-memory",
        type=int,
        default=0,
        metavar="BYTES",
        help="evict completed sessions (LRU) above this many buffered bytes",
    )
    store.add_argument(
        "--evict-running",
        action="store_true",
        help="when full, evict running sessions too (after completed ones)",
    )
    store.add_argument(
        "--keep-segment",
        action="store_true",
        help="keep the segment file at shutdown, so a restart re-attaches",
    )
    parser.add_argument(
        "--event-loop",
        default="uvloop",
        choices=["uvloop", "asyncio"],
        help="event loop of the HTTP processes and workers (%(default)s)",
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )


def _run(args: argparse.Namespace) -> int:
    for name in ("http_procs", "workers", "max_sessions", "session_bytes", "max_body"):
        if getattr(args, name) < 0:
            print(f"ringcast serve: --{name.replace('_', '-')} must be >= 0", file=sys.stderr)
            return 2
    if args.workers == 0:
        print("ringcast serve: --workers must be at least 1", file=sys.stderr)
        return 2
    if not 0 < args.write_timeout < math.inf:
        print(
            f"ringcast serve: --write-timeout must be a number of seconds > 0 "
            f"(got {args.write_timeout})",
            file=sys.stderr,
        )
        return 2
    if not 0 <= args.coalesce_ms <= 1000:
        print("ringcast serve: --coalesce-ms must be between 0 and 1000", file=sys.stderr)
        return 2
    if args.speed != 1.0 and not args.replay:
        print("ringcast serve: --speed only applies with --replay TRACE", file=sys.stderr)
        return 2
    if args.upstream and args.generator:
        print(
            "ringcast serve: --upstream and --generator both choose what the workers run; give one",
            file=sys.stderr,
        )
        return 2
    if args.upstream or args.upstream_ca_file:
        from ringcast.worker import check_upstream

        if (problem := check_upstream(args.upstream or "", args.upstream_ca_file)) is not None:
            print(f"ringcast serve: {problem}", file=sys.stderr)
            return 2
        if args.upstream and upstream_is_self(args.upstream, args.host, args.port):
            # Easy to do now that the default port is llama-server's: every job would proxy
            # to this server again, each one a new request.
            print(
                f"ringcast serve: --upstream {args.upstream} is this server's own address "
                f"(--port {args.port}); run the model server on another port (e.g. "
                "llama-server --port 8081) or give ringcast another --port",
                file=sys.stderr,
            )
            return 2
    if args.replay:
        from ringcast.replay import check_trace

        if (problem := check_trace(args.replay)) is not None:
            print(f"ringcast serve: --replay: {problem}", file=sys.stderr)
            return 2
    try:
        cfg = config_from_args(args)
    except OSError as e:
        print(f"ringcast serve: cannot read --api-key-file: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"ringcast serve: {e}", file=sys.stderr)
        return 2
    return serve(cfg)


def register(subparsers: Any) -> None:
    """Add ``serve`` to the ``ringcast`` command line (see ``ringcast.cli``)."""
    p = subparsers.add_parser(
        "serve",
        help="run the resumable streaming server",
        description=SERVE_DESCRIPTION,
        epilog=SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    configure(p)
    p.set_defaults(func=_run)


__all__ = [
    "ANON_OWNER",
    "ServeConfig",
    "SharedCounters",
    "evict_lru",
    "owner_for_key",
    "register",
    "serve",
]
