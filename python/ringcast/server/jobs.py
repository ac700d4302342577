"""Running jobs: the producers that append a stream's SSE bytes, in the HTTP process that took
the request (``--workers 0``, the default) or in a worker process (:mod:`.worker`).

A job adopted by this process (made here, or handed over and ``Segment.adopt``-ed) generates
on its own: the client that asked may go away, the generation continues until it ends or the
session is cancelled. Cancellation (DELETE, replacement, eviction, an anonymous client's
disconnect) is seen at once by a job's next append (refused), and by polling every active
job's ``Writer.cancelled`` (an atomic load each, one call into the store for all of them)
every 100 ms, so it stops a job also while it waits for its first token or for an upstream
server. (A 20 ms poll cost a thousand silent streams more CPU in loop wake-ups than the
latency it saved was worth.)

Four sources of tokens:

- the **synthetic model** (default): deterministic text derived from the prompt, paced at
  ``--tokens-per-s`` after an optional ``--prefill-s``, honouring ``max_tokens``;
- the **upstream proxy** (``--upstream URL``): see :mod:`ringcast.server.upstream`;
- a **plug-in** (``--generator module:function``): see :mod:`ringcast.server.plugin`;
- a **recorded trace** (``--replay trace.jsonl``): see :mod:`ringcast.trace`.

Every event is framed ``id: <offset after it>\\n...`` (see ``ringcast.wire.sse.frame_event``).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Protocol

from ringcast._core import SegmentError, Writer
from ringcast.http.logs import log_failure
from ringcast.server import rundir
from ringcast.server.child import STARTUP_REFUSED
from ringcast.server.config import ServeConfig
from ringcast.server.counters import SharedCounters, WorkerCounter
from ringcast.server.emitter import Emitter, Gone, TurnBatch
from ringcast.server.plugin import GenerateFn, JobContext, load_generator
from ringcast.server.store import MakesRoom, StreamStore, StreamWriter, fail_stream
from ringcast.server.synthetic import Ticker, synthetic_model
from ringcast.server.upstream import proxy_upstream
from ringcast.server.upstream_link import (
    UPSTREAM_READ_TIMEOUT,
    UpstreamError,
    upstream_read_timeout,
)
from ringcast.wire.jobs import Job
from ringcast.wire.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_request_decoder,
    completion_request_decoder,
)

log = logging.getLogger("ringcast.jobs")

CANCEL_POLL = 0.1
PING_CHECK_FRACTION = 0.05
PING_CHECK_MAX = 0.5
PING_EVENT = b": ping\n\n"


def _ping(writer: StreamWriter) -> bool:
    """Appends a keep-alive comment; False if the stream is no longer this writer's, or if
    there is no memory for it (the job's own next write then fails the stream)."""
    try:
        return writer.write(PING_EVENT, progress=False)
    except SegmentError:
        return False


class ProducerLinks(Protocol):
    """What learns of the producers of a process's jobs (``ringcast.server.fanout.FanOut``)."""

    def producer_started(self, key: tuple[int, int], producer: Emitter) -> None: ...
    def producer_ended(self, key: tuple[int, int], producer: Emitter) -> None: ...


class Jobs:
    """The jobs of one process, each a task of its loop: an HTTP process's with ``--workers
    0``, or a worker's (:class:`ringcast.server.worker.WorkerApp`, which adds the socket
    jobs arrive on)."""

    def __init__(
        self,
        cfg: ServeConfig,
        store: StreamStore,
        counters: SharedCounters,
        generate: GenerateFn | None,
        upstream_read_timeout: float = UPSTREAM_READ_TIMEOUT,
        own_loop: bool = False,
    ) -> None:
        self.cfg = cfg
        self.own_loop = own_loop
        """The jobs' readers share this loop (an HTTP process running its own jobs): the
        appends of a turn wake them directly (:class:`TurnBatch`)."""
        self.store = store
        self.counters = counters
        counters.set(WorkerCounter.ACTIVE, 0)
        self.generate = generate
        self.upstream_read_timeout = upstream_read_timeout
        self.active: dict[asyncio.Task[None], StreamWriter] = {}
        self.links: ProducerLinks | None = None
        """Where the jobs' producers are announced to the pumps of this process (an HTTP
        process that runs its own jobs: its ``FanOut``), so they can write through."""
        self.shutting_down = False
        self._batch: TurnBatch | None = None
        self._ticker: Ticker | None = None
        self._job_started: asyncio.Future[None] | None = None
        """What :meth:`watch_cancel` awaits while no job runs."""

    @property
    def batch(self) -> TurnBatch:
        """The appends of every job of this worker share one :class:`TurnBatch` (made on the
        worker's loop, at its first job)."""
        if self._batch is None:
            self._batch = TurnBatch(self.store, self.counters, self.own_loop)
        return self._batch

    def run_here(self, job: Job, writer: StreamWriter) -> None:
        """Run a job whose session this process made and so produces already (an HTTP
        process with ``--workers 0``); once this process is stopping, end the stream with
        ``server_shutdown`` instead, as a hand-off that finds no worker does."""
        if self.shutting_down:
            self._fail(writer, 503, "the server is shutting down", "server_shutdown")
            return
        self.start_job(job, writer)

    def start_job(self, job: Job, writer: StreamWriter) -> asyncio.Task[None]:
        """Run an adopted job in a task of its own, counted in :attr:`active`."""
        task = asyncio.get_running_loop().create_task(self.run_job(job, writer))
        self.active[task] = writer
        waiting = self._job_started
        if waiting is not None and not waiting.done():
            waiting.set_result(None)  # watch_cancel polls again
        self.counters.inc(WorkerCounter.ACTIVE)
        task.add_done_callback(self._job_done)
        return task

    def _job_done(self, task: asyncio.Task[None]) -> None:
        writer = self.active.pop(task, None)
        self.counters.inc(WorkerCounter.ACTIVE, -1)
        if task.cancelled() and writer is not None:
            # Cancelled before its first step (a shutdown right after the adoption), so none
            # of run_job's handlers ran: end the stream as they would have. Else it would stay
            # running with this process, soon gone, as its producer until a manager's sweep.
            if self.shutting_down and not writer.cancelled:
                self._fail(writer, 503, "the server is shutting down", "server_shutdown")
            else:
                self.counters.inc(WorkerCounter.JOBS_CANCELLED)

    async def run_job(self, job: Job, writer: StreamWriter) -> None:
        """Runs one job to its end (every way it can end is handled here). A generator's
        loop is inline: each token resumes this coroutine and the generator's, no other."""
        self.counters.inc(WorkerCounter.JOBS_STARTED)
        emitter = Emitter(writer, job.route, self.cfg.model_name, self.counters, batch=self.batch)
        links = self.links
        key = None
        if links is not None and isinstance(writer, Writer):
            # The session's pump in this process takes the appends through (Pump.link).
            key = (writer.slot, writer.generation)
            links.producer_started(key, emitter)
        try:
            if self.generate is None and self.cfg.upstream:
                await proxy_upstream(self.cfg, job, emitter, self.upstream_read_timeout)
            else:
                ctx = self._context(job, writer)
                if self.generate is None and self.cfg.tokens_per_s > 0:
                    # The paced synthetic model: every stream of this worker on one Ticker.
                    if self._ticker is None:
                        self._ticker = Ticker(self.cfg.tokens_per_s, self.cfg.prefill_s)
                    mt = ctx.max_tokens
                    await self._ticker.run(
                        ctx, emitter, self.cfg.default_max_tokens if mt is None else mt
                    )
                    emitter.finish(ctx.finish_reason, len(ctx.prompt_text().split()))
                else:
                    gen_fn = self.generate or synthetic_model(self.cfg)
                    # A generator marked ``ringcast_raw_stream`` yields a whole stream's SSE
                    # events (e.g. a recorded one, ringcast.replay): no role chunk, final
                    # chunk or [DONE] of ours.
                    raw = getattr(gen_fn, "ringcast_raw_stream", False)
                    gen = gen_fn(ctx)
                    try:
                        async for piece in gen:
                            if isinstance(piece, str):
                                emitter.token(piece)
                            else:
                                if not raw:
                                    emitter.start()
                                emitter.raw(piece)
                                emitter.count_token()
                    finally:
                        await gen.aclose()  # type: ignore[attr-defined]
                    if not raw:
                        emitter.finish(ctx.finish_reason, len(ctx.prompt_text().split()))
            self.batch.finalize(writer)
            self.counters.inc(WorkerCounter.JOBS_DONE)
        except (Gone, asyncio.CancelledError):
            if self.shutting_down and not writer.cancelled:
                self._fail(writer, 503, "the server is shutting down", "server_shutdown")
            else:
                self.counters.inc(WorkerCounter.JOBS_CANCELLED)
        except UpstreamError as e:
            self._fail(writer, e.code, str(e), "upstream_error")
        except SegmentError as e:
            # The shared-memory filesystem is full: this stream fails, the others run on, and
            # finished streams give their pages back so that the next ones have room (else
            # every stream after it failed the same way until their --ttl).
            log.warning("a stream failed: %s", e)
            self._fail(writer, 507, "the server has no memory left for this stream", "no_memory")
            if isinstance(self.store, MakesRoom):
                self.store.make_room()
        except Exception as e:
            log_failure(log, "a generation failed", e)
            self._fail(writer, 500, f"generation failed: {type(e).__name__}: {e}", "server_error")
        finally:
            if key is not None:
                links.producer_ended(key, emitter)  # type: ignore[union-attr]

    def _fail(self, writer: StreamWriter, code: int, message: str, type_: str) -> None:
        self.counters.inc(WorkerCounter.JOBS_FAILED)
        fail_stream(writer, code, message, type_)

    @staticmethod
    def _context(job: Job, writer: StreamWriter) -> JobContext:
        """What a generator is given of the job: its request, decoded."""
        request: ChatCompletionRequest | CompletionRequest
        if job.route == "chat":
            request = chat_request_decoder.decode(job.body)
        else:
            request = completion_request_decoder.decode(job.body)
        return JobContext(job.route, job.body, request, writer)

    async def watch_cancel(self) -> None:
        """Cancel jobs whose session was cancelled (every ``CANCEL_POLL``); ping streams that
        stay silent (looked at every ``PING_CHECK_FRACTION`` of the interval, at most every
        ``PING_CHECK_MAX`` s and at least every ``CANCEL_POLL``: with a thousand jobs the
        cancellation poll is one atomic load each, the silence check a few lookups more)."""
        loop = asyncio.get_running_loop()
        interval = self.cfg.sse_ping_interval
        check_every = min(max(interval * PING_CHECK_FRACTION, CANCEL_POLL), PING_CHECK_MAX)
        next_check = 0.0
        pinged: dict[asyncio.Task[None], float] = {}  # when each job's stream was last pinged
        while True:
            if not self.active:
                # Nothing to poll: sleep until a job starts (an idle process's timer wakes
                # were most of what it cost).
                self._job_started = loop.create_future()
                await self._job_started
                self._job_started = None
                pinged.clear()
            await asyncio.sleep(CANCEL_POLL)
            # One call into the store for every job (a thousand property reads in Python
            # were most of this poll's cost).
            active = self.active
            if not active:
                continue
            tasks, writers = list(active), list(active.values())
            for i in self.store.cancelled_among(writers):
                if not tasks[i].done():
                    tasks[i].cancel()
            now = loop.time()
            if interval <= 0 or now < next_check:
                continue
            next_check = now + check_every
            # The silent streams, chosen in one call (a loop over a thousand jobs' writers
            # twice a second cost this process ~2 ms a second): those with no progress for
            # the interval, each pinged at most once per interval. (A job just cancelled is
            # still running: its writer, cancelled, is not silent.)
            for i in self.store.silent_among(writers, interval):
                task = tasks[i]
                last = pinged.get(task)
                if (last is None or now - last >= interval) and _ping(writers[i]):
                    # A comment, not an event: no id line, the next event's id counts it. Not
                    # progress either: a stream that only pings can still be found idle.
                    pinged[task] = now
            if pinged:
                for task in [t for t in pinged if t not in active]:
                    del pinged[task]

    async def shutdown(self) -> None:
        self.shutting_down = True
        for task in list(self.active):
            task.cancel()
        if self.active:
            await asyncio.wait(list(self.active), timeout=3.0)
        if self._batch is not None:
            self._batch.flush()
            self._batch.flush_tokens()


def load_source(cfg: ServeConfig) -> tuple[GenerateFn | None, float]:
    """The token source ``cfg`` names, loaded now, and the upstream read timeout: the
    ``generate`` and ``upstream_read_timeout`` of :class:`Jobs`. A ``--generator`` that does
    not load stops the process with ``STARTUP_REFUSED`` (the manager then stops with it) and
    one line on stderr: every process that loads it fails alike, so the first to fail says
    why (:func:`rundir.first_to_refuse`) and the others only stop."""
    try:
        generate = load_generator(cfg.generator) if cfg.generator else None
    except Exception as e:
        # One line, not the import's traceback; the manager then stops with this status.
        if rundir.first_to_refuse(cfg.run_dir):
            print(
                f"ringcast serve: cannot load --generator {cfg.generator}: {type(e).__name__}: {e}",
                file=sys.stderr,
            )
        raise SystemExit(STARTUP_REFUSED) from None
    if cfg.replay:
        from ringcast.trace import replay_generator

        generate = replay_generator(cfg.replay, cfg.replay_speed)
    # Read here, once logging is set up, so a bad value is reported when the process starts.
    return generate, upstream_read_timeout() if cfg.upstream else UPSTREAM_READ_TIMEOUT
