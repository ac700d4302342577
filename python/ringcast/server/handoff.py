"""Handing a job to a worker: the least loaded one that takes the connection; if none adopts
it, the HTTP process (still the producer) ends the stream with an in-band error.
"""

from __future__ import annotations

import asyncio
import contextlib

from ringcast.server import rundir
from ringcast.server.config import ServeConfig
from ringcast.server.counters import HttpCounter, SharedCounters, WorkerCounter, worker_row
from ringcast.server.store import StreamWriter, fail_stream
from ringcast.wire.jobs import JOB_ACK_ADOPTED, JOB_ACK_GONE, Job, encode_job

HANDOFF_TIMEOUT = 30.0


class Dispatcher:
    """The hand-offs of one HTTP process."""

    def __init__(self, cfg: ServeConfig, index: int, counters: SharedCounters) -> None:
        self.cfg = cfg
        self.counters = counters
        self.next_worker = index
        # Jobs this process has sent to each worker and not yet seen acknowledged: the
        # worker's own gauge counts a job only once it has adopted it.
        self.handing_off = [0] * cfg.workers
        self.stopping = asyncio.Event()
        """Set when this process stops (:meth:`stop`)."""

    def stop(self) -> None:
        """This process is stopping (SIGTERM; also when the manager died, which takes the
        workers with it): hand-offs waiting for a worker to come back give up at once and end
        their streams, rather than keep them running with this process as their producer
        (nobody else may end a stream whose producer is alive) until it exits."""
        self.stopping.set()

    def worker_order(self) -> list[int]:
        """The workers to offer the next job to, least loaded first: fewest active jobs (the
        gauge each worker keeps in the shared counters, plus this process's hand-offs not yet
        acknowledged). Equal loads are taken in turn, starting one further for every job, so
        an idle pool still spreads its jobs. Other HTTP processes dispatching at the same
        moment cannot see each other's hand-offs until a worker adopts them; the rotation
        keeps such a race from sending them all to one worker."""
        n = self.cfg.workers
        start = self.next_worker % n
        self.next_worker += 1
        load = [
            self.counters.read(worker_row(self.cfg, w), WorkerCounter.ACTIVE) + self.handing_off[w]
            for w in range(n)
        ]
        return sorted(range(n), key=lambda w: (load[w], (w - start) % n))

    async def handoff(self, job: Job, writer: StreamWriter) -> None:
        """Give the job to the least loaded worker that takes the connection (the next one
        if it does not); on failure before adoption, fail the session here."""
        frame = encode_job(job)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10.0
        reason = "no inference worker is available"
        while loop.time() < deadline:
            if writer.cancelled:
                return
            if self.stopping.is_set():
                reason = "the server is shutting down"
                break
            for w in self.worker_order():
                path = rundir.worker_socket(self.cfg.run_dir, w)
                self.handing_off[w] += 1
                try:
                    try:
                        r, wr = await asyncio.open_unix_connection(path)
                    except OSError:
                        continue
                    try:
                        wr.write(frame)
                        ack = await asyncio.wait_for(r.read(1), HANDOFF_TIMEOUT)
                    except (OSError, TimeoutError):
                        ack = b""
                    finally:
                        wr.close()
                finally:
                    self.handing_off[w] -= 1
                if ack in (JOB_ACK_ADOPTED, JOB_ACK_GONE):
                    return
                # The worker may have adopted the job before it failed (the dead-producer sweep
                # ends the session then), so the job is not offered to another one.
                reason = "the inference worker failed before starting the stream"
                break
            else:
                # Every worker is restarting: wait for one, or for this process to stop.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), 0.1)
                continue
            break
        # Still the producer (adoption never happened): end the stream visibly.
        self.counters.inc(HttpCounter.HANDOFF_FAILED)
        stopping = self.stopping.is_set()
        fail_stream(writer, 503, reason, "server_shutdown" if stopping else "worker_unavailable")
