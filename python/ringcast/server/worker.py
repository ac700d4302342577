"""Inference workers of ``ringcast serve --workers N``: processes that run the jobs apart from
the HTTP processes (:mod:`.jobs` runs them; with ``--workers 0``, the default, the HTTP
processes run their own).

A worker (``python -m ringcast.server.worker CONFIG INDEX``, spawned by the manager) listens on a
Unix socket for jobs from the HTTP processes, adopts each job's session
(``Segment.adopt``), answers ``A`` and then generates on its own: the HTTP process and its
client may go away, the generation continues until it ends or the session is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

import msgspec

from ringcast._core import RingcastError, SessionEnded, SessionNotFound
from ringcast.http.logs import log_failure
from ringcast.server import rundir
from ringcast.server.child import child_main
from ringcast.server.config import ServeConfig
from ringcast.server.counters import open_child_counters
from ringcast.server.jobs import Jobs, load_source, log
from ringcast.server.segment_store import open_store
from ringcast.wire.jobs import (
    JOB_ACK_ADOPTED,
    JOB_ACK_GONE,
    LENGTH_SIZE,
    decode_job,
    frame_length,
)


class WorkerApp(Jobs):
    """A worker process's jobs, and the socket they come in on."""

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            n = frame_length(await r.readexactly(LENGTH_SIZE))
            job = decode_job(await r.readexactly(n))
        except (asyncio.IncompleteReadError, msgspec.DecodeError):
            w.close()
            return
        if self.shutting_down:
            w.close()  # the HTTP process fails the session itself
            return
        try:
            writer = self.store.adopt(job.conversation_id, job.owner, job.generation)
        except (SessionNotFound, SessionEnded):
            w.write(JOB_ACK_GONE)
            w.close()
            return
        except RingcastError as e:
            log_failure(log, "could not adopt a session", e)
            w.close()  # no ack: the HTTP process fails the session itself
            return
        self.start_job(job, writer)
        w.write(JOB_ACK_ADOPTED)
        with contextlib.suppress(OSError):
            await w.drain()
        w.close()


async def serve_worker(cfg: ServeConfig, index: int) -> None:
    store = open_store(cfg)
    app = WorkerApp(cfg, store, open_child_counters(cfg, "worker", index), *load_source(cfg))
    path = rundir.worker_socket(cfg.run_dir, index)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # Before the first job can arrive: a SIGTERM's default action would kill the worker with
    # the jobs it adopted still running, ended only by a manager's sweep (if one is left).
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    server = await asyncio.start_unix_server(app.handle, path)
    watcher = loop.create_task(app.watch_cancel())
    Path(rundir.ready_file(cfg.run_dir, "worker", index)).write_text(str(os.getpid()))
    await stop.wait()
    server.close()
    await app.shutdown()
    watcher.cancel()


def main(argv: list[str] | None = None) -> None:
    child_main("worker", serve_worker, argv)


if __name__ == "__main__":
    main()
