"""The supervisor of ``ringcast serve`` (the "manager" process): segment, children, garbage
collection, shutdown.

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

Children are separate interpreters (``python -m ringcast.server.http_process`` /
``ringcast.server.worker``), not
forks: the manager maps the segment, and forking a process with a mapped segment and runtime
threads is a trap. They read their configuration from a 0600 JSON file in the run directory
(API key digests and an upstream key must not appear in ``ps``), and die with the manager
(``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

from ringcast._core import Segment, SegmentError
from ringcast.server import gc, rundir
from ringcast.server.child import STARTUP_REFUSED
from ringcast.server.config import ServeConfig, default_max_sessions, dump_config
from ringcast.server.counters import (
    ManagerCounter,
    SharedCounters,
    child_row,
    counter_rows,
    loop_of,
)
from ringcast.server.durable_meta import DurableMeta, is_durable_owner, meta_path
from ringcast.server.steering import Steering

log = logging.getLogger("ringcast.manager")

CHILD_MODULES = {
    "http": "ringcast.server.http_process",
    "worker": "ringcast.server.worker",
    "mirror": "ringcast.server.cluster.mirror",
}
RESTARTS = {
    "http": ManagerCounter.RESTARTS_HTTP,
    "worker": ManagerCounter.RESTARTS_WORKER,
    "mirror": ManagerCounter.RESTARTS_MIRROR,
}
"""The module each child role runs as (``python -m MODULE CONFIG INDEX``)."""


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
        self,
        cfg: ServeConfig,
        config_path: str,
        seg: Segment,
        counters: SharedCounters,
        meta: DurableMeta,
    ) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.seg = seg
        self.counters = counters
        self.meta = meta
        self.children = [Child("http", i) for i in range(cfg.http_procs)]
        self.children += [Child("worker", i) for i in range(cfg.workers)]
        if cfg.clustered:
            self.children += [Child("mirror", i) for i in range(cfg.mirror_procs)]
        self.steering = (
            Steering(cfg.http_procs, counters, cfg.adaptive_coalescing) if cfg.steered else None
        )
        self.stopping = False
        self.refused = False
        """A child refused to start and said why (:data:`STARTUP_REFUSED`)."""

    # -- children

    def spawn(self, child: Child) -> None:
        module = CHILD_MODULES[child.role]
        env = dict(os.environ, RINGCAST_MANAGER_PID=str(os.getpid()))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(rundir.ready_file(self.cfg.run_dir, child.role, child.index))
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
                if not os.path.exists(rundir.ready_file(self.cfg.run_dir, c.role, c.index))
            ]
            if not missing:
                return True
            for c in missing:
                if c.proc is not None and c.proc.poll() is not None:
                    if c.proc.returncode == STARTUP_REFUSED:
                        self.refused = True  # it said why
                        return False
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
            self.counters.inc(RESTARTS[c.role])
            if c.role == "http":  # its inbox of passed connections, if it had one
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(rundir.connection_socket(self.cfg.run_dir, c.proc.pid))
            lived = now - c.started
            c.backoff = 0.1 if lived > 5.0 else min(c.backoff * 2, 5.0)
            c.proc = None
            c.restart_at = now + (0.0 if lived > 5.0 else c.backoff)
            if c.role in ("worker", "http"):
                # The sessions it produced (a worker's; an HTTP process's that it had not
                # handed off yet, or all of its own with --workers 0) are orphaned now: fail
                # them at once, not at the next sweep.
                self.sweep()

    def http_listening(self) -> dict[int, tuple[int, bool]]:
        """The pids of the running HTTP processes, each with its index and whether it
        listens yet."""
        return {
            c.proc.pid: (
                c.index,
                os.path.exists(rundir.ready_file(self.cfg.run_dir, c.role, c.index)),
            )
            for c in self.children
            if c.role == "http" and c.proc is not None and c.proc.poll() is None
        }

    # -- collection

    def sweep(self) -> None:
        gc.sweep(self.seg, self.counters)

    def collect(self) -> None:
        gc.collect(self.seg, self.cfg, self.counters, self.meta)

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
            if self.steering is not None:
                self.steering.tick(now, self.http_listening)
            time.sleep(0.05)

    def shutdown(self) -> None:
        """Stop listeners first, then workers (they finalize their sessions), then wait; the
        mirror last, so that it copies every stream's end to Redis."""
        self._stop([c for c in self.children if c.role in ("http", "worker")], 8.0)
        # Whatever is still running lost its producer: finalize it with an error event.
        for info in self.seg.list():
            if not info.is_done and not is_durable_owner(info.owner):
                gc.fail_session(
                    self.seg,
                    info.conversation_id,
                    info.owner,
                    "the server shut down",
                    "server_shutdown",
                )
        # Mirror 0 last: it gives up the node's lease once its own ends are in Redis, and the
        # other mirrors' must be there before (or they would end node_lost elsewhere).
        self._stop([c for c in self.children if c.role == "mirror" and c.index > 0], 8.0)
        self._stop([c for c in self.children if c.role == "mirror" and c.index == 0], 8.0)

    @staticmethod
    def _stop(children: list[Child], timeout: float) -> None:
        procs = [c.proc for c in children if c.proc is not None]
        for role in ("http", "worker", "mirror"):
            for c in children:
                if c.role == role and c.proc is not None and c.proc.poll() is None:
                    c.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def default_advertise_url(host: str, port: int) -> str:
    """``http://host:port``; a wildcard address is no address to reach: the host name."""
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = socket.gethostname()
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


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


WORKING_SET_RINGS = 256
"""Full rings a table of the default size should find room for beside its own pages. A
default table (1,048,576 slots x 4 MiB, sparse) never fits in full and is not meant to: what
must fit is the table (session records, reader counts, index) and the rings of the sessions
actually buffered, which the LRU keeps near what the machine serves; 256 full 4 MiB rings
(1 GiB) is a busy server's worth."""


def say_whether_the_segment_fits(seg: Segment, path: str, explicit: bool) -> None:
    """Warn at start when the segment's filesystem is too small for what it should hold (the
    file is sparse, so it starts anyway; the core refuses one that cannot hold even one full
    ring). A table sized on the command line (``explicit``) should hold every ring full; a
    default-sized one its table pages and :data:`WORKING_SET_RINGS` full rings."""
    st = seg.stats()
    vfs = os.statvfs(os.path.dirname(os.path.abspath(path)))
    free = vfs.f_bavail * vfs.f_frsize
    page = os.sysconf("SC_PAGE_SIZE")
    ring = -(-st.session_bytes // page) * page
    table = st.file_bytes - ring * st.max_sessions
    mib = 1 << 20
    advice = (
        "A stream that finds it full ends with an error event (no_memory); the others go on. "
        "To avoid it, give the filesystem more room (Docker: --shm-size) or lower "
        "--max-sessions or --session-bytes"
    )
    if explicit:
        more = st.file_bytes - st.resident_bytes
        if more > free:
            log.warning(
                "segment %s may need %d MiB more when all %d sessions' rings are full, and "
                "its filesystem has %d MiB free: about %d full rings fit. %s",
                *(path, more // mib, st.max_sessions, free // mib, free // max(ring, 1), advice),
            )
        return
    table_more = max(0, table - st.resident_bytes)
    if table_more > free:
        log.warning(
            "segment %s may need %d MiB more for its table of %d sessions alone (session "
            "records, reader counts, index), and its filesystem has %d MiB free. %s",
            *(path, table_more // mib, st.max_sessions, free // mib, advice),
        )
        return
    rings = min(st.max_sessions, WORKING_SET_RINGS)
    more = max(0, table + rings * ring - st.resident_bytes)
    if more > free:
        log.warning(
            "segment %s may need %d MiB more for its table and %d full rings, and its "
            "filesystem has %d MiB free: about %d full rings fit beside the table. %s",
            *(path, more // mib, rings, free // mib, (free - table_more) // max(ring, 1), advice),
        )


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


def _default_segment(port: int) -> str:
    base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    return os.path.join(base, f"ringcast-{port}.seg")


def serve(cfg: ServeConfig) -> int:
    logging.basicConfig(level=cfg.log_level, format="%(asctime)s %(name)s %(message)s")
    try:
        reservation = _reserve_port(cfg.host, cfg.port)
    except socket.gaierror as e:
        print(
            f"ringcast serve: cannot listen on --host {cfg.host}: {e.strerror}; give an address "
            "of this machine (e.g. 127.0.0.1, 0.0.0.0, ::) or a name that resolves to one",
            file=sys.stderr,
        )
        return 2
    except OSError as e:
        hint = (
            "give an address of this machine as --host"
            if e.errno == errno.EADDRNOTAVAIL
            else "pick another --port"
        )
        print(
            f"ringcast serve: cannot bind {cfg.host}:{cfg.port}: {e.strerror}; {hint}",
            file=sys.stderr,
        )
        return 2
    cfg.port = reservation.getsockname()[1]
    cfg.segment = cfg.segment or _default_segment(cfg.port)
    if cfg.clustered:
        cfg.node_id = cfg.node_id or f"{socket.gethostname()}:{cfg.port}"
        cfg.advertise_url = cfg.advertise_url or default_advertise_url(cfg.host, cfg.port)
        cfg.node_instance = secrets.token_hex(8)
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
    say_whether_the_segment_fits(
        seg, cfg.segment, explicit=cfg.max_sessions != default_max_sessions(cfg.session_bytes)
    )
    lock_fd = _lock_segment(cfg.segment)
    if lock_fd is None:
        seg.close()
        print(
            f"ringcast serve: segment {cfg.segment} is in use by another ringcast serve; "
            "stop it or pick another --segment",
            file=sys.stderr,
        )
        return 2
    for stale in rundir.sweep_stale_run_dirs(tempfile.gettempdir()):
        log.info("removed %s, left by a manager that was killed", stale)
    cfg.run_dir = tempfile.mkdtemp(prefix=f"{rundir.RUN_DIR_PREFIX}{os.getpid()}-")
    run_lock_fd = rundir.lock_run_dir(cfg.run_dir)
    config_path = rundir.config_path(cfg.run_dir)
    fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(dump_config(cfg))
    counters = SharedCounters(rundir.counters_path(cfg.run_dir), counter_rows(cfg), create=True)
    counters.bind_row(0)
    # Opened before any child: a segment of another epoch starts with an empty database.
    meta = DurableMeta(meta_path(cfg.segment), seg.epoch)
    mgr = Manager(cfg, config_path, seg, counters, meta)

    def on_signal(signum: int, frame: Any) -> None:
        mgr.stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    failed = False
    if existed:
        # Re-attached: sessions left running by a previous manager have no producer now.
        mgr.sweep()
    try:
        for c in mgr.children:
            mgr.spawn(c)
        if not mgr.wait_ready(60.0):
            if not mgr.refused:
                print("ringcast serve: children failed to start", file=sys.stderr)
            mgr.stopping = True
            failed = True
        else:
            jobs_where = "jobs run in " + ("them" if cfg.http_procs > 1 else "it")
            print(
                f"ringcast serve: listening on http://{cfg.host}:{cfg.port} "
                f"({_count(cfg.http_procs, 'HTTP process')}, "
                + ("new connections to as few as keep up, " if mgr.steering is not None else "")
                + (_count(cfg.workers, "worker") if cfg.workers else jobs_where)
                + ", "
                f"{mgr.event_loops()} event loop, "
                f"segment {cfg.segment}, {'re-attached' if existed else 'created'}"
                + (
                    f"; node {cfg.node_id} mirrored to "
                    f"{'a Redis Cluster' if cfg.redis_cluster else 'Redis'} by "
                    f"{_count(cfg.mirror_procs, 'mirror process')}"
                    if cfg.clustered
                    else ""
                )
                + ")",
                flush=True,
            )
            mgr.run()
    finally:
        mgr.shutdown()
        reservation.close()
        meta.close()
        if not cfg.keep_segment:
            with contextlib.suppress(OSError):
                seg.unlink()
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(OSError):
                    os.unlink(meta_path(cfg.segment) + suffix)
        seg.close()
        os.close(lock_fd)
        shutil.rmtree(cfg.run_dir, ignore_errors=True)
        os.close(run_lock_fd)
        if not failed:
            log.info("stopped")
    return (STARTUP_REFUSED if mgr.refused else 1) if failed else 0


def _count(n: int, what: str) -> str:
    """``1 worker``, ``2 workers``, ``2 mirror processes``."""
    return f"{n} {what}" if n == 1 else f"{n} {what}{'es' if what.endswith('s') else 's'}"
