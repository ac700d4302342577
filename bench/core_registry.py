"""What the session registry costs per operation as the table grows, beside Redis.

For each table size (``--slots``) and share of it holding sessions (``--live``), a segment is
filled with finished sessions, then one process (and then ``--contenders`` processes at once,
started on a barrier) time each operation one call at a time:

- **create**: ``create_or_replace`` of a new id (a new session in a free slot);
- **end**: ``evict`` of that session (so the table stays as full as it was);
- **attach**: ``reader`` of an existing id at offset 0 (the reader is closed untimed);
- **miss**: ``get`` of an id that does not exist (what every 404 costs).

Every measuring process is a fresh one (forked after the fill) that first runs an untimed pass
of the same operations on other ids, so one process and eight are measured alike.

Redis does the equivalent in the same run, one hash per session and no pipelining (redis-py
with hiredis): ``HSET`` (create), ``DEL`` (end), ``HGET`` (attach), ``EXISTS`` (miss), on a
database filled with as many hashes. Figures are p50 / p99 in microseconds, seen by the caller
(Python call overhead included, for both systems). A cell whose fill or operations would take
longer than the budgets is skipped and says so (the registry this replaced scanned the table).

    python bench/core_registry.py                       # 4k, 64k, 1M slots x 0, 10, 90 % live
    python bench/core_registry.py --slots 4096 --live 0.1 --contenders 0 --systems ringcast
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import time
import uuid
from collections.abc import Callable
from typing import Any

import ringcast

OPS = ("create", "end", "attach", "miss")
OWNER = "bench-owner"


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _ids(live: int) -> list[str]:
    return [f"live-{i:08d}" for i in range(live)]


class Ringcast:
    name = "ringcast"

    def __init__(self, path: str) -> None:
        self.seg = ringcast.Segment.open(path)

    def create(self, key: str) -> None:
        self.seg.create_or_replace(key, OWNER)

    def end(self, key: str) -> None:
        self.seg.evict(key, OWNER)

    def attach(self, key: str) -> None:
        self.seg.reader(key, 0, OWNER)

    def miss(self, key: str) -> None:
        assert self.seg.get(key, OWNER) is None


class Redis:
    name = "redis"

    def __init__(self, prefix: str) -> None:
        import redis

        self.r = redis.Redis(host="127.0.0.1", port=6379)
        self.prefix = prefix

    def create(self, key: str) -> None:
        self.r.hset(self.prefix + key, mapping={"state": "running", "owner": OWNER, "gen": 1})

    def end(self, key: str) -> None:
        self.r.delete(self.prefix + key)

    def attach(self, key: str) -> None:
        self.r.hget(self.prefix + key, "state")

    def miss(self, key: str) -> None:
        assert not self.r.exists(self.prefix + key)


def _system(name: str, path: str, prefix: str) -> Ringcast | Redis:
    return Ringcast(path) if name == "ringcast" else Redis(prefix)


def _time_ops(
    sys_: Ringcast | Redis, tag: str, live: int, n: int, budget_s: float
) -> dict[str, list[float]]:
    """Times n calls of each operation (fewer if the budget runs out); microseconds."""
    rng = random.Random(tag)
    out: dict[str, list[float]] = {op: [] for op in OPS}
    clock = time.perf_counter_ns
    # create and end in pairs, so the table stays as full as it was.
    deadline = time.monotonic() + budget_s
    for i in range(n):
        key = f"new-{tag}-{i}"
        t0 = clock()
        sys_.create(key)
        t1 = clock()
        sys_.end(key)
        t2 = clock()
        out["create"].append((t1 - t0) / 1e3)
        out["end"].append((t2 - t1) / 1e3)
        if time.monotonic() > deadline:
            break
    lookups: list[tuple[str, Callable[[str], None], Callable[[int], str]]] = [
        ("attach", sys_.attach, lambda i: f"live-{rng.randrange(max(live, 1)):08d}"),
        ("miss", sys_.miss, lambda i: f"missing-{tag}-{i}"),
    ]
    for op, call, key_of in lookups:
        deadline = time.monotonic() + budget_s
        for i in range(n):
            key = key_of(i)
            t0 = clock()
            call(key)
            out[op].append((clock() - t0) / 1e3)
            if time.monotonic() > deadline:
                break
    return out


def _contender(
    system: str,
    path: str,
    prefix: str,
    tag: str,
    live: int,
    warm: int,
    n: int,
    budget_s: float,
    barrier: Any,
    results: Any,
) -> None:
    sys_ = _system(system, path, prefix)
    # Untimed first: a fresh process maps the segment's pages into its page table as it
    # touches them (minor faults); a server's long-lived processes have done so long ago.
    _time_ops(sys_, f"{tag}-warm", live, warm, budget_s)
    barrier.wait()
    results.put(_time_ops(sys_, tag, live, n, budget_s))


def _measure(
    system: str, path: str, prefix: str, live: int, procs: int, n: int, budget_s: float
) -> dict[str, list[float]]:
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(procs)
    results = ctx.Queue()
    ps = [
        ctx.Process(
            target=_contender,
            args=(
                system,
                path,
                prefix,
                f"p{i}",
                live,
                n,
                max(1, n // procs),
                budget_s,
                barrier,
                results,
            ),
        )
        for i in range(procs)
    ]
    for p in ps:
        p.start()
    merged: dict[str, list[float]] = {op: [] for op in OPS}
    for _ in ps:
        for op, xs in results.get(timeout=600).items():
            merged[op].extend(xs)
    for p in ps:
        p.join(60)
    return merged


def _fill_ringcast(seg: ringcast.Segment, ids: list[str], budget_s: float) -> str | None:
    """Creates and finalizes a session per id; None, or why the fill was given up."""
    t0 = time.monotonic()
    for i, key in enumerate(ids):
        seg.create_or_replace(key, OWNER).finalize()
        if i == 500 or (i > 500 and i % 20_000 == 0):
            spent = time.monotonic() - t0
            eta = spent / (i + 1) * len(ids)
            if eta > budget_s:
                return f"filling {len(ids):,} sessions would take ~{eta:,.0f} s"
    return None


def _fill_redis(prefix: str, ids: list[str]) -> None:
    import redis

    r = redis.Redis(host="127.0.0.1", port=6379)
    for lo in range(0, len(ids), 10_000):
        p = r.pipeline(transaction=False)
        for key in ids[lo : lo + 10_000]:
            p.hset(prefix + key, mapping={"state": "done", "owner": OWNER, "gen": 1})
        p.execute()


def _clear_redis(prefix: str, ids: list[str]) -> None:
    import redis

    r = redis.Redis(host="127.0.0.1", port=6379)
    for lo in range(0, len(ids), 10_000):
        r.delete(*[prefix + k for k in ids[lo : lo + 10_000]])


def _cells(lat: dict[str, list[float]]) -> str:
    return " | ".join(
        f"{_pct(lat[op], 0.5):,.1f} / {_pct(lat[op], 0.99):,.1f}" if lat[op] else "-" for op in OPS
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--slots", default="4096,65536,1048576", help="table sizes (%(default)s)")
    ap.add_argument(
        "--live", default="0,0.1,0.9", help="shares of the table holding sessions (%(default)s)"
    )
    ap.add_argument(
        "--ops", type=int, default=2000, help="calls of each operation per cell (%(default)s)"
    )
    ap.add_argument(
        "--contenders",
        type=int,
        default=8,
        help="processes in the contended run; 0 = none (%(default)s)",
    )
    ap.add_argument("--systems", default="ringcast,redis", help="%(default)s")
    ap.add_argument(
        "--fill-budget-s",
        type=float,
        default=90.0,
        help="skip a cell whose fill takes longer (%(default)s)",
    )
    ap.add_argument(
        "--op-budget-s",
        type=float,
        default=4.0,
        help="stop timing an operation after this long (%(default)s)",
    )
    args = ap.parse_args()
    slots = [int(x) for x in args.slots.split(",")]
    lives = [float(x) for x in args.live.split(",")]
    systems = args.systems.split(",")
    procs = [1] + ([args.contenders] if args.contenders > 1 else [])
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, load average {os.getloadavg()}"
    )
    print(
        f"# ringcast layout {ringcast.LAYOUT_VERSION}; p50 / p99 in µs per call; "
        f"{args.ops} calls per cell"
    )
    print("| slots | live | procs | system | create | end | attach | miss |")
    print("|---:|---:|---:|---|---|---|---|---|")
    for n in slots:
        for share in lives:
            live = int(n * share)
            ids = _ids(live)
            path = f"/dev/shm/ringcast-bench-registry-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            prefix = f"bench-registry-{os.getpid()}-{uuid.uuid4().hex[:6]}:"
            seg = ringcast.Segment.create(path, max_sessions=n, session_bytes=4096)
            try:
                skip = (
                    _fill_ringcast(seg, ids, args.fill_budget_s) if "ringcast" in systems else None
                )
                if live == 0:
                    seg.create_or_replace("live-00000000", OWNER).finalize()
                if "redis" in systems:
                    _fill_redis(prefix, ids or ["live-00000000"])
                for system in systems:
                    for p in procs:
                        row = f"| {n:,} | {share:.0%} | {p} | {system} |"
                        if system == "ringcast" and skip:
                            print(f"{row} skipped: {skip} | | | |", flush=True)
                            continue
                        lat = _measure(
                            system, path, prefix, max(live, 1), p, args.ops, args.op_budget_s
                        )
                        print(f"{row} {_cells(lat)} |", flush=True)
            finally:
                seg.close()
                seg.unlink()
                if "redis" in systems:
                    _clear_redis(prefix, ids or ["live-00000000"])
    print(f"# done {time.strftime('%H:%M:%S UTC', time.gmtime())}, load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
