"""An HTTP process of ``ringcast serve`` (``python -m ringcast.server.http_process CONFIG
INDEX``, spawned by the supervisor): listens on the shared port with ``SO_REUSEPORT`` and
serves :class:`~ringcast.server.routes.App` through :class:`~ringcast.http.protocol.Connection`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import socket
from pathlib import Path

from ringcast.http.protocol import Connection
from ringcast.server import rundir
from ringcast.server.child import child_main
from ringcast.server.cluster.store import open_cluster_store
from ringcast.server.config import ServeConfig
from ringcast.server.counters import HttpCounter, SharedCounters, open_child_counters
from ringcast.server.jobs import Jobs, load_source
from ringcast.server.passing import Passing
from ringcast.server.routes import App
from ringcast.server.segment_store import open_store
from ringcast.server.steering import apply_spread
from ringcast.server.store import StreamStore

log = logging.getLogger("ringcast.server")

# Connections the kernel may hold for an HTTP process before it accepts them (it caps this at
# net.core.somaxconn). A network blip reconnects every client of a stream at once; with a
# queue of 100 (asyncio's default) the SYNs past the hundredth were dropped and each of those
# clients waited for its retransmission, 1 s and then 3 s.
LISTEN_BACKLOG = 4096


def _bound_socket(cfg: ServeConfig) -> socket.socket:
    """The port, shared with the other HTTP processes; ``create_server`` listens on it."""
    family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
    # IPPROTO_TCP named (not 0): the accepted sockets inherit it, and asyncio's loop sets
    # TCP_NODELAY only on a socket whose protocol says TCP (uvloop on every TCP socket).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((cfg.host, cfg.port))
    sock.setblocking(False)
    return sock


def _steer(fd: int, counters: SharedCounters) -> None:
    """``--spread adaptive``: this port's new connections to as many processes as the
    manager says (:mod:`ringcast.server.steering`). A kernel that refuses is reported once,
    and shown in ``/metrics`` (the kernel then spreads them over all, as ``--spread all``)."""
    try:
        apply_spread(fd, counters)
    except OSError as e:
        if not counters.own(HttpCounter.STEER_REFUSED):
            counters.set(HttpCounter.STEER_REFUSED, 1)
            log.warning(
                "HTTP process: the kernel refused to steer new connections (%s); it spreads "
                "them over every HTTP process (as --spread all)",
                e,
            )


def _adopt(app: App, sock: socket.socket, data: bytes) -> None:
    """A connection a sibling passed here, with the bytes it read of it: served as if this
    process had accepted it."""
    app.track(asyncio.get_running_loop().create_task(_adopted(app, sock, data)))


async def _adopted(app: App, sock: socket.socket, data: bytes) -> None:
    try:
        await asyncio.get_running_loop().connect_accepted_socket(
            lambda: Connection(app, passed_in=data), sock
        )
    except OSError as e:  # closed by its client meanwhile
        sock.close()
        log.debug("a passed connection could not be adopted: %s", e)


async def serve_http(cfg: ServeConfig, index: int) -> None:
    counters = open_child_counters(cfg, "http", index)
    counters.set(HttpCounter.READERS_ACTIVE, 0)
    counters.set(HttpCounter.STEER_REFUSED, 0)
    on_evicted = lambda n: counters.inc(HttpCounter.EVICTIONS_LRU, n)  # noqa: E731
    store: StreamStore = (
        open_cluster_store(cfg, on_evicted, lambda: counters.inc(HttpCounter.REDIS_ERRORS))
        if cfg.clustered
        else open_store(cfg, on_evicted)
    )
    app = App(cfg, index, store, counters)
    loop = asyncio.get_running_loop()
    if cfg.workers == 0:
        # This process runs the jobs it takes (docs/SERVER.md, "Where jobs run"), with the
        # counters of a worker of the same index.
        counters_of_jobs = open_child_counters(cfg, "worker", index)
        jobs = app.jobs = Jobs(cfg, store, counters_of_jobs, *load_source(cfg), own_loop=True)
        jobs.links = app.fanout  # its pumps take the producers' appends through (Pump.link)
        app.track(loop.create_task(jobs.watch_cancel()))
    if cfg.passes_readers:
        # The GETs of streams a sibling produces go there (ringcast.server.passing).
        app.passing = Passing(cfg.run_dir, functools.partial(_adopt, app))
    if cfg.adaptive_coalescing:
        app.track(loop.create_task(app.coalescing.run()))
    if app.durable.peers is not None and index == 0:
        app.track(loop.create_task(app.durable.keep_tombstones()))
    # create_server calls listen() itself, with its own backlog (asyncio's and uvloop's
    # default: 100) unless given one.
    server = await loop.create_server(
        lambda: Connection(app), sock=_bound_socket(cfg), backlog=LISTEN_BACKLOG
    )
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    if cfg.steered:
        steer = functools.partial(_steer, server.sockets[0].fileno(), counters)
        steer()
        loop.add_signal_handler(signal.SIGUSR1, steer)  # before the manager may send it
    Path(rundir.ready_file(cfg.run_dir, "http", index)).write_text(str(os.getpid()))
    log.debug("HTTP process %d listening", index)
    await stop.wait()
    if cfg.steered:
        # A steering signal from now on must not end the process: removing the handler
        # restores the default action (terminate), so the signal is blocked meanwhile.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        loop.remove_signal_handler(signal.SIGUSR1)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
    # Stop accepting, close idle keep-alive connections, end the streams no worker took yet
    # (or, running jobs here, end them all with server_shutdown), let the others end as
    # workers finalize their sessions, then close whatever is left.
    server.close()
    if app.passing is not None:
        app.passing.close()
    app.dispatcher.stop()
    if app.jobs is not None:
        await app.jobs.shutdown()
    for c in list(app.connections):
        if not c.busy and c.transport is not None:
            c.transport.close()
    deadline = loop.time() + 5.0
    while any(c.busy for c in app.connections) and loop.time() < deadline:
        await asyncio.sleep(0.05)
    for c in list(app.connections):
        if c.transport is not None:
            c.transport.abort()


def main(argv: list[str] | None = None) -> None:
    child_main("http", serve_http, argv)


if __name__ == "__main__":
    main()
