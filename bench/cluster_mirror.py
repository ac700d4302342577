"""Cost and latency of mirroring streams to Redis, at the library level (no HTTP).

``--producers`` processes append events to ``--streams`` sessions of a segment at
``--tokens-per-s`` each (events of ~``--event-bytes`` bytes, each carrying the wall-clock ns
at which it was appended). ``--mirror-procs`` mirror processes (:class:`Mirror` on uvloop,
what a node's mirror children run, each with its share of the segment's slots) copy them to a
private ``redis-server`` every ``--mirror-ms``. This process reads ``--remote-readers`` of the
streams back from Redis with one :class:`RemoteStore` (what a node that does not hold them
does: shared tails, ``XREAD BLOCK``), and measures:

- events produced per second (against the offered rate: on a machine too small for the run
  the producers fall behind too), mirrored MB/s, the mirror processes' CPU per mirrored MB
  and per second, and ``redis-server``'s CPU per mirrored MB;
- whether the mirror keeps up: its lag (age of the oldest byte not yet in Redis, the largest
  of its processes', sampled every 50 ms while producing) and the duration of its windows,
  p50/p99: keeping up, the lag stays near one window;
- append -> remote-reader latency, p50/p99 (the target: p99 <= flush window + 10 ms);
- time to first byte of a resume from Redis (open at a mid offset + first read), p50/p99;
- a DELETE's way to the producer: ``RemoteStore.cancel`` until ``Writer.cancelled``, p50/p99.

With ``--capacity`` it measures instead what a window costs, in CPU time, which the load of
the machine hardly changes: ``--streams`` sessions each get one event per window, and mirror 0
of ``--mirror-procs`` (in this process) flushes its share, ``--windows`` times; printed: its
CPU and Redis' per session per window, and the streams at ``--tokens-per-s`` one core of each
keeps up with at ``--mirror-ms``.

    python bench/cluster_mirror.py --streams 1000 --tokens-per-s 50 --seconds 10
    python bench/cluster_mirror.py --capacity --streams 10000 --mirror-procs 3
    python bench/cluster_mirror.py --streams 10000 --mirror-procs 3 --producers 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import msgspec
import uvloop
from ringcast import Segment
from ringcast.server.cluster.client import connect
from ringcast.server.cluster.mirror import Mirror, MirrorConfig
from ringcast.server.cluster.remote import RemoteStore

OWNER = "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def quantile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


STEPS = 50
"""The producer spreads each token period over this many steps (a sleep per step, not per
event: at 10,000 streams x 50 tokens/s a sleep per event would be the producer's whole cost)."""


def produce(
    seg_path: str, names: list[str], rate: float, seconds: float, event_bytes: int, out: Any
) -> None:
    """A producer process: one event per stream of ``names`` every 1/rate s, the streams
    spread over the period; ``out``: shared counter of the events it wrote."""
    seg = Segment.open(seg_path)
    writers = [seg.create_or_replace(name, OWNER) for name in names]
    pad = "x" * max(0, event_bytes - 60)
    period = 1.0 / rate
    per_step = -(-len(writers) // STEPS)
    start = time.monotonic()
    n = written = 0
    while time.monotonic() - start < seconds:
        tick = start + n * period
        for step in range(STEPS):
            delay = tick + period * step / STEPS - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            ns = time.time_ns()
            for w in writers[step * per_step : (step + 1) * per_step]:
                w.write(f'data: {{"t": {ns}, "pad": "{pad}"}}\n\n'.encode())
                written += 1
        n += 1
    for w in writers:
        w.finalize()
    out.value = written


async def wait_for_redis(client: Any) -> None:
    """Until the Redis just started answers ``PING``."""
    while True:
        try:
            await client.ping()
            return
        except Exception:
            await asyncio.sleep(0.05)


async def read_remote(store: RemoteStore, conv: str, lat: list[float]) -> int:
    while (await store.info(conv, OWNER)) is None:
        await asyncio.sleep(0.01)
    reader = await store.open(conv, OWNER, 0)
    buf = b""
    n = 0
    while data := await reader.aread():
        now = time.time_ns()
        buf += data
        *events, buf = buf.split(b"\n\n")
        for e in events:
            t = int(e[e.index(b'"t": ') + 5 : e.index(b",")])
            lat.append((now - t) / 1e6)
            n += 1
    reader.close()
    return n


async def cancel_latency(store: RemoteStore, seg_path: str, n: int) -> list[float]:
    """DELETE on another node -> the producer's ``Writer.cancelled``: the control path (the
    END script, the control stream, the mirror's ``XREAD BLOCK``, ``evict_slot``)."""
    seg = Segment.open(seg_path)
    out = []
    for i in range(n):
        conv = f"cancel-{i}"
        w = seg.create_or_replace(conv, OWNER)
        w.write(b"data: x\n\n")
        while (await store.info(conv, OWNER)) is None:
            await asyncio.sleep(0.005)
        t0 = time.perf_counter()
        await store.cancel(conv, OWNER)
        while not w.cancelled:
            await asyncio.sleep(0.0002)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


async def resume_ttfb(store: RemoteStore, streams: int, n: int) -> list[float]:
    out = []
    for _ in range(n):
        conv = f"s{random.randrange(streams)}"
        info = await store.info(conv, OWNER)
        assert info is not None
        t0 = time.perf_counter()
        reader = await store.open(conv, OWNER, random.randrange(max(1, info.total_bytes)))
        await reader.aread()
        out.append((time.perf_counter() - t0) * 1e3)
        reader.close()
    return out


def mirror_main(cfg: MirrorConfig, shared: Any) -> None:
    """A mirror process (what ``ringcast serve --redis`` runs as its ``mirror`` children),
    publishing its lag (seconds, bytes) and its last window's duration into ``shared``."""

    async def go() -> None:
        seg = Segment.open(cfg.segment)
        client = connect(cfg.redis_url)
        mirror = Mirror(cfg, seg, client)
        task = asyncio.create_task(mirror.run())
        while not task.done():
            st = mirror.stats
            shared[0], shared[1], shared[2] = st.lag_seconds, st.lag_bytes, st.last_window_s
            await asyncio.wait([task], timeout=0.02)
        task.result()

    uvloop.run(go())  # the loop ringcast serve's children run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--tokens-per-s", type=float, default=50.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--event-bytes", type=int, default=150)
    ap.add_argument("--mirror-ms", type=float, default=25.0)
    ap.add_argument(
        "--mirror-procs", type=int, default=1, help="mirror processes, as ringcast serve's (1)"
    )
    ap.add_argument(
        "--producers", type=int, default=1, help="producer processes sharing the streams (1)"
    )
    ap.add_argument("--remote-readers", type=int, default=50)
    ap.add_argument("--resumes", type=int, default=200)
    ap.add_argument("--cancels", type=int, default=50)
    ap.add_argument(
        "--capacity",
        action="store_true",
        help="measure the CPU one window costs instead (no producers, no readers: see below)",
    )
    ap.add_argument("--windows", type=int, default=40, help="windows of --capacity (40)")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="ringcast-bench-")
    port = free_port()
    redis = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
         "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", tmp],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    # In shared memory, as ringcast serve's (on a disk the first write of each session waits
    # for the filesystem to allocate its page).
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else tmp
    seg_path = os.path.join(shm, f"ringcast-bench-{os.getpid()}.seg")
    seg = Segment.create(
        seg_path, max_sessions=args.streams + args.cancels + 8, session_bytes=256 * 1024
    )
    cfg = MirrorConfig(
        segment=seg_path,
        node_id="bench-node",
        instance="bench",
        redis_url=f"redis://127.0.0.1:{port}/0",
        mirror_ms=args.mirror_ms,
        session_bytes=256 * 1024,
        ttl=600,
        procs=args.mirror_procs,
    )
    ctx = mp.get_context("spawn")
    mirrors: list[tuple[Any, Any]] = []
    for index in range(0 if args.capacity else args.mirror_procs):
        shared = ctx.Array("d", 3, lock=False)
        proc = ctx.Process(
            target=mirror_main, args=(msgspec.structs.replace(cfg, index=index), shared)
        )
        proc.daemon = True
        proc.start()
        mirrors.append((proc, shared))
    try:
        if args.capacity:
            result = uvloop.run(capacity(args, cfg, redis.pid))
        else:
            result = asyncio.run(run(args, cfg, mirrors, redis.pid, seg_path))
    finally:
        for proc, _ in mirrors:
            proc.kill()
            proc.join()
        redis.kill()
        redis.wait()
        seg.unlink()
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


async def capacity(args: argparse.Namespace, cfg: MirrorConfig, redis_pid: int) -> dict[str, Any]:
    """``--capacity``: what one window costs, in CPU, independent of the machine's load. In
    this process: ``--streams`` sessions, one event each per window, then one flush of mirror
    0 of ``--mirror-procs`` (its share of the sessions), ``--windows`` times. The mirror's
    CPU (this process's, the flush only) and Redis' per session per window give the streams
    one core of each keeps up with at ``--tokens-per-s`` and ``--mirror-ms``."""
    seg = Segment.open(cfg.segment)
    client = connect(cfg.redis_url)
    await wait_for_redis(client)
    mirror = Mirror(cfg, seg, client)
    writers = [seg.create_or_replace(f"s{i}", OWNER) for i in range(args.streams)]
    pad = "x" * max(0, args.event_bytes - 60)
    warm = 3
    mine = 0
    cpu = redis_cpu = 0.0
    for window in range(warm + args.windows):
        for w in writers:
            w.write(f'data: {{"t": {time.time_ns()}, "pad": "{pad}"}}\n\n'.encode())
        c0, r0 = time.process_time(), cpu_s(redis_pid)
        assert await mirror.flush()
        if window >= warm:
            cpu += time.process_time() - c0
            redis_cpu += cpu_s(redis_pid) - r0
        mine = mirror.stats.sessions
    await client.aclose()
    units = mine * args.windows
    per_stream_per_s = min(args.tokens_per_s, 1000.0 / args.mirror_ms)
    mirror_us, redis_us = cpu * 1e6 / units, redis_cpu * 1e6 / units
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average": os.getloadavg(),
        "mode": "capacity",
        "streams": args.streams,
        "mirror_procs": args.mirror_procs,
        "sessions_of_this_mirror": mine,
        "windows": args.windows,
        "event_bytes": args.event_bytes,
        "mirror_cpu_us_per_session_window": round(mirror_us, 2),
        "redis_cpu_us_per_session_window": round(redis_us, 2),
        "streams_per_mirror_core": round(1e6 / (mirror_us * per_stream_per_s)),
        "streams_per_redis_core": round(1e6 / (redis_us * per_stream_per_s)),
    }


async def sample_lag(mirrors: list[tuple[Any, Any]], out: list[tuple[float, float, float]]) -> None:
    """Every 50 ms: the node's mirror lag (the largest of its processes', in seconds and the
    sum in bytes) and its longest last window."""
    while True:
        shared = [m[1] for m in mirrors]
        out.append(
            (max(x[0] for x in shared), sum(x[1] for x in shared), max(x[2] for x in shared))
        )
        await asyncio.sleep(0.05)


async def run(
    args: argparse.Namespace,
    cfg: MirrorConfig,
    mirrors: list[tuple[Any, Any]],
    redis_pid: int,
    seg_path: str,
) -> dict[str, Any]:
    client = connect(cfg.redis_url)
    await wait_for_redis(client)
    store = RemoteStore(connect(cfg.redis_url), "bench-reader", 600_000)
    loop = asyncio.get_running_loop()
    pids = [m[0].pid for m in mirrors]

    def cpu() -> tuple[float, float]:
        return sum(cpu_s(p) for p in pids), cpu_s(redis_pid)

    cpu0 = cpu()
    t0 = time.monotonic()
    ctx = mp.get_context("spawn")
    names = [f"s{i}" for i in range(args.streams)]
    producers = []
    for i in range(args.producers):
        written = ctx.Value("q", 0, lock=False)
        proc = ctx.Process(
            target=produce,
            args=(
                seg_path,
                names[i :: args.producers],
                args.tokens_per_s,
                args.seconds,
                args.event_bytes,
                written,
            ),
        )
        proc.start()
        producers.append((proc, written))
    producing = [loop.run_in_executor(None, p.join) for p, _ in producers]
    lat: list[float] = []
    lags: list[tuple[float, float, float]] = []
    sampler = asyncio.create_task(sample_lag(mirrors, lags))
    readers = [
        asyncio.create_task(read_remote(store, f"s{i}", lat))
        for i in range(min(args.remote_readers, args.streams))
    ]
    await asyncio.gather(*producing)
    produced_s = time.monotonic() - t0
    sampler.cancel()
    events = sum(await asyncio.gather(*readers))
    wall = time.monotonic() - t0
    cpu1 = cpu()
    produced = sum(w.value for _, w in producers)
    # While producing, after the first second (the streams' claims):
    steady = lags[20:] or lags
    lag_s = [x[0] * 1e3 for x in steady]
    lag_b = [x[1] for x in steady]
    windows = [x[2] * 1e3 for x in steady]
    info = await client.info("memory")
    ttfb = await resume_ttfb(store, args.streams, args.resumes)
    cancels = await cancel_latency(store, seg_path, args.cancels)
    total = 0
    for i in range(args.streams):
        ri = await store.info(f"s{i}", OWNER)
        total += ri.total_bytes if ri is not None else 0
    await client.aclose()
    await store.client.aclose()
    mb = total / 1e6
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average": os.getloadavg(),
        "streams": args.streams,
        "tokens_per_s": args.tokens_per_s,
        "mirror_ms": args.mirror_ms,
        "mirror_procs": args.mirror_procs,
        "producers": args.producers,
        "seconds": round(wall, 2),
        "produced_events_per_s": round(produced / produced_s),
        "offered_events_per_s": round(args.streams * args.tokens_per_s),
        "mirrored_mb": round(mb, 2),
        "mirrored_mb_per_s": round(mb / wall, 3),
        "mirror_lag_ms_p50": round(quantile(lag_s, 0.5), 1),
        "mirror_lag_ms_p99": round(quantile(lag_s, 0.99), 1),
        "mirror_lag_ms_max": round(max(lag_s, default=float("nan")), 1),
        "mirror_lag_kb_p99": round(quantile(lag_b, 0.99) / 1e3, 1),
        "mirror_window_ms_p50": round(quantile(windows, 0.5), 1),
        "mirror_window_ms_p99": round(quantile(windows, 0.99), 1),
        "mirror_cpu_s_per_s": round((cpu1[0] - cpu0[0]) / wall, 3),
        "mirror_cpu_ms_per_mb": round((cpu1[0] - cpu0[0]) * 1e3 / mb, 1),
        "redis_cpu_s_per_s": round((cpu1[1] - cpu0[1]) / wall, 3),
        "redis_cpu_ms_per_mb": round((cpu1[1] - cpu0[1]) * 1e3 / mb, 1),
        "redis_used_memory_mb": round(int(info["used_memory"]) / 1e6, 1),
        "remote_events": events,
        "remote_latency_ms_p50": round(quantile(lat, 0.5), 2),
        "remote_latency_ms_p99": round(quantile(lat, 0.99), 2),
        "resume_ttfb_ms_p50": round(quantile(ttfb, 0.5), 2),
        "resume_ttfb_ms_p99": round(quantile(ttfb, 0.99), 2),
        "remote_cancel_ms_p50": round(quantile(cancels, 0.5), 2),
        "remote_cancel_ms_p99": round(quantile(cancels, 0.99), 2),
    }


if __name__ == "__main__":
    sys.exit(main())
