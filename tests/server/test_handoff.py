"""The HTTP process's side of the job hand-off, against fake workers on a real segment."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from ringcast import Segment
from ringcast.server import rundir
from ringcast.server.config import ServeConfig
from ringcast.server.counters import (
    SharedCounters,
    counter_rows,
    http_row,
)
from ringcast.server.routes import App
from ringcast.server.segment_store import SegmentStore
from ringcast.wire.jobs import JOB_ACK_ADOPTED, LENGTH_SIZE, Job, decode_job, frame_length

pytestmark = pytest.mark.timeout(30)


def make_app(tmp_path: Path) -> App:
    cfg = ServeConfig(segment=str(tmp_path / "seg"), run_dir=str(tmp_path), http_procs=1, workers=1)
    seg = Segment.create(cfg.segment, max_sessions=8, session_bytes=65536)
    counters = SharedCounters(str(tmp_path / "counters"), counter_rows(cfg), create=True)
    counters.bind_row(http_row(0))
    return App(cfg, 0, SegmentStore(seg), counters)


async def fake_worker(path: str, seg: Segment, adopt: bool) -> asyncio.AbstractServer:
    """Reads one job; either adopts it and acks, or hangs up without an ack."""

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        n = frame_length(await r.readexactly(LENGTH_SIZE))
        job = decode_job(await r.readexactly(n))
        if adopt:
            writer = seg.adopt(job.conversation_id, job.owner, job.generation)
            w.write(JOB_ACK_ADOPTED)
            await w.drain()
            writer.write(b"data: adopted\n\n")
            writer.finalize()
        w.close()

    return await asyncio.start_unix_server(handle, path)


@pytest.mark.parametrize("adopt", [False, True])
def test_worker_that_hangs_up_before_adopting(
    tmp_path: Path, adopt: bool, sse_events, data_of
) -> None:
    app = make_app(tmp_path)
    seg = app.store.segment

    async def main() -> None:
        server = await fake_worker(rundir.worker_socket(app.cfg.run_dir, 0), seg, adopt)
        writer = app.create_session("c", "")
        await app.dispatcher.handoff(Job("c", "", writer.generation, "chat", b"{}"), writer)
        server.close()

    asyncio.run(main())
    info = seg.get("c")
    assert info is not None and info.is_done
    body = seg.reader("c", 0).read(timeout=5)
    if adopt:
        # After adoption the HTTP process's writer is refused; the worker's bytes stand.
        assert (info.state, body) == ("done", b"data: adopted\n\n")
    else:
        assert info.state == "failed"
        err = json.loads(data_of(sse_events(body)[-1]))["error"]
        assert (err["code"], err["type"]) == (503, "worker_unavailable")
    seg.unlink()


def test_a_stopping_process_ends_hand_offs_that_wait_for_a_worker(
    tmp_path: Path, sse_events, data_of
) -> None:
    """No worker listens (all restarting, or gone with a killed manager): when the HTTP
    process is told to stop, the hand-off ends its stream with ``server_shutdown`` instead of
    retrying for its whole deadline as the stream's live producer, which no sweep may end."""
    app = make_app(tmp_path)
    seg = app.store.segment

    async def main() -> str:
        writer = app.create_session("c", "")
        task = asyncio.create_task(
            app.dispatcher.handoff(Job("c", "", writer.generation, "chat", b"{}"), writer)
        )
        await asyncio.sleep(0.3)  # a few rounds over the (absent) workers
        running = seg.get("c")
        assert running is not None and not running.is_done
        app.dispatcher.stop()
        await task
        return seg.reader("c", 0).read(timeout=5)

    body = asyncio.run(main())
    info = seg.get("c")
    assert info is not None and info.state == "failed"
    err = json.loads(data_of(sse_events(body)[-1]))["error"]
    assert (err["code"], err["type"]) == (503, "server_shutdown")
    seg.unlink()


def test_a_job_cancelled_before_its_first_step_still_ends_its_stream(
    tmp_path: Path, sse_events, data_of
) -> None:
    """A worker told to stop right after adopting a job cancels a task that never ran (so no
    handler of ``run_job`` did): the stream still ends ``server_shutdown``, in the ring."""
    from ringcast.server.counters import open_child_counters
    from ringcast.server.worker import WorkerApp

    app = make_app(tmp_path)
    seg = app.store.segment
    cfg = app.cfg

    async def main() -> None:
        worker = WorkerApp(cfg, app.store, open_child_counters(cfg, "worker", 0), None)
        created = app.create_session("c", "")
        writer = app.store.adopt("c", "", created.generation)
        body = json.dumps({"messages": [], "max_tokens": 5}).encode()
        task = worker.start_job(Job("c", "", created.generation, "chat", body), writer)
        await worker.shutdown()  # no step of the task's ran before this
        assert task.cancelled()

    asyncio.run(main())
    info = seg.get("c")
    assert info is not None and info.state == "failed"
    err = json.loads(data_of(sse_events(seg.reader("c", 0).read(timeout=5))[-1]))["error"]
    assert (err["code"], err["type"]) == (503, "server_shutdown")
    seg.unlink()
