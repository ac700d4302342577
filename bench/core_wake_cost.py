"""What one append costs the producer when N reader processes wait on the session.

Readers either block in ``Reader.read`` (futex on the session) or await ``Reader.aread`` on
uvloop (a datagram to each subscribed process's notifier socket). The producer appends
``--events`` 200-byte events as fast as it can and prints its append rate; with ``--strace`` it
runs under ``strace -c -f`` and its wake system calls per append are printed: ``futex`` (blocking
readers) and ``sendto`` (event loops); strace slows it down: read the counts, not the rate.

    python bench/core_wake_cost.py --readers 64 --mode async --strace
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
import shutil
import subprocess
import sys
import time
import uuid

import ringcast

_PRODUCER = r"""
import sys, time, ringcast
seg = ringcast.Segment.open(sys.argv[1])
w = seg.adopt("c", "", int(sys.argv[2]))
ev, n = b"x" * 200, int(sys.argv[3])
t = time.perf_counter()
for _ in range(n):
    w.write(ev)
dt = time.perf_counter() - t
w.finalize()
print(f"{n / dt:.0f}", flush=True)
"""


def _reader(path: str, mode: str, ready: mp.Queue) -> None:  # type: ignore[type-arg]
    seg = ringcast.Segment.open(path)
    r = seg.reader("c")
    if mode == "sync":
        ready.put(1)
        while r.read(1 << 20, timeout=None):
            pass
        return
    import uvloop

    async def main() -> None:
        ready.put(1)
        while await r.aread(1 << 20):
            pass

    uvloop.run(main())


def run(readers: int, mode: str, events: int, strace: bool) -> tuple[int, float | None]:
    path = f"/dev/shm/ringcast-wake-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    seg = ringcast.Segment.create(path, max_sessions=2, session_bytes=(events + 16) * 200)
    try:
        w = seg.create_or_replace("c")
        ctx = mp.get_context("fork")
        ready: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
        procs = [ctx.Process(target=_reader, args=(path, mode, ready)) for _ in range(readers)]
        for p in procs:
            p.start()
        for _ in range(readers):
            ready.get(timeout=60)
        time.sleep(0.5)  # let every reader reach its wait
        cmd = [sys.executable, "-c", _PRODUCER, path, str(w.generation), str(events)]
        if strace:
            cmd = ["strace", "-c", "-f", "-e", "trace=futex,sendto", *cmd]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        for p in procs:
            p.join(120)
        rate = int(out.stdout.split()[0])
        per_append = None
        if strace:
            row = r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)(?:\s+\d+)?\s+(?:futex|sendto)$"
            calls = [int(c) for c in re.findall(row, out.stderr, re.M)]
            per_append = sum(calls) / events
        return rate, per_append
    finally:
        os.unlink(path)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--readers", default="1,8,64", help="comma-separated reader process counts")
    ap.add_argument("--mode", default="sync,async", help="sync, async or both")
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument(
        "--strace",
        action="store_true",
        help="also count the producer's futex and sendto calls per append (needs strace)",
    )
    args = ap.parse_args()
    if args.strace and shutil.which("strace") is None:
        ap.error("strace is not installed")
    print(f"{'mode':<6} {'readers':>7} {'appends/s':>10} {'wakes/append':>13}")
    for n in (int(x) for x in args.readers.split(",")):
        for mode in args.mode.split(","):
            rate, _ = run(n, mode, args.events, False)
            per = run(n, mode, min(args.events, 5000), True)[1] if args.strace else None
            print(f"{mode:<6} {n:>7} {rate:>10} {'' if per is None else f'{per:.1f}':>13}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
