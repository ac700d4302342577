"""What the manager's periodic sweeps cost as the segment fills with finished sessions.

A busy node keeps every finished stream resumable for ``--ttl`` (300 s by default): a hundred
thousand sessions is an ordinary table. The manager looks at them twice on a timer: the
dead-producer sweep five times a second and the expiry (TTL, idle, Durable Streams) once a
second (docs/SERVER.md, "The manager's sweeps"). For each table size this fills a segment
with that many finished sessions (plus a few running ones, anonymous ones and Durable
Streams), then times, in the same run:

- **scan** (what the manager does): ``Segment.sweep_candidates`` (dead producers and
  anonymous sessions), and ``Segment.expiry_candidates`` with ``Segment.list(owner_prefix=
  "ds:")`` (expiry): one pass over the slots in Rust, objects only of the sessions acted on;
- **list** (the baseline): ``Segment.list()`` of every session, filtered in Python as the
  sweeps' rules say. That is what the expiry did before; the dead-producer sweep then
  snapshotted every session in Rust but made objects of its candidates only (its figures
  are in bench/RESULTS.md, "The manager's sweeps").

It prints the median milliseconds per sweep of each kind and what the manager's timers make
of them: milliseconds of CPU per second (five dead-producer sweeps and one expiry).

    python bench/manager_sweeps.py                     # 1k, 10k, 100k finished sessions
    python bench/manager_sweeps.py --sessions 100000 --repeat 9
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import ringcast

ANON = "anon"
DURABLE = "ds:"
TTL_S = 300.0
IDLE_S = 600.0


def fill(seg: ringcast.Segment, finished: int) -> None:
    """``finished`` finished sessions of a few owners, 16 running ones, 16 anonymous and 16
    Durable Streams: what the sweeps walk past, and a few they look at."""
    for i in range(finished):
        w = seg.create_or_replace(f"conv-{i:08d}", f"key-{i % 7}")
        w.write(b"data: x\n\n")
        w.finalize()
    for i in range(16):
        seg.create_or_replace(f"live-{i}", "key-0").write(b"data: y\n\n")
        seg.create_or_replace(f"anon-{i}", ANON).write(b"data: z\n\n")
        seg.create_or_replace(f"stream-{i}", DURABLE + "key-0")


def scan_sweep(seg: ringcast.Segment) -> int:
    return len(seg.sweep_candidates(ANON, DURABLE))


def scan_expiry(seg: ringcast.Segment) -> int:
    durable = seg.list(owner_prefix=DURABLE)
    return len(durable) + len(seg.expiry_candidates(TTL_S, IDLE_S, DURABLE))


def list_sweep(seg: ringcast.Segment) -> int:
    return sum(
        1
        for i in seg.list()
        if not i.owner.startswith(DURABLE)
        and (i.owner == ANON or (i.state == "running" and not i.producer_alive))
    )


def list_expiry(seg: ringcast.Segment) -> int:
    now = time.time()
    n = 0
    for i in seg.list():
        if i.owner.startswith(DURABLE):
            n += 1
        elif i.is_done:
            n += now - i.completed_at >= TTL_S
        else:
            n += now - i.last_write_at >= IDLE_S
    return n


def median_ms(f: Callable[[ringcast.Segment], int], seg: ringcast.Segment, repeat: int) -> float:
    f(seg)  # warm: the pages of the table mapped in
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f(seg)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(
        description="The manager's sweeps over a segment of finished sessions: one scan of "
        "the slots in Rust against a listing of every session (the way before), same run."
    )
    ap.add_argument(
        "--sessions",
        default="1000,10000,100000",
        help="comma-separated numbers of finished sessions (%(default)s)",
    )
    ap.add_argument("--repeat", type=int, default=5, help="timed sweeps per figure (%(default)s)")
    args = ap.parse_args()
    try:
        sizes = [int(x) for x in args.sessions.split(",")]
    except ValueError:
        raise SystemExit(f"--sessions: comma-separated integers, got {args.sessions!r}") from None
    if any(n < 0 or n > 1_000_000 for n in sizes) or args.repeat < 1:
        raise SystemExit("--sessions: each 0 to 1,000,000; --repeat: at least 1")
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, medians of {args.repeat}")
    print(
        f"{'sessions':>9} {'sweep scan':>11} {'sweep list':>11} {'expiry scan':>12} "
        f"{'expiry list':>12} {'manager ms/s scan':>18} {'list':>8} {'x':>6}"
    )
    for n in sizes:
        with tempfile.TemporaryDirectory(dir=shm) as tmp:
            seg = ringcast.Segment.create(
                os.path.join(tmp, "sweeps.seg"),
                max_sessions=max(1024, n + 64),
                session_bytes=64 * 1024,
            )
            try:
                fill(seg, n)
                s_scan = median_ms(scan_sweep, seg, args.repeat)
                s_list = median_ms(list_sweep, seg, args.repeat)
                e_scan = median_ms(scan_expiry, seg, args.repeat)
                e_list = median_ms(list_expiry, seg, args.repeat)
            finally:
                seg.close()
        per_s_scan, per_s_list = 5 * s_scan + e_scan, 5 * s_list + e_list
        print(
            f"{n:>9} {s_scan:>9.2f}ms {s_list:>9.2f}ms {e_scan:>10.2f}ms {e_list:>10.2f}ms "
            f"{per_s_scan:>16.1f}ms {per_s_list:>6.1f}ms {per_s_list / per_s_scan:>5.1f}x"
        )


if __name__ == "__main__":
    main()
