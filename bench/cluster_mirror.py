"""Cost and latency of mirroring streams to Redis, at the library level (no HTTP).

One producer process appends events to ``--streams`` sessions of a segment at
``--tokens-per-s`` each (events of ~``--event-bytes`` bytes, each carrying the wall-clock ns
at which it was appended). A mirror process (:func:`run_mirror`, what a node's mirror child
runs) copies them to a private ``redis-server`` every ``--mirror-ms``. This process reads
``--remote-readers`` of the streams back from Redis with one :class:`RemoteStore` (what a
node that does not hold them does: shared tails, ``XREAD BLOCK``), and measures:

- mirrored entries/s and bytes/s, the mirror process's CPU per mirrored MB and per second,
  and ``redis-server``'s CPU (``INFO cpu``) per mirrored MB;
- append -> remote-reader latency, p50/p99 (the target: p99 <= flush window + 10 ms);
- time to first byte of a resume from Redis (open at a mid offset + first read), p50/p99;
- a DELETE's way to the producer: ``RemoteStore.cancel`` until ``Writer.cancelled``, p50/p99.

    python bench/cluster_mirror.py --streams 1000 --tokens-per-s 50 --seconds 10
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

from ringcast import Segment
from ringcast.server.cluster.client import connect
from ringcast.server.cluster.mirror import MirrorConfig, run_mirror
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


def produce(seg_path: str, streams: int, rate: float, seconds: float, event_bytes: int) -> None:
    """The producer process: one event per stream every 1/rate s, spread over the period."""
    seg = Segment.open(seg_path)
    writers = [seg.create_or_replace(f"s{i}", OWNER) for i in range(streams)]
    pad = "x" * max(0, event_bytes - 60)
    period = 1.0 / rate
    start = time.monotonic()
    n = 0
    while time.monotonic() - start < seconds:
        tick = start + n * period
        for i, w in enumerate(writers):
            due = tick + period * i / streams
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            w.write(f'data: {{"t": {time.time_ns()}, "pad": "{pad}"}}\n\n'.encode())
        n += 1
    for w in writers:
        w.finalize()


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


def mirror_main(cfg: MirrorConfig) -> None:
    """The mirror process (what ``ringcast serve --redis`` runs as its ``mirror`` child)."""
    asyncio.run(run_mirror(cfg))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--tokens-per-s", type=float, default=50.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--event-bytes", type=int, default=150)
    ap.add_argument("--mirror-ms", type=float, default=25.0)
    ap.add_argument("--remote-readers", type=int, default=50)
    ap.add_argument("--resumes", type=int, default=200)
    ap.add_argument("--cancels", type=int, default=50)
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="ringcast-bench-")
    port = free_port()
    redis = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
         "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", tmp],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    seg_path = os.path.join(tmp, "seg")
    seg = Segment.create(
        seg_path, max_sessions=args.streams + args.cancels + 8, session_bytes=256 * 1024
    )
    cfg = MirrorConfig(
        segment=seg_path,
        node_id="bench-node",
        redis_url=f"redis://127.0.0.1:{port}/0",
        mirror_ms=args.mirror_ms,
        session_bytes=256 * 1024,
        ttl=600,
    )
    mirror = mp.get_context("spawn").Process(target=mirror_main, args=(cfg,), daemon=True)
    mirror.start()
    try:
        assert mirror.pid is not None
        result = asyncio.run(run(args, cfg, mirror.pid, redis.pid, seg_path))
    finally:
        mirror.kill()
        mirror.join()
        redis.kill()
        redis.wait()
        seg.unlink()
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


async def run(
    args: argparse.Namespace, cfg: MirrorConfig, mirror_pid: int, redis_pid: int, seg_path: str
) -> dict[str, Any]:
    client = connect(cfg.redis_url)
    while True:
        try:
            await client.ping()
            break
        except Exception:
            await asyncio.sleep(0.05)
    store = RemoteStore(connect(cfg.redis_url), "bench-reader", 600_000)
    loop = asyncio.get_running_loop()
    cpu0 = (cpu_s(mirror_pid), cpu_s(redis_pid))
    t0 = time.monotonic()
    producer = mp.get_context("spawn").Process(
        target=produce,
        args=(seg_path, args.streams, args.tokens_per_s, args.seconds, args.event_bytes),
    )
    producer.start()
    producing = loop.run_in_executor(None, producer.join)
    lat: list[float] = []
    readers = [
        asyncio.create_task(read_remote(store, f"s{i}", lat))
        for i in range(min(args.remote_readers, args.streams))
    ]
    await producing
    events = sum(await asyncio.gather(*readers))
    wall = time.monotonic() - t0
    cpu1 = (cpu_s(mirror_pid), cpu_s(redis_pid))
    info = await client.info("memory")
    ttfb = await resume_ttfb(store, args.streams, args.resumes)
    cancels = await cancel_latency(store, seg_path, args.cancels)
    total = 0
    for i in range(args.streams):
        ri = await store.info(f"s{i}", OWNER)
        total += ri.total_bytes if ri is not None else 0
    entries = args.streams * args.tokens_per_s * args.seconds  # upper bound: events
    await client.aclose()
    await store.client.aclose()
    mb = total / 1e6
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "streams": args.streams,
        "tokens_per_s": args.tokens_per_s,
        "mirror_ms": args.mirror_ms,
        "seconds": round(wall, 2),
        "mirrored_mb": round(mb, 2),
        "mirrored_mb_per_s": round(mb / wall, 3),
        "events_per_s": round(entries / wall),
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
