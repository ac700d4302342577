"""kill -9 of each kind of process of ``ringcast serve``, with the outcome each should have."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import psutil
import pytest
from ringcast.server.rundir import RUN_DIR_LOCK, RUN_DIR_PREFIX, sweep_stale_run_dirs

pytestmark = pytest.mark.timeout(90)


def state(srv: Any, conv: str) -> str:
    _, _, body = srv.request("POST", "/v1/streams/lookup", {"conversation_ids": [conv]})
    found = json.loads(body)
    return str(found[0]["state"]) if found else "gone"


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_kill_worker_fails_its_streams_and_is_restarted(
    tmp_path: Path, serve, wait_for, kill, sse_events, error_of
) -> None:
    s = serve.start("--tokens-per-s", "20", workers=1)
    try:
        r = s.post_chat("victim", max_tokens=1000)
        r.read_at_least(500)
        (worker,) = s.children("worker")
        kill(worker)
        # The reader gets an in-band error event, then the end of the stream.
        events = sse_events(r.read_all_and_close())
        err = error_of(events[-1])
        assert err["type"] == "producer_died"
        assert events[-1].startswith(b"id: ")  # part of the ring: replays end the same way
        assert state(s, "victim") == "failed"
        _, _, replay = s.request("GET", "/v1/stream?conv_id=victim")
        assert replay.endswith(events[-1])
        wait_for(lambda: s.metric("dead_producers_total") == 1, "the sweep's count")
        new = wait_for(
            lambda: [p for p in s.children("worker") if p != worker], "the worker to be restarted"
        )
        assert new
        body = s.post_chat("after", max_tokens=3).read_all_and_close()
        assert body.endswith(b"data: [DONE]\n\n")
    finally:
        s.stop()


def test_a_reader_that_finds_its_producer_dead_ends_the_stream_in_band(
    serve, kill, sse_events, error_of
) -> None:
    """With the manager's sweep held up (the manager stopped), the HTTP process's own
    producer check finds the killed worker dead: it ends the stream in-band itself, so its
    client gets exactly the stream's bytes, the same a read from offset 0 gets afterwards."""
    s = serve.start("--tokens-per-s", "20", workers=1)
    try:
        r = s.post_chat("orphan", max_tokens=1000)
        got = r.read_at_least(500)
        (worker,) = s.children("worker")
        os.kill(s.proc.pid, signal.SIGSTOP)
        try:
            kill(worker)
            got += r.read_all_and_close()
            _, _, whole = s.request("GET", "/v1/stream?conv_id=orphan")
            assert state(s, "orphan") == "failed"
        finally:
            os.kill(s.proc.pid, signal.SIGCONT)
        assert got == whole
        last = sse_events(got)[-1]
        assert error_of(last)["type"] == "producer_died"
        assert last.startswith(f"id: {len(got)}\n".encode())  # in the ring, not made up
        # The sweep, running again, finds nothing left to end.
        assert s.metric("dead_producers_total") == 0
    finally:
        s.stop()


def _pid_of_process(srv: Any, index: str, wait_for: Any) -> int:
    def probe() -> int | None:
        _, headers, body = srv.request("GET", "/health")
        return int(json.loads(body)["pid"]) if headers["x-ringcast-process"] == index else None

    pid: int = wait_for(probe, f"a connection to HTTP process {index}")
    return pid


def test_kill_http_process_streams_go_on_and_resume_elsewhere(
    tmp_path: Path, serve, wait_for, kill
) -> None:
    # With a worker: the generation does not depend on the HTTP process (--workers 0, the
    # default, is in test_jobs_in_http.py).
    s = serve.start("--tokens-per-s", "50", http_procs=2, workers=1)
    try:
        r = s.post_chat("survives", max_tokens=150)
        index = r.headers["x-ringcast-process"]
        got = r.read_at_least(400)
        pid = _pid_of_process(s, index, wait_for)
        kill(pid)
        with contextlib.suppress(ConnectionError, OSError):
            while data := r.read_some():
                got += data
        r.close()

        # The generation did not depend on that process: resume from the byte count. A
        # connection that raced with the dying process's listener is reset: retry, as any
        # client would.
        def resume() -> tuple[bytes] | None:
            try:
                g = s.open_request("GET", f"/v1/stream?conv_id=survives&from={len(got)}")
                return (g.read_all_and_close(),)
            except ConnectionError:
                return None

        (rest,) = wait_for(resume, "a resume through a live HTTP process")
        _, _, whole = s.request("GET", "/v1/stream?conv_id=survives")
        assert got + rest == whole
        assert whole.endswith(b"data: [DONE]\n\n")
        wait_for(
            lambda: len(s.children("http")) == 2 and pid not in s.children("http"),
            "the HTTP process to be restarted",
        )
        assert s.metric('restarts_total{role="http"}') == 1
    finally:
        s.stop()


def test_kill_manager_children_exit_and_a_new_manager_reattaches(
    tmp_path: Path, serve, wait_for, sse_events, error_of
) -> None:
    tmp = tmp_path / "tmp"  # the managers' TMPDIR: where their run directories go
    tmp.mkdir()
    env = {"TMPDIR": str(tmp)}
    s = serve.start("--tokens-per-s", "20", env=env)
    first_run_dir = [d.name for d in tmp.iterdir()]
    assert first_run_dir == [
        d for d in first_run_dir if d.startswith(f"{RUN_DIR_PREFIX}{s.proc.pid}-")
    ]
    assert len(first_run_dir) == 1
    children = s.children("http") + s.children("worker")
    done = s.post_chat("finished", max_tokens=3).read_all_and_close()
    r = s.post_chat("interrupted", max_tokens=1000)
    r.read_at_least(300)
    os.kill(s.proc.pid, signal.SIGKILL)
    s.proc.wait()
    # The children notice (PR_SET_PDEATHSIG) and shut down; the worker ends its stream.
    assert error_of(sse_events(r.read_all_and_close())[-1])["type"] == "server_shutdown"
    wait_for(lambda: all(gone(p) for p in children), "the children to exit")
    assert s.segment.exists()  # nobody removed it
    s.stop()
    assert [d.name for d in tmp.iterdir()] == first_run_dir  # kill -9: no clean-up ran
    s2 = serve.start("--tokens-per-s", "20", env=env)
    try:
        assert s2.request("GET", "/v1/stream?conv_id=finished")[2] == done
        assert state(s2, "interrupted") == "failed"
        # The new manager removed the dead one's run directory and made its own.
        left = [d.name for d in tmp.iterdir()]
        assert len(left) == 1 and left[0].startswith(f"{RUN_DIR_PREFIX}{s2.proc.pid}-"), left
    finally:
        s2.stop()
    assert list(tmp.iterdir()) == []


def test_only_run_directories_of_gone_managers_are_swept(tmp_path: Path) -> None:
    """A run directory is stale when no manager holds its lock; one whose lock is held stays
    even if the pid in its name does not exist here (a manager in another pid namespace
    sharing /tmp), and one not locked yet stays while the pid in its name runs."""

    child = subprocess.Popen(["true"])
    child.wait()
    dead = child.pid  # exited and reaped: no such process any more
    names = {
        "dead-unlocked": f"{RUN_DIR_PREFIX}{dead}-a",
        "dead-lock-free": f"{RUN_DIR_PREFIX}{dead}-b",
        "lock-held": f"{RUN_DIR_PREFIX}{dead}-c",
        "alive-unlocked": f"{RUN_DIR_PREFIX}{os.getpid()}-d",
        "not-a-run-dir": "ringcast-other",
    }
    for name in names.values():
        (tmp_path / name).mkdir()
    (tmp_path / names["dead-lock-free"] / RUN_DIR_LOCK).touch()
    held = os.open(tmp_path / names["lock-held"] / RUN_DIR_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        removed = sorted(Path(p).name for p in sweep_stale_run_dirs(str(tmp_path)))
    finally:
        os.close(held)
    assert removed == sorted([names["dead-unlocked"], names["dead-lock-free"]])
    assert sorted(d.name for d in tmp_path.iterdir()) == sorted(
        [names["lock-held"], names["alive-unlocked"], names["not-a-run-dir"]]
    )
