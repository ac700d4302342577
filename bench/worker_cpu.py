"""CPU per delivered event of each process of ``ringcast serve``: the worker (the producer
side: generator, framing, append, wake) apart from the HTTP processes and the manager.

Runs ``ringcast serve --generator baselines:timestamped`` (the events of
``bench/http_fanout.py``) and the Rust load client (``bench/loadgen``) S streams x R readers,
and reads every process's user + system CPU seconds (``psutil``) before and after the client.
CPU time, not wall time: it stays put while other work shares the machine. ``--checkout`` runs
the same point against other source checkouts (their own ``.venv``), interleaved run by run,
so that an A/B comparison sees the same background load.

    python bench/worker_cpu.py --streams 1000 --readers 1 --tokens-per-s 20 --tokens 200
    python bench/worker_cpu.py --checkout /work/main --checkout . --repeat 3
    python bench/worker_cpu.py --synthetic            # the built-in model instead of the plug-in
                                                      # (no latency then: p99 is meaningless)
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from http_fanout import build_loadgen, run_loadgen  # noqa: E402

ROLES = ("manager", "http", "worker")


def role_of(p: psutil.Process) -> str:
    cmd = " ".join(p.cmdline())
    if "ringcast.server.worker" in cmd:
        return "worker"
    if "ringcast.server.http_process" in cmd:
        return "http"
    return "manager"


def cpu_by_role(root: psutil.Process) -> dict[str, float]:
    out = dict.fromkeys(ROLES, 0.0)
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            out[role_of(p)] += t.user + t.system
        except psutil.NoSuchProcess:
            continue
    return out


def serve(checkout: Path, args: argparse.Namespace, tmp: str) -> tuple[subprocess.Popen[str], int]:
    python = checkout / ".venv" / "bin" / "python"
    env = dict(
        os.environ,
        BENCH_TPS=str(args.tokens_per_s),
        BENCH_PREFILL=str(args.prefill),
        # That checkout's own bench/baselines.py: it imports that checkout's ringcast.
        PYTHONPATH=str(checkout / "bench"),
    )
    gen = [] if args.synthetic else ["--generator", "baselines:timestamped"]
    cmd = [
        str(python), "-m", "ringcast.cli", "serve", "--port", "0",
        "--http-procs", str(args.http_procs), "--workers", "1",
        "--segment", os.path.join(tmp, "bench.seg"), "--log-level", "WARNING",
        "--max-sessions", str(max(64, args.streams * 4)),
        "--tokens-per-s", str(args.tokens_per_s), "--prefill-s", str(args.prefill),
        *gen,
    ]  # fmt: skip
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=str(checkout))
    assert p.stdout is not None
    line = p.stdout.readline()
    m = re.search(r":(\d+) \(", line)
    if not m:
        p.kill()
        raise SystemExit(f"ringcast serve ({checkout}) did not start: {line!r}")
    return p, int(m.group(1))


def measure(checkout: Path, args: argparse.Namespace, loadgen: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="worker-cpu-", dir="/dev/shm") as tmp:
        proc, port = serve(checkout, args, tmp)
        try:
            root = psutil.Process(proc.pid)
            time.sleep(0.5)  # every child started
            before = cpu_by_role(root)
            got = run_loadgen(loadgen, port, args)
            after = cpu_by_role(root)
        finally:
            proc.terminate()
            proc.wait(30)
            if proc.stdout is not None:
                proc.stdout.close()
    # The synthetic model's text carries no timestamps for the client to count: every stream
    # was read to its end (the client fails otherwise), so it delivered every token.
    events = args.streams * args.readers * args.tokens if args.synthetic else int(got["events"])
    out = {f"{r}_us": (after[r] - before[r]) / events * 1e6 for r in ROLES}
    out["server_us"] = sum(out[f"{r}_us"] for r in ROLES)
    out["p99_ms"] = got["p99_ms"] if got["p99_ms"] is not None else float("nan")
    out["events"] = events
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--readers", type=int, default=1, help="readers per stream (incl. POST)")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--tokens-per-s", type=float, default=20.0)
    ap.add_argument("--prefill", type=float, default=1.0)
    ap.add_argument("--http-procs", type=int, default=1)
    ap.add_argument("--synthetic", action="store_true", help="the built-in model, no plug-in")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--checkout",
        action="append",
        help="a source checkout with its own .venv (repeatable; default: this one)",
    )
    args = ap.parse_args()
    checkouts = [Path(c).resolve() for c in (args.checkout or [str(HERE.parent)])]
    loadgen = build_loadgen()
    runs: dict[Path, list[dict[str, float]]] = {c: [] for c in checkouts}
    for i in range(args.repeat):
        for c in checkouts:
            r = measure(c, args, loadgen)
            runs[c].append(r)
            print(
                f"run {i + 1} {str(c)[-28:]}: worker {r['worker_us']:.2f} http {r['http_us']:.2f}"
                f" server {r['server_us']:.2f} us/event, p99 {r['p99_ms']:.1f} ms",
                flush=True,
            )
    print(
        f"{args.streams} streams x {args.readers} readers, {args.tokens} tokens at "
        f"{args.tokens_per_s:g}/s, --http-procs {args.http_procs}, "
        f"{'synthetic model' if args.synthetic else 'baselines:timestamped'}; CPU us per "
        f"delivered event, medians of {args.repeat}"
    )
    print(f"{'checkout':<28}{'worker':>9}{'http':>9}{'manager':>9}{'server':>9}{'p99 ms':>9}")
    for c, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        print(
            f"{str(c)[-28:]:<28}{med['worker_us']:>9.2f}{med['http_us']:>9.2f}"
            f"{med['manager_us']:>9.2f}{med['server_us']:>9.2f}{med['p99_ms']:>9.2f}"
        )


if __name__ == "__main__":
    main()
