"""Cross-node HTTP fan-out: readers on node B of streams produced on node A (issue 12).

Two ``ringcast serve --redis`` nodes share a private ``redis-server``; node A produces the
streams (``--generator baselines:timestamped``: each event's content is the producer's clock).
The client is ``ringcast-loadgen`` (bench/loadgen, built with cargo on first use): per stream
one POST on node A (itself a reader, on A) and ``--readers`` - 1 GETs from offset 0, sent to

- ``local``: node A, the producing node (readers of the segment, the fan-out of one node);
- ``remote``: node B, which serves them from Redis (the mirror's windows on A, one
  ``XREAD BLOCK`` tail per stream in each HTTP process of B, B's fan-out);
- ``redis``: the Redis-only baseline of ``bench/baselines.py`` (one process, every event
  ``XADD``ed, one ``XREAD BLOCK`` loop per stream) on the same private Redis.

Modes run interleaved ``--repeat`` times (medians shown), the same nodes throughout. For each:
events/s, p50/p99 of producer-to-reader latency, and server CPU (both nodes' process trees and
the private Redis; the baseline's process and Redis) per delivered event, also by process.
Then the ratios the issue sets targets for: remote p99 <= flush window + 10 ms, remote CPU
per event <= 1.5x local. Last (``--hops``, on by default), one more ``remote`` run, not in
the medians, splits its latency in two: a probe in this process reads every mirrored stream
from Redis (``XREAD`` of all of them) and times each event's arrival there against its
producer stamp (node A's flush window, its mirror pass, the ``SYNC`` script), the rest is
node B's (its tail, its fan-out) and the client's.

Before a stream's GETs on node B the client polls B's lookup until the stream is in Redis (a
window after the POST); ``--prefill`` (seconds before the first token) must cover the set-up
of every stream, or the first events wait for it.

    python bench/cluster_fanout.py                               # 8 streams x 64 readers
    python bench/cluster_fanout.py --streams 16 --readers 128 --tokens 600 --repeat 5 \\
        --http-procs 2 --json out.json                           # a quiet machine
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from http_fanout import (  # noqa: E402  (bench/ is not a package)
    build_loadgen,
    server_usage,
    start_private_redis,
)

MODES = ("local", "remote", "redis")
STAMP = re.compile(rb'"content":"(\d{16,20})"')


class RedisProbe(threading.Thread):
    """Times every event's arrival in Redis: reads every mirrored stream (keys ``rc:…:s:…``,
    found by ``SCAN``) with one blocking ``XREAD`` and keeps, per event whose producer stamp
    is newer than the probe, the time from that stamp to its arrival here (ms)."""

    def __init__(self, url: str) -> None:
        import redis

        super().__init__(daemon=True)
        self.client = redis.Redis.from_url(url)
        self.done = threading.Event()
        self.since_ns = time.time_ns()
        self.ages: list[float] = []

    def run(self) -> None:
        streams: dict[bytes, bytes] = {}
        scanned = 0.0
        while not self.done.is_set():
            # New streams, every 0.1 s (a stream's first token comes --prefill after its
            # first sync), read from their last entry then: an event is timed only if this
            # probe was already waiting for it.
            if time.monotonic() - scanned > 0.1:
                for key in self.client.scan_iter(match="rc:*:s:*", count=1000):
                    if key not in streams:
                        last: Any = self.client.xrevrange(key, count=1)
                        streams[key] = last[0][0] if last else b"0-0"
                scanned = time.monotonic()
            if not streams:
                time.sleep(0.01)
                continue
            res: Any = self.client.xread(streams, block=20)  # type: ignore[arg-type]
            now = time.time_ns()
            for name, entries in res or []:
                for entry_id, fields in entries:
                    streams[name] = entry_id
                    for m in STAMP.finditer(fields.get(b"d", b"")):
                        if int(m.group(1)) > self.since_ns:
                            self.ages.append((now - int(m.group(1))) / 1e6)

    def stop(self) -> list[float]:
        self.done.set()
        self.join(5)
        self.client.close()
        return sorted(self.ages)


def quantile(xs: list[float], q: float) -> float:
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def start_node(args: argparse.Namespace, tmp: str, redis_url: str, name: str) -> tuple[Any, int]:
    """``ringcast serve --redis`` node ``name`` on a free port, in its own process group."""
    env = dict(
        os.environ,
        BENCH_TPS=str(args.tokens_per_s),
        BENCH_PREFILL=str(args.prefill),
        PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
    )
    cmd = [
        sys.executable, "-m", "ringcast.cli", "serve", "--port", "0",
        "--http-procs", str(args.http_procs), "--workers", "1",
        "--segment", os.path.join(tmp, f"{name}.seg"), "--log-level", "WARNING",
        "--generator", "baselines:timestamped", "--max-sessions", "4096",
        "--redis", redis_url, "--node-id", name, "--mirror-ms", str(args.mirror_ms),
        *(["--mirror-procs", str(args.mirror_procs)] if args.mirror_procs else []),
    ]  # fmt: skip
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
    assert p.stdout is not None
    line = p.stdout.readline()
    m = re.search(r":(\d+) \(", line)
    if not m:
        stop(p)
        raise SystemExit(f"ringcast serve ({name}) did not start: {line!r}")
    return p, int(m.group(1))


def start_baseline(args: argparse.Namespace, redis_url: str) -> tuple[Any, int]:
    env = dict(os.environ, BENCH_TPS=str(args.tokens_per_s), BENCH_PREFILL=str(args.prefill))
    p = subprocess.Popen(
        [sys.executable, str(HERE / "baselines.py"), "redis", "--port", "0",
         "--redis-url", redis_url],
        stdout=subprocess.PIPE, text=True, env=env, start_new_session=True,
    )  # fmt: skip
    assert p.stdout is not None
    m = re.search(r"listening on http://[\w.]+:(\d+)", p.stdout.readline())
    if not m:
        stop(p)
        raise SystemExit("the redis baseline did not start")
    return p, int(m.group(1))


def stop(p: Any) -> None:
    """SIGTERM, then SIGKILL of the process group if it has not ended within 30 s."""
    if p.poll() is None:
        p.terminate()
    try:
        p.wait(30)
    except subprocess.TimeoutExpired:
        pass
    finally:
        import signal

        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        p.wait()
        if p.stdout is not None:
            p.stdout.close()


def loadgen_run(
    loadgen: str, args: argparse.Namespace, port: int, read_port: int | None
) -> dict[str, float]:
    cmd = [
        loadgen, "--port", str(port), "--streams", str(args.streams),
        "--readers", str(args.readers), "--tokens", str(args.tokens),
        "--run-id", f"{os.getpid()}-{time.monotonic_ns()}",
        *(["--read-port", str(read_port)] if read_port else []),
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"ringcast-loadgen failed: {out.stderr.strip()}")
    got: dict[str, float] = json.loads(out.stdout)
    return got


def measure(
    mode: str,
    args: argparse.Namespace,
    loadgen: str,
    nodes: dict[str, tuple[Any, int]],
    redis_pid: int,
) -> dict[str, float]:
    if mode == "redis":
        (proc, port), read_port = nodes["baseline"], None
        sides = {"a": proc.pid}
    else:
        (_, port), read_port = nodes["a"], (nodes["b"][1] if mode == "remote" else None)
        sides = {"a": nodes["a"][0].pid, "b": nodes["b"][0].pid}

    def cpu() -> dict[str, float]:
        """CPU seconds by side (node A or the baseline, node B, the private Redis), and by
        process kind within a side (``a http``, ``a mirror``, ...)."""
        out = {"a": 0.0, "b": 0.0, "redis": 0.0}
        for side, pid in sides.items():
            by_role, _ = server_usage(pid, "ringcast", (redis_pid,) if side == "a" else ())
            for role, seconds in by_role.items():
                out["redis" if role == "redis" else side] += seconds
                if role != "redis":
                    kind = f"{side} {role.rstrip('0123456789')}"
                    out[kind] = out.get(kind, 0.0) + seconds
        return out

    cpu0 = cpu()
    got = loadgen_run(loadgen, args, port, read_port)
    cpu1 = cpu()
    used = {k: cpu1[k] - cpu0.get(k, 0.0) for k in cpu1}
    server_cpu = used["a"] + used["b"] + used["redis"]
    events = int(got["events"])
    expected = args.streams * args.readers * args.tokens
    if events != expected:
        raise SystemExit(f"{mode}: received {events} events, expected {expected}")
    return {
        "events_per_s": events / max(got["span_s"], 1e-9),
        "p50_ms": got["p50_ms"],
        "p99_ms": got["p99_ms"],
        "server_cpu_s": server_cpu,
        "server_cpu_us_per_event": server_cpu * 1e6 / events,
        "cpu_s_node_a": used["a"],
        "cpu_s_node_b": used["b"],
        "cpu_s_redis": used["redis"],
        "client_cpu_s": got["cpu_s"],
        **{f"cpu_s {k}": v for k, v in used.items() if " " in k},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="cluster_fanout.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--streams", type=int, default=8, help="streams produced on node A (8)")
    ap.add_argument(
        "--readers", type=int, default=64, help="readers per stream, the POST included (64)"
    )
    ap.add_argument("--tokens", type=int, default=300, help="events per stream (300)")
    ap.add_argument("--tokens-per-s", type=float, default=50.0, help="per stream (50)")
    ap.add_argument(
        "--prefill", type=float, default=1.5, help="seconds before a stream's first token (1.5)"
    )
    ap.add_argument("--http-procs", type=int, default=1, help="HTTP processes per node (1)")
    ap.add_argument("--mirror-ms", type=float, default=25.0, help="both nodes' flush window (25)")
    ap.add_argument(
        "--mirror-procs", type=int, default=0, help="node A's mirror processes (its default)"
    )
    ap.add_argument("--repeat", type=int, default=3, help="runs per mode; medians shown (3)")
    ap.add_argument("--modes", default=",".join(MODES), help="of local,remote,redis (all)")
    ap.add_argument(
        "--hops",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="one more remote run with a probe that times each event's arrival in Redis (on)",
    )
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if not modes or any(m not in MODES for m in modes):
        ap.error(f"--modes: a comma-separated list of {', '.join(MODES)}")
    loadgen = build_loadgen()
    tmp = tempfile.mkdtemp(prefix="ringcast-cluster-fanout-")
    redis, redis_url = start_private_redis(tmp)
    nodes: dict[str, tuple[Any, int]] = {}
    try:
        if "local" in modes or "remote" in modes:
            nodes["a"] = start_node(args, tmp, redis_url, "a")
            nodes["b"] = start_node(args, tmp, redis_url, "b")
        if "redis" in modes:
            nodes["baseline"] = start_baseline(args, redis_url)
        runs: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
        for _ in range(args.repeat):
            for mode in modes:
                runs[mode].append(measure(mode, args, loadgen, nodes, redis.pid))
        hops: dict[str, float] = {}
        if args.hops and "remote" in modes:
            probe = RedisProbe(redis_url)
            probe.start()
            try:
                run = measure("remote", args, loadgen, nodes, redis.pid)
            finally:
                ages = probe.stop()
            hops = {
                "in_redis_p50_ms": quantile(ages, 0.5),
                "in_redis_p99_ms": quantile(ages, 0.99),
                "reader_p50_ms": run["p50_ms"],
                "reader_p99_ms": run["p99_ms"],
                "events_timed_in_redis": len(ages),
            }
    finally:
        for proc, _ in nodes.values():
            stop(proc)
        redis.kill()
        redis.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    res = {
        m: {k: statistics.median(r.get(k, 0.0) for r in rs) for k in rs[0]}
        for m, rs in runs.items()
    }
    print(
        f"{args.streams} streams x {args.readers} readers, {args.tokens} tokens at "
        f"{args.tokens_per_s:g}/s, --mirror-ms {args.mirror_ms:g}, --http-procs "
        f"{args.http_procs}, medians of {args.repeat}; load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    print(f"{'mode':<8}{'events/s':>11}{'p50 ms':>9}{'p99 ms':>9}{'server cpu s':>14}"
          f"{'us/event':>10}   cpu s: node A (baseline) / node B / redis")  # fmt: skip
    for m, r in res.items():
        print(
            f"{m:<8}{r['events_per_s']:>11,.0f}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}"
            f"{r['server_cpu_s']:>14.2f}{r['server_cpu_us_per_event']:>10.2f}"
            f"   {r['cpu_s_node_a']:.2f} / {r['cpu_s_node_b']:.2f} / {r['cpu_s_redis']:.2f}"
        )
    for m, r in res.items():
        kinds = sorted(k for k in r if k.startswith("cpu_s "))
        if kinds:
            by = ", ".join(f"{k[6:]} {r[k]:.2f}" for k in kinds)
            print(f"  {m} cpu s by process: {by}")
    ratios: dict[str, float] = {}
    if "remote" in res:
        r = res["remote"]
        bound = args.mirror_ms + 10
        verdict = "met" if r["p99_ms"] <= bound else "MISSED"
        print(f"remote p99 {r['p99_ms']:.1f} ms; target <= window + 10 = {bound:g} ms: {verdict}")
        for base in ("local", "redis"):
            if base in res:
                b = res[base]
                cpu = r["server_cpu_us_per_event"] / b["server_cpu_us_per_event"]
                p99 = r["p99_ms"] / b["p99_ms"]
                ratios[f"cpu_per_event_remote_over_{base}"] = cpu
                ratios[f"p99_remote_over_{base}"] = p99
                extra = " (target <= 1.5)" if base == "local" else ""
                print(f"remote / {base}: CPU per event {cpu:.2f}x{extra}, p99 {p99:.2f}x")
    if hops:
        window = args.mirror_ms
        print(
            f"hops (one more remote run, not in the medians; {hops['events_timed_in_redis']:.0f}"
            " events timed in Redis):\n"
            f"  producer -> in Redis  p50 {hops['in_redis_p50_ms']:5.1f}  p99 "
            f"{hops['in_redis_p99_ms']:5.1f} ms  (node A: the window, up to {window:g} ms; its "
            "mirror pass; the SYNC script)\n"
            f"  producer -> reader B  p50 {hops['reader_p50_ms']:5.1f}  p99 "
            f"{hops['reader_p99_ms']:5.1f} ms\n"
            f"  in Redis -> reader B  p50 {hops['reader_p50_ms'] - hops['in_redis_p50_ms']:5.1f} ms"
            " (difference of the p50s: node B's tail and fan-out, the client)"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"args": vars(args), "load_average": os.getloadavg(), "results": res,
                 "ratios": ratios, "hops": hops,
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
                f, indent=2,
            )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
