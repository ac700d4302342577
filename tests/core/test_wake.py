"""Event-loop wake-ups through the notifier socket: no thread, dead and stopped subscribers,
and fork.

A notifier is a datagram socket bound to a file in the segment's private (0700) wake
directory; a producer sends it one byte when a subscribed session advances and the notifier is
armed. These tests check what that design
promises beyond "aread wakes up" (test_core_async.py covers that).
"""

from __future__ import annotations

import asyncio
import gc
import os
import select
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
import ringcast

pytestmark = pytest.mark.timeout(120)

_NO_THREAD = """
import asyncio, os, select, stat, sys, ringcast

def tasks():
    return sorted(os.listdir("/proc/self/task"))

before = tasks()
seg = ringcast.Segment.create(sys.argv[1], max_sessions=4, session_bytes=64 * 1024)
w = seg.create_or_replace("c")
r = seg.reader("c")
n = seg.notifier()
assert stat.S_ISSOCK(os.fstat(n.fileno()).st_mode), "the notifier fd is a socket"
n.subscribe(r.slot, r.generation)
w.write(b"one")
assert select.select([n.fileno()], [], [], 10)[0], "a subscribed append makes the fd readable"
assert n.drain() == [r.slot]
assert r.read_nowait() == b"one"

async def main():
    task = asyncio.create_task(r.aread())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not task.done()
    w.write(b"two")
    return await asyncio.wait_for(task, 10)

assert asyncio.run(main()) == b"two"
after = tasks()
print(len(before), len(after))
assert before == after, (before, after)
print("ok")
"""


def test_a_notifier_starts_no_thread(seg_path: str, run_python) -> None:
    """In a fresh process: creating a notifier, being woken through it, and an aread round trip
    leave the process with exactly the threads it had before."""
    res = run_python(_NO_THREAD, 60, seg_path)
    assert res.returncode == 0, res.stderr
    counts, ok = res.stdout.split("\n")[:2]
    assert ok == "ok"
    before, after = (int(x) for x in counts.split())
    assert before == after


_SUBSCRIBER = """
import asyncio, sys, ringcast
seg = ringcast.Segment.open(sys.argv[1])
r = seg.reader("c")

async def main():
    total = 0
    task = asyncio.create_task(r.aread())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not task.done()
    print("waiting", flush=True)
    while True:
        data = await task
        if not data:
            return total
        total += len(data)
        task = asyncio.create_task(r.aread())

print(asyncio.run(main()), flush=True)
"""


@pytest.fixture
def start_subscriber(child_env: dict[str, str]) -> Any:
    """``start_subscriber(seg_path)``: a process awaiting the session (subscribed, armed)."""
    return lambda seg_path: _start_subscriber(child_env, seg_path)


def _start_subscriber(env: dict[str, str], seg_path: str) -> subprocess.Popen[str]:
    p = subprocess.Popen(
        [sys.executable, "-c", _SUBSCRIBER, seg_path],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    assert p.stdout is not None
    assert p.stdout.readline() == "waiting\n"
    return p


def test_dead_and_stopped_subscribers_never_stall_the_producer(
    seg_path: str, start_subscriber
) -> None:
    """Four processes await the session (subscribed, armed). One is killed with SIGKILL (its
    socket is gone: ECONNREFUSED), one is stopped with SIGSTOP (alive, never drains: its queue
    holds the one pending datagram). The producer's appends neither block nor fail, the two
    healthy processes get every byte, and the stopped one does too once continued."""
    seg = ringcast.Segment.create(seg_path, max_sessions=4, session_bytes=4 * 1024 * 1024)
    w = seg.create_or_replace("c")
    procs = [start_subscriber(seg_path) for _ in range(4)]
    dead, stopped, healthy = procs[0], procs[1], procs[2:]
    try:
        dead.kill()
        dead.communicate(timeout=30)
        assert dead.returncode == -signal.SIGKILL
        os.kill(stopped.pid, signal.SIGSTOP)
        events, event = 2000, b"data: " + b"x" * 100 + b"\n\n"
        t = time.monotonic()
        for _ in range(events):
            assert w.write(event)
        w.finalize()
        elapsed = time.monotonic() - t
        # Nothing waits for a receiver: 2,000 appends take milliseconds, not timeouts.
        assert elapsed < 10, elapsed
        for p in healthy:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
            assert int(out) == events * len(event)
        os.kill(stopped.pid, signal.SIGCONT)
        out, err = stopped.communicate(timeout=60)
        assert stopped.returncode == 0, err
        assert int(out) == events * len(event)
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
            p.communicate(timeout=30)


async def _aread_soon(r: ringcast.Reader, w: ringcast.Writer, data: bytes) -> bytes:
    """Awaits ``r`` while ``w`` appends ``data`` shortly after the wait began."""
    task = asyncio.create_task(r.aread())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not task.done()
    w.write(data)
    return await asyncio.wait_for(task, 30)


def test_aread_across_fork(seg: ringcast.Segment) -> None:
    """The parent awaits through its notifier, then forks. The child (whose inherited notifier
    belongs to the parent) gets its own notifier and is woken by the parent's appends; once it
    has exited, dropping the inherited copy on the way, the parent is still woken."""
    w = seg.create_or_replace("c")
    r = seg.reader("c")
    assert asyncio.run(_aread_soon(r, w, b"before fork")) == b"before fork"
    gc.collect()  # the closed loop and its hub go: the handle's notifier is held just here
    inherited = seg.notifier()
    parent_fd = inherited.fileno()
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the exit status only
        code = 1
        try:
            os.close(rfd)
            cr = seg.reader("c", r.offset)
            # The parent's notifier is inert here, and dropping it must not disarm the
            # parent's row or drop its subscriptions.
            assert inherited.drain() == []
            try:
                inherited.subscribe(cr.slot, cr.generation)
                raise AssertionError("an inherited notifier subscribed")
            except ringcast.InvalidArgument:
                pass
            del inherited
            gc.collect()

            async def child() -> bytes:
                task = asyncio.create_task(cr.aread())
                for _ in range(5):
                    await asyncio.sleep(0)
                assert not task.done()
                os.write(wfd, b"w")
                return await asyncio.wait_for(task, 30)

            if asyncio.run(child()) == b"from parent":
                code = 0
        finally:
            os._exit(code)
    os.close(wfd)
    assert select.select([rfd], [], [], 30)[0], "the child never started waiting"
    assert os.read(rfd, 1) == b"w"
    os.close(rfd)
    w.write(b"from parent")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert r.read_nowait() == b"from parent"
    # The parent's notifier is still armed and subscribed after the child went away.
    assert seg.notifier().fileno() == parent_fd
    assert asyncio.run(_aread_soon(r, w, b"after fork")) == b"after fork"


def _send_from_child(paths: list[str], uid: int | None, tries: int) -> dict[str, int]:
    """Sends `tries` datagrams to each path from a forked child running as `uid` (None: as
    this user); returns how many were sent and how many failed with which error."""
    import json
    import socket

    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(rfd)
            if uid is not None:
                os.setgid(uid)
                os.setuid(uid)
            out: dict[str, int] = {"sent": 0}
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            s.setblocking(False)
            for _ in range(tries):
                for p in paths:
                    try:
                        s.sendto(b"x", p)
                        out["sent"] += 1
                    except OSError as e:
                        name = type(e).__name__
                        out[name] = out.get(name, 0) + 1
            os.write(wfd, json.dumps(out).encode())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert status == 0 and data, "the sending child failed"
    return dict(json.loads(data))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a child as another user")
def test_another_user_cannot_wake_or_busy_a_notifier(seg: ringcast.Segment) -> None:
    # Abstract names were listed in /proc/net/unix and any local user could flood them (89 %
    # CPU of an HTTP process). Now the name is a file in a 0700 directory.
    w = seg.create_or_replace("c")
    r = seg.reader("c")
    n = seg.notifier()
    n.subscribe(r.slot, r.generation)
    wake_dir = seg.path + ".wake"
    assert os.stat(wake_dir).st_mode & 0o777 == 0o700
    # The socket is bound through a descriptor of the directory (/proc/self/fd/<fd>/<row>,
    # what /proc/net/unix lists); the attacker aims at its file, and at this process's link.
    names = os.listdir(wake_dir)
    assert names
    fd_links = [
        f"/proc/{os.getpid()}/fd/{fd}"
        for fd in os.listdir(f"/proc/{os.getpid()}/fd")
        if os.path.realpath(f"/proc/{os.getpid()}/fd/{fd}") == os.path.realpath(wake_dir)
    ]
    assert fd_links
    listed = [os.path.join(d, name) for d in (wake_dir, *fd_links) for name in names]
    nobody = 65534
    got = _send_from_child(listed, nobody, 2000)
    assert got == {"sent": 0, "PermissionError": 2000 * len(listed)}, got
    assert not select.select([n.fileno()], [], [], 0)[0], "another user's datagram arrived"
    assert n.arm_state == "armed"
    assert n.drain() == []
    # The same names from this user do reach it: the attack above aimed at the real socket.
    assert _send_from_child(listed, None, 1)["sent"] == len(listed)
    assert select.select([n.fileno()], [], [], 10)[0]
    # And a publish still wakes it.
    n.drain()
    n.arm(False)
    w.write(b"x")
    assert select.select([n.fileno()], [], [], 10)[0]
    assert n.drain() == [r.slot]
