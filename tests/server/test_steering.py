"""``--spread``: which HTTP processes take new connections (``ringcast.server.steering``),
from the kernel's side (``steer_accepts`` on real listening sockets) to a real server whose
load moves it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ringcast._core import steer_accepts
from ringcast.server.steering import DOWN_HOLD_S, SpreadPolicy, Steering, cpu_seconds

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def listeners() -> Iterator[list[socket.socket]]:
    """Three sockets listening on one port with ``SO_REUSEPORT``, in the order they
    started listening."""
    socks: list[socket.socket] = []
    port = 0
    for _ in range(3):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", port))
        port = s.getsockname()[1]
        s.listen(256)
        s.setblocking(False)
        socks.append(s)
    yield socks
    for s in socks:
        s.close()


def _accepted(socks: list[socket.socket], n: int) -> list[int]:
    """Connects ``n`` clients to the port; how many each listener got."""
    port = socks[0].getsockname()[1]
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
    counts = [0] * len(socks)
    deadline = time.monotonic() + 5
    while sum(counts) < n and time.monotonic() < deadline:
        for i, s in enumerate(socks):
            try:
                conn, _ = s.accept()
            except BlockingIOError:
                continue
            conn.close()
            counts[i] += 1
    for c in clients:
        c.close()
    assert sum(counts) == n, counts
    return counts


def test_steer_accepts_to_the_first_listener_to_the_first_n_or_to_all(listeners) -> None:
    # 64 connections each: a listener that should get some gets none with odds of
    # (2/3)^64 or (1/2)^64.
    steer_accepts(listeners[2].fileno(), 1)  # set through any socket of the group
    assert _accepted(listeners, 64) == [64, 0, 0]
    steer_accepts(listeners[0].fileno(), 2)
    first, second, third = _accepted(listeners, 64)
    assert first > 0 and second > 0 and third == 0
    steer_accepts(listeners[1].fileno(), 0)
    assert all(_accepted(listeners, 64))


def test_steer_accepts_refuses_what_is_not_a_listening_socket(tmp_path: Path) -> None:
    with open(tmp_path / "f", "w") as f, pytest.raises(OSError, match="non-socket"):
        steer_accepts(f.fileno(), 1)
    with pytest.raises(ValueError, match="descriptor"):
        steer_accepts(-1, 1)
    with pytest.raises(OverflowError):
        steer_accepts(3, -1)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # not in a reuseport group
    with udp, pytest.raises(OSError):
        steer_accepts(udp.fileno(), 1)


def test_the_policy_doubles_when_busy_and_steps_down_after_a_calm_hold() -> None:
    p = SpreadPolicy(8)
    assert p.feed(0.5, 0.0) == 1
    assert p.feed(0.85, 0.25) == 2  # one process near a core: two take new connections
    assert p.feed(1.5, 0.5) == 2  # 0.75 a process: they keep up
    assert p.feed(1.7, 0.75) == 4
    assert p.feed(5.0, 1.0) == 8
    assert p.feed(50.0, 1.25) == 8  # never more than there are
    assert p.feed(0.1, 1.3, behind=True) == 8
    # Under 0.5 a process for those that would be left, held DOWN_HOLD_S: one fewer.
    assert p.feed(3.0, 2.0) == 8
    assert p.feed(3.0, 2.0 + DOWN_HOLD_S) == 7
    # A busy sample in the hold starts it again.
    assert p.feed(2.0, 3.0 + DOWN_HOLD_S) == 7
    assert p.feed(4.0, 3.5 + DOWN_HOLD_S) == 7
    assert p.feed(2.0, 4.0 + DOWN_HOLD_S) == 7
    assert p.feed(2.0, 4.0 + 2 * DOWN_HOLD_S - 0.1) == 7
    assert p.feed(2.0, 4.0 + 2 * DOWN_HOLD_S) == 6
    # A process behind (its loop late, whatever its CPU) widens, and holds off narrowing.
    q = SpreadPolicy(4)
    assert q.feed(0.1, 0.0, behind=True) == 2
    assert q.feed(0.1, 1.0) == 2
    assert q.feed(0.1, 1.0 + DOWN_HOLD_S - 0.1, behind=True) == 4
    assert q.feed(0.1, 10.0) == 4
    assert q.feed(0.1, 10.0 + DOWN_HOLD_S) == 3
    one = SpreadPolicy(1)
    assert one.feed(10.0, 0.0) == 1


BUSY_THEN_WAIT = """
import time
t = time.process_time()
while time.process_time() - t < 0.3:
    pass
input()
"""


def test_cpu_seconds_reads_a_process_whatever_its_name(tmp_path: Path) -> None:
    # A command name with spaces and parentheses, as /proc/PID/stat shows it.
    exe = tmp_path / "a b) c"
    os.symlink(sys.executable, exe)
    proc = subprocess.Popen(
        [str(exe), "-c", BUSY_THEN_WAIT],
        stdin=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while (cpu_seconds(proc.pid) or 0.0) < 0.25:
            assert time.monotonic() < deadline, cpu_seconds(proc.pid)
            time.sleep(0.05)
    finally:
        proc.communicate(b"\n")
    assert cpu_seconds(proc.pid) is None  # gone (reaped)


def _requests_by_process(s) -> list[float]:
    return [s.metric(f'http_requests_total{{process="{i}"}}') for i in range(2)]


def test_adaptive_spread_sends_a_light_load_to_one_process(serve) -> None:
    with serve("--spread", "adaptive", http_procs=2) as s:
        before = _requests_by_process(s)
        for _ in range(40):
            status, _, _ = s.request("GET", "/health")
            assert status == 200
        after = _requests_by_process(s)
        got = sorted(a - b for a, b in zip(after, before, strict=True))
        # One process got the 40 (and the metrics reads); the other nothing.
        assert got[0] == 0 and got[1] >= 40, got
        assert s.metric("http_processes_accepting") == 1


def test_spread_all_is_what_a_number_of_http_processes_gets(serve) -> None:
    with serve(http_procs=2) as s:
        assert s.metric("http_processes_accepting") == 2
        before = _requests_by_process(s)
        for _ in range(64):
            s.request("GET", "/health")
        after = _requests_by_process(s)
        assert all(a > b for a, b in zip(after, before, strict=True))


BURN = """
import time

async def burn(ctx):
    # Holds its HTTP process's loop for 50 ms a token: a CPU-bound model in the process.
    for _ in range(ctx.max_tokens or 1):
        t = time.process_time()
        while time.process_time() - t < 0.05:
            pass
        yield "x"
"""


def test_adaptive_spread_widens_when_a_process_is_busy_and_narrows_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serve, wait_for
) -> None:
    (tmp_path / "burner.py").write_text(BURN)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    with serve("--generator", "burner:burn", "--spread", "adaptive", http_procs=2) as s:
        assert s.metric("http_processes_accepting") == 1
        # 60 tokens of 50 ms: 3 s of one core in the process that takes the request.
        busy = s.post_chat("burn-1", max_tokens=60)
        wait_for(lambda: s.metric("http_processes_accepting") == 2, "spread", 10)
        before = _requests_by_process(s)
        for _ in range(64):
            s.request("GET", "/health")
        after = _requests_by_process(s)
        assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)
        busy.read_all_and_close()
        # The load gone, one process again after the hold.
        wait_for(
            lambda: s.metric("http_processes_accepting") == 1,
            "narrowed",
            DOWN_HOLD_S + 25,  # a machine busy with other work may keep it wide longer
        )
        before = _requests_by_process(s)
        for _ in range(40):
            s.request("GET", "/health")
        after = _requests_by_process(s)
        assert sorted(a - b for a, b in zip(after, before, strict=True))[0] == 0


@pytest.mark.parametrize(
    ("args", "spread"),
    [
        ([], "adaptive"),
        (["--http-procs", "auto"], "adaptive"),
        (["--http-procs", "2"], "all"),
        (["--http-procs", "2", "--spread", "adaptive"], "adaptive"),
        (["--spread", "all"], "all"),
    ],
)
def test_spread_is_adaptive_with_auto_and_all_with_a_number(args: list[str], spread: str) -> None:
    import argparse

    from ringcast.server.config import config_from_args, configure

    parser = argparse.ArgumentParser()
    configure(parser)
    assert config_from_args(parser.parse_args(args)).spread == spread


def _ticks(steering: Any, processes: dict[int, tuple[int, bool]], samples: int) -> None:
    """``samples`` samples of the manager's loop, in real time (CPU is measured)."""
    from ringcast.server.steering import SAMPLE_S

    for _ in range(samples):
        steering.tick(time.monotonic(), lambda: processes)
        time.sleep(SAMPLE_S)
    steering.tick(time.monotonic(), lambda: processes)


def test_the_manager_widens_for_a_busy_process_and_tells_the_listening_ones(
    tmp_path: Path,
) -> None:
    from ringcast.server.counters import ManagerCounter, SharedCounters

    counters = SharedCounters(str(tmp_path / "counters"), 1 + 4, create=True)
    counters.bind_row(0)
    # A process that spins a core, counts its SIGUSR1s and says so at once.
    listener = subprocess.Popen(
        [sys.executable, "-c", SPINNING_SIGNAL_COUNTER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        out = listener.stdout
        assert out is not None and out.readline() == b"ready\n"
        steering = Steering(4, counters, lag_signal=True)
        assert counters.read(0, ManagerCounter.SPREAD_AMONG) == 1
        pids = {listener.pid: (1, True)}
        steering.tick(time.monotonic(), lambda: pids)  # a new listener is told
        assert out.readline() == b"usr1\n"
        deadline = time.monotonic() + 30
        while steering.policy.among == 1:  # its core's worth: two take connections
            assert time.monotonic() < deadline
            _ticks(steering, pids, 1)
        assert steering.policy.among == 2
        assert counters.read(0, ManagerCounter.SPREAD_AMONG) == 2
        assert out.readline() == b"usr1\n"
    finally:
        rest, _ = listener.communicate(b"\n", timeout=30)
    assert rest == b""  # no signal but those two


def test_an_idle_process_running_late_does_not_widen_the_spread(tmp_path: Path) -> None:
    """A process whose loop runs late (its coalescing lingers) but that uses next to no CPU
    is late because the machine is busy with other work: more processes would not help."""
    from ringcast.server.counters import HttpCounter, SharedCounters, http_row

    counters = SharedCounters(str(tmp_path / "counters"), 1 + 2, create=True)
    counters.bind_row(0)
    http0 = SharedCounters(str(tmp_path / "counters"), 1 + 2)
    http0.bind_row(http_row(0))
    http0.set(HttpCounter.COALESCE_US, 20_000)
    steering = Steering(2, counters, lag_signal=True)
    idle = subprocess.Popen([sys.executable, "-c", "input()"], stdin=subprocess.PIPE)
    try:
        _ticks(steering, {idle.pid: (0, False)}, 4)
        assert steering.policy.among == 1
    finally:
        idle.communicate(b"\n", timeout=30)


SPINNING_SIGNAL_COUNTER = """
import os, signal, sys, threading
def spin():
    while True:
        pass
threading.Thread(target=spin, daemon=True).start()
signal.signal(signal.SIGUSR1, lambda *_: os.write(1, b"usr1\\n"))
print("ready", flush=True)
sys.stdin.readline()
"""
