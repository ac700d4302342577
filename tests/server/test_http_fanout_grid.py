"""``bench/http_fanout.py --grid`` at a CI size: every system at every point, with the server
CPU split by process and the ratios of issue 15's "Done when"; and the pieces of
``--profile`` that do not need a profiler (perf's output folded per process, the summary of
folded stacks by step). The full grid and the figures are run by hand: ``bench/RESULTS.md``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(240)

REPO = Path(__file__).resolve().parents[2]


def fanout(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "bench" / "http_fanout.py"), *args],
        capture_output=True,
        text=True,
        timeout=220,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO / "bench")},
    )


def small_grid(
    tmp_path: Path, points: str, systems: str
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """The grid at a CI size (50 tok/s for 0.4 s: 20 tokens a stream), its output and JSON."""
    out = fanout(
        "--grid", "--points", points, "--rates", "50", "--duration", "0.4", "--prefill", "0.3",
        "--client", "python", "--json", str(tmp_path / "grid.json"), "--systems", systems,
        cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out, json.loads((tmp_path / "grid.json").read_text())


def test_grid_runs_every_system_at_every_point_and_states_the_ratios(tmp_path: Path) -> None:
    out, grid = small_grid(tmp_path, "3x1,2x3", "ringcast,ringcast-1p,memory-broadcast")
    assert [(p["streams"], p["readers"]) for p in grid["points"]] == [(3, 1), (2, 3)]
    for p in grid["points"]:
        assert p["tokens"] == 20  # 50 tok/s x 0.4 s, raised to the least of 20
        res = p["results"]
        assert set(res) == {"ringcast", "ringcast-1p", "memory-broadcast"}
        for name, r in res.items():
            assert r["events"] == p["streams"] * p["readers"] * 20, name
            roles = {k[4:] for k in r if k.startswith("cpu:")}
            if name.startswith("ringcast"):
                # The defaults: the HTTP processes run the jobs, no worker process.
                assert {"manager", "http0"} <= roles, (name, roles)
                assert not any(role.startswith("worker") for role in roles), (name, roles)
            else:
                assert roles == {"server"}
            by_role = sum(v for k, v in r.items() if k.startswith("cpu:"))
            assert r["server_cpu_s"] == pytest.approx(by_role)
            assert r["cpu_us_per_event"] == pytest.approx(by_role / r["events"] * 1e6)
        v = p["verdict"]
        assert v["best_single"] == v["fastest_single"] == "memory-broadcast"
        assert v["best_fixed"] == "ringcast-1p"
        want = res["ringcast"]["p99_ms"] / res["ringcast-1p"]["p99_ms"]
        assert v["p99_vs_fixed"] == pytest.approx(want)
        assert v["done"] in ("yes", "no")
    assert "defaults: CPU/event x" in out.stdout
    summary = out.stdout[out.stdout.index("grid end:") :]
    assert "3x1" in summary and "2x3" in summary and "done" in summary


def test_a_baseline_spread_over_processes_runs_where_it_can_and_is_set_against_its_one(
    tmp_path: Path, bench_module: Any
) -> None:
    """``memory-broadcast-2p``: the hand-written server in two processes on one port. It runs
    at the points with one reader per stream (every stream whole, its CPU the two processes'
    together) and not at the others, and the verdict puts its CPU and p99 against the one
    process's; it is not a single-process server to hold ringcast to."""
    out, grid = small_grid(tmp_path, "6x1,2x3", "ringcast,memory-broadcast,memory-broadcast-2p")
    one, three = grid["points"]
    res = one["results"]
    assert set(res) == {"ringcast", "memory-broadcast", "memory-broadcast-2p"}
    spread = res["memory-broadcast-2p"]
    assert spread["events"] == 6 * 20
    assert {k for k in spread if k.startswith("cpu:")} == {"cpu:server", "cpu:server1"}
    assert spread["server_cpu_s"] == pytest.approx(spread["cpu:server"] + spread["cpu:server1"])
    v = one["verdict"]
    assert v["best_single"] == "memory-broadcast"
    ratio = bench_module("http_fanout").div  # CPU time comes in 10 ms ticks: 0 is NaN
    base = res["memory-broadcast"]
    want = ratio(spread["cpu_us_per_event"], base["cpu_us_per_event"])
    assert v["spread_cpu:memory-broadcast-2p"] == pytest.approx(want, nan_ok=True)
    want = ratio(spread["p99_ms"], base["p99_ms"])
    assert v["spread_p99:memory-broadcast-2p"] == pytest.approx(want, nan_ok=True)
    assert "memory-broadcast-2p: CPU/event x" in out.stdout
    assert set(three["results"]) == {"ringcast", "memory-broadcast"}
    note = "not run at 3 readers per stream (one reader only): memory-broadcast-2p"
    assert note in out.stdout
    # A point that no system given can serve is said to be skipped, not run empty.
    out, grid = small_grid(tmp_path, "4x2", "memory-broadcast-2p")
    assert grid["points"] == []
    assert "4 streams x 2 readers: none of --systems serves more than one reader" in out.stdout
    assert "events/s" not in out.stdout


def start_baseline(tmp_path: Path, procs: int) -> subprocess.Popen[str]:
    """``bench/baselines.py memory-broadcast --procs N`` on a free port, its output piped."""
    return subprocess.Popen(
        [sys.executable, str(REPO / "bench" / "baselines.py"), "memory-broadcast", "--procs",
         str(procs), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )  # fmt: skip


def test_a_baseline_in_two_processes_listens_twice_on_one_port_and_dies_with_its_first(
    tmp_path: Path,
) -> None:
    import psutil

    with start_baseline(tmp_path, 2) as p:
        try:
            assert p.stdout is not None
            port = int(p.stdout.readline().rsplit(":", 1)[1])
            (kid,) = psutil.Process(p.pid).children()
            for proc in (psutil.Process(p.pid), kid):
                # psutil >= 6 names it net_connections; the runtime dependency is >= 5.9
                conns = getattr(proc, "net_connections", None) or proc.connections
                listening = [c for c in conns("tcp") if c.status == "LISTEN"]
                assert [c.laddr.port for c in listening] == [port], proc
            p.kill()  # kill -9: the other process gets SIGTERM from the kernel and ends
            p.wait(10)
            kid.wait(10)
        finally:
            p.kill()


def test_a_baseline_process_that_dies_stops_the_others_with_an_error(tmp_path: Path) -> None:
    """A run must not go on with fewer processes than its name says: when one of them ends
    by itself, the first stops the rest and exits 1, saying so. Eight processes: more
    than a thread pool's worth on 2 cores, so each is watched without a thread of its own."""
    import psutil

    with start_baseline(tmp_path, 8) as p:
        try:
            assert p.stdout is not None and p.stderr is not None
            assert "listening on" in p.stdout.readline()
            kids = {
                int(k.cmdline()[k.cmdline().index("--sibling") + 1].split(":")[0]): k
                for k in psutil.Process(p.pid).children()
            }
            assert sorted(kids) == list(range(1, 8))
            kids[7].kill()  # the last one started
            assert p.wait(10) == 1
            assert "process 7 of --procs ended by itself: stopped" in p.stderr.read()
            for k in range(1, 7):
                kids[k].wait(10)  # the others were stopped with it
        finally:
            p.kill()


def test_a_baseline_stopped_while_its_processes_start_stops_at_once(tmp_path: Path) -> None:
    """SIGINT while a second process is still starting (here: stopped by SIGSTOP) ends every
    process within a second, not after the start's 30 s limit."""
    import time

    import psutil

    with start_baseline(tmp_path, 2) as p:
        try:
            assert p.stderr is not None
            first = psutil.Process(p.pid)
            deadline = time.monotonic() + 10
            while not first.children() and time.monotonic() < deadline:
                time.sleep(0.005)
            (kid,) = first.children()
            kid.suspend()
            time.sleep(0.3)  # the first has installed its handlers and waits for the second
            t0 = time.monotonic()
            p.send_signal(signal.SIGINT)
            assert p.wait(10) == 1
            assert time.monotonic() - t0 < 2.0
            assert "stopped before every process of --procs listened" in p.stderr.read()
            kid.wait(5)  # killed, stopped as it was
        finally:
            p.kill()


def test_the_verdict_says_no_when_a_bound_it_can_check_fails(bench_module: Any) -> None:
    """'no' as soon as one bound the run can check fails; '-' (not judged) only when those
    hold and the run lacks what another is set against; 'yes' when every bound held."""
    hf = bench_module("http_fanout")

    def run(cpu: float, p99: float) -> dict[str, float]:
        return {"cpu_us_per_event": cpu, "p99_ms": p99}

    tail_fails = {"ringcast": run(40, 17.0), "ringcast-1p": run(40, 1.3)}
    assert hf.verdict(1000, 1, tail_fails)["done"] == "no"  # no single-process server
    cpu_fails = {"ringcast": run(40, 1.0), "memory-broadcast": run(20, 2.0)}
    assert hf.verdict(1000, 1, cpu_fails)["done"] == "no"  # no ringcast-<N>p
    both_hold = {"ringcast": run(20, 1.0), "ringcast-1p": run(20, 1.0)}
    assert hf.verdict(1000, 1, both_hold)["done"] == "-"  # the CPU bound unchecked
    assert hf.verdict(100, 10, both_hold)["done"] == "yes"  # no CPU bound at this point
    unmeasured = {"ringcast": run(20, 1.0), "ringcast-1p": run(20, 0.0)}  # p99 of 0: NaN
    assert hf.verdict(100, 10, unmeasured)["done"] == "-"
    every = {**both_hold, "memory-broadcast": run(20, 2.0), "memory-broadcast-2p": run(30, 1.0)}
    v = hf.verdict(1000, 1, every)
    assert v["done"] == "yes" and v["best_single"] == "memory-broadcast"
    assert v["spread_cpu:memory-broadcast-2p"] == 1.5
    assert v["spread_p99:memory-broadcast-2p"] == 0.5


def test_a_baseline_in_processes_will_not_share_a_port_with_another_listener(
    tmp_path: Path,
) -> None:
    """SO_REUSEPORT would let the processes join someone else's listener on a fixed port (of
    the same user): the first refuses a port that a plain bind cannot take."""
    import socket

    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        out = subprocess.run(
            [sys.executable, str(REPO / "bench" / "baselines.py"), "memory-broadcast",
             "--procs", "2", "--port", str(port)],
            capture_output=True, text=True, timeout=30, cwd=tmp_path,
        )  # fmt: skip
    assert out.returncode == 1 and f"--port {port}: Address already in use" in out.stderr


def test_grid_refuses_what_it_cannot_run(tmp_path: Path) -> None:
    out = fanout("--grid", "--points", "10by2", cwd=tmp_path)
    assert out.returncode == 2 and "'10by2' is not STREAMSxREADERS" in out.stderr
    out = fanout("--grid", "--sweep", "10,20", cwd=tmp_path)
    assert out.returncode == 2 and "--grid and --sweep" in out.stderr
    out = fanout("--systems", "ringcast-xp", cwd=tmp_path)
    assert out.returncode == 2 and "ringcast-<N>p" in out.stderr
    out = fanout("--systems", "memory-broadcast-2p", "--readers", "2", cwd=tmp_path)
    assert out.returncode == 2 and "read by their POST alone: --readers 1" in out.stderr
    out = fanout("--systems", "memory-broadcast-1p", "--readers", "1", cwd=tmp_path)
    assert out.returncode == 2 and "memory-broadcast-<N>p (N >= 2)" in out.stderr
    out = fanout("--systems", "memory-broadcast-65p", "--readers", "1", cwd=tmp_path)
    assert out.returncode == 2 and "from 2 to 64 processes" in out.stderr
    out = fanout("--readers", "0", cwd=tmp_path)
    assert out.returncode == 2 and "--streams and --readers: at least 1" in out.stderr


def test_perf_script_is_folded_per_process(bench_module: Any) -> None:
    fanout_mod = bench_module("http_fanout")
    script = (
        "python3  4242 [001] 10.000001:    1001001 cpu-clock:\n"
        "\tffffffff81000001 tcp_sendmsg+0x21 ([kernel.kallsyms])\n"
        "\tffffffff81000002 ksys_write+0x10 ([kernel.kallsyms])\n"
        "\t00007f0000000003 __GI___libc_write+0x5 (/usr/lib/libc.so.6)\n"
        "\t00007f0000000004 [unknown] (/usr/lib/libpython3.11.so.1.0)\n"
        "\n"
        "python3  4343/4344 [000] 10.000002:    1001001 cpu-clock:\n"
        "\t00007f0000000005 ringcast_core::stream::Writer::append+0x1f (/x/_core.abi3.so)\n"
        "\n"
    )
    assert fanout_mod.collapse_perf(script) == [
        (4242, "[libpython3.11.so.1.0];__GI___libc_write;ksys_write;tcp_sendmsg"),
        (4343, "ringcast_core::stream::Writer::append"),
    ]


def test_flame_summary_puts_each_stack_in_its_step(bench_module: Any, tmp_path: Path) -> None:
    summary = bench_module("flame_summary")
    folded = tmp_path / "1000x1-20tps-ringcast-1p-worker0.pyspy.folded"
    folded.write_text(
        "run (uvloop);epoll_pwait (libc.so.6) 50\n"
        "run (uvloop);Emitter.raw (emitter.py:40);Writer::append (_core) 6\n"
        "run (uvloop);Emitter.raw (emitter.py:40);Writer::append (_core);"
        "ringcast_core::sys::dgram::Senders::send (_core) 2\n"
        "run (uvloop);Emitter._chunk (emitter.py:70) 2\n"
    )
    text = " ".join(summary.summarise(folded, 20.0).split())
    assert "10 busy samples of 60" in text
    assert "60.0% 12.0 us/event append: Rust ring write" in text
    assert "20.0% 4.0 us/event wake: notifier datagram send" in text
    assert "20.0% 4.0 us/event framing: JSON chunk + SSE id" in text


@pytest.mark.skipif(shutil.which("py-spy") is None, reason="needs py-spy (pip install py-spy)")
def test_profile_writes_a_flame_graph_of_each_http_process(tmp_path: Path) -> None:
    out = fanout(
        # Enough events (20,000) that the 250 Hz sampler surely sees the jobs' frames: a
        # handful of events cost the process a few ms, which it may sample only idle.
        "--grid", "--points", "50x1", "--rates", "200", "--duration", "2", "--prefill", "0.3",
        "--client", "python", "--systems", "ringcast-1p", "--profile", str(tmp_path / "flame"),
        "--profiler", "py-spy",
        cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    names = sorted(p.name for p in (tmp_path / "flame").glob("*.folded"))
    assert names == ["50x1-200tps-ringcast-1p-http0.pyspy.folded"]
    http = (tmp_path / "flame" / names[0]).read_text()
    # It runs the jobs (--workers 0, the default): their frames are among its samples.
    assert any(f in http for f in ("run_job", "TurnBatch.flush", "Emitter.")), http
