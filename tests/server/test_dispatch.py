"""Which worker gets a job: the least loaded one, equal loads in turn, the next one if the
chosen worker does not take the connection."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from ringcast import Segment
from ringcast.server import rundir
from ringcast.server.config import ServeConfig
from ringcast.server.counters import (
    SharedCounters,
    WorkerCounter,
    counter_rows,
    http_row,
    worker_row,
)
from ringcast.server.routes import App
from ringcast.server.segment_store import SegmentStore
from ringcast.wire.jobs import JOB_ACK_ADOPTED, LENGTH_SIZE, Job, decode_job, frame_length

pytestmark = pytest.mark.timeout(90)


def test_jobs_go_to_the_least_loaded_worker(tmp_path: Path, serve, wait_for) -> None:
    with serve("--tokens-per-s", "20", http_procs=1, workers=2) as s:

        def started(w: int) -> float:
            return s.metric(f'worker_jobs_total{{worker="{w}",outcome="started"}}')

        def short_job(conv: str, still_active: int) -> None:
            body = s.post_chat(conv, max_tokens=1).read_all_and_close()
            assert body.endswith(b"data: [DONE]\n\n")
            # The worker lowers its gauge just after the stream's end: wait for it, so the next
            # job sees the load as it is.
            wait_for(lambda: s.metric("worker_jobs_active") == still_active, "the job to end")

        # Idle workers: equal loads, taken in turn.
        for i in range(4):
            short_job(f"idle-{i}", 0)
        assert (started(0), started(1)) == (2, 2)
        # Tokens are counted per worker too (one token a job, stored within a flush period).
        wait_for(
            lambda: [s.metric(f'worker_tokens_total{{worker="{w}"}}') for w in (0, 1)] == [2, 2],
            "two tokens from each worker",
        )

        long = s.post_chat("long", max_tokens=100_000)
        long.read_at_least(100)
        busy = wait_for(
            lambda: [w for w in (0, 1) if s.metric(f'worker_jobs_active{{worker="{w}"}}') == 1],
            "the long job to be adopted",
        )[0]
        idle = 1 - busy
        # Round robin would give the busy worker every other one of these.
        for i in range(6):
            short_job(f"short-{i}", 1)
        assert (started(busy), started(idle)) == (3, 8)
        assert s.metric(f'worker_jobs_active{{worker="{busy}"}}') == 1
        long.close()
        assert s.request("DELETE", "/v1/stream?conv_id=long")[0] == 204


def test_an_unreachable_least_loaded_worker_is_passed_over(tmp_path: Path) -> None:
    """Worker 0 is idle but does not take connections (restarting); of the two others the
    less loaded one gets the job, the next in the order rather than the next in turn."""
    cfg = ServeConfig(segment=str(tmp_path / "seg"), run_dir=str(tmp_path), http_procs=1, workers=3)
    seg = Segment.create(cfg.segment, max_sessions=8, session_bytes=65536)
    path = str(tmp_path / "counters")
    counters = SharedCounters(path, counter_rows(cfg), create=True)
    counters.bind_row(http_row(0))
    for w, active in ((1, 9), (2, 4)):
        row = SharedCounters(path, counter_rows(cfg))
        row.bind_row(worker_row(cfg, w))
        row.set(WorkerCounter.ACTIVE, active)
    app = App(cfg, 0, SegmentStore(seg), counters)
    got: list[int] = []

    async def fake_worker(w: int) -> asyncio.AbstractServer:
        async def handle(r: asyncio.StreamReader, wr: asyncio.StreamWriter) -> None:
            n = frame_length(await r.readexactly(LENGTH_SIZE))
            job = decode_job(await r.readexactly(n))
            writer = seg.adopt(job.conversation_id, job.owner, job.generation)
            got.append(w)
            wr.write(JOB_ACK_ADOPTED)
            await wr.drain()
            wr.close()
            writer.finalize()

        return await asyncio.start_unix_server(handle, rundir.worker_socket(cfg.run_dir, w))

    async def main() -> None:
        workers = [await fake_worker(w) for w in (1, 2)]
        for conv in ("a", "b"):
            writer = app.create_session(conv, "")
            await app.dispatcher.handoff(Job(conv, "", writer.generation, "chat", b"{}"), writer)
        for w in workers:
            w.close()

    asyncio.run(main())
    assert got == [2, 2]
    assert app.dispatcher.handing_off == [0, 0, 0]
    for conv in ("a", "b"):
        info = seg.get(conv)
        assert info is not None and info.state == "done"
    seg.unlink()
