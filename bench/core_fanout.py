"""Fan-out benchmark of the ringcast core against Redis Streams and a pipe per reader.

One producer process writes fixed-size events (default 200 bytes); 1 / 8 / 64 reader processes
receive every event. Each event carries its sequence number and the CLOCK_MONOTONIC time at
which the producer handed it over; readers check the sequence (nothing lost, nothing repeated)
and compute append-to-reader latency on receipt.

Two phases per transport and reader count:
- throughput: the producer writes ``--events`` events as fast as the transport takes them;
  delivered events/s = readers x events / (first append -> last reader done);
  the latency of that phase is reported too, but it is queueing under saturation.
- paced: ``--paced-events`` events, one every ``--paced-interval-us``, so readers are asleep
  when an event arrives: this latency is the wake latency.

Transports:
- ringcast-sync:  ``Reader.read`` (blocking futex wait, GIL released);
- ringcast-async: ``await Reader.aread`` on a uvloop loop (notifier thread + eventfd);
- redis:          Redis Streams on loopback, redis-py + hiredis; the producer pipelines XADD in
                  batches of ``--redis-batch`` (one entry per event), readers XREAD BLOCK with a
                  large COUNT; the strongest fair form we know for one-entry-per-event;
- pipe:           one os.pipe per reader; the producer writes each event (or ``--batch``
                  events) to every pipe.

ringcast and pipe producers write one event per call by default, as a server emits one SSE
chunk at a time; ``--batch N`` shows what coalescing would buy them.

    python bench/core_fanout.py --json bench/out/core_fanout.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import multiprocessing as mp
import os
import platform
import queue
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from ringcast.replay.loadtest import private_redis_argv

CLOCK = time.CLOCK_MONOTONIC
HEAD = struct.Struct("<QQ")  # sequence number, CLOCK_MONOTONIC ns at append
WORDS_PER_EVENT_OF = 8  # bytes per "Q" word
END_SEQ = 2**64 - 1
TRANSPORTS = ("ringcast-sync", "ringcast-async", "redis", "pipe")
QUANTILE_POINTS = 1000
CTX = mp.get_context("fork")


def now_ns() -> int:
    return time.clock_gettime_ns(CLOCK)


# --- events ------------------------------------------------------------------------------------


class EventMaker:
    """Builds events in place: a template with the 16-byte head rewritten per event."""

    def __init__(self, size: int) -> None:
        if size < HEAD.size or size % WORDS_PER_EVENT_OF:
            raise SystemExit(f"--event-bytes must be a multiple of 8 and >= 16, got {size}")
        self.size = size
        filler = (b"data: " + b"t" * size)[: size - HEAD.size - 2] + b"\n\n"
        self.buf = bytearray(HEAD.size) + filler

    def one(self, seq: int) -> bytes:
        HEAD.pack_into(self.buf, 0, seq, now_ns())
        return bytes(self.buf)

    def batch(self, first: int, n: int) -> bytes:
        out = self.buf * n
        ts = now_ns()
        for i in range(n):
            HEAD.pack_into(out, i * self.size, first + i, ts)
        return bytes(out)


class Receiver:
    """Reader-side bookkeeping: on receipt only the time and the bytes are kept (so measuring
    costs the reader next to nothing between wake-ups, and readers sharing a core do not delay
    each other by parsing); after the run the events are reassembled from the byte chunks,
    the sequence is checked and one latency per event is computed."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.stride = size // WORDS_PER_EVENT_OF
        self.received: list[tuple[int, bytes]] = []
        self.total = 0
        self.tail = b""  # the last `size` bytes received, to spot the end marker
        self.t_first = 0
        self.t_last = 0
        self.errors: list[str] = []
        self.ended = False

    def feed(self, chunk: bytes) -> None:
        t = now_ns()
        if not self.t_first:
            self.t_first = t
        self.t_last = t
        self.received.append((t, chunk))
        self.total += len(chunk)
        size = self.size
        self.tail = chunk[-size:] if len(chunk) >= size else (self.tail + chunk)[-size:]
        if self.total % size == 0 and HEAD.unpack_from(self.tail)[0] == END_SEQ:
            self.ended = True

    def _parse(self) -> tuple[int, list[int]]:
        """Events in order and their latencies; gaps and repeats go to ``errors``."""
        pending = b""
        next_seq = 0
        latencies: list[int] = []
        for t, chunk in self.received:
            data = pending + chunk if pending else chunk
            whole = len(data) - len(data) % self.size
            pending = data[whole:]
            if not whole:
                continue
            words = memoryview(data)[:whole].cast("Q")
            seqs = words[0 :: self.stride]
            stamps = words[1 :: self.stride].tolist()
            n = len(stamps)
            first, last = seqs[0], seqs[n - 1]
            if last == END_SEQ:
                n -= 1
                stamps.pop()
                if n == 0:
                    continue
                last = seqs[n - 1]
            if first != next_seq or last != first + n - 1:
                self.errors.append(f"sequence gap: expected {next_seq}, got {first}..{last}")
            next_seq = last + 1
            latencies.extend([t - s for s in stamps])
        return next_seq, latencies

    def feed_entries(self, payloads: list[bytes]) -> None:
        self.feed(b"".join(payloads))

    def result(self) -> dict[str, Any]:
        events, latencies = self._parse()
        lat = sorted(latencies)
        if lat:
            step = max(1, len(lat) // QUANTILE_POINTS)
            points = lat[::step]
        else:
            points = []
        return {
            "events": events,
            "t_first": self.t_first,
            "t_last": self.t_last,
            "lat_points": points,
            "errors": self.errors[:5],
        }


# --- transports: each has a producer and a reader body -----------------------------------------


@dataclass
class Phase:
    events: int
    pace_ns: int  # 0: as fast as possible
    batch: int


def _pace(i: int, t0: int, pace_ns: int) -> None:
    # Sleep, never spin: with two cores a spinning producer would take a whole core from the
    # readers. Oversleeping only shifts the schedule; latency is measured from the timestamp
    # taken when the event is built.
    delay = t0 + i * pace_ns - now_ns()
    if delay > 0:
        time.sleep(delay / 1e9)


def produce_ringcast(cfg: dict[str, Any], phase: Phase, go: Any, out: Any) -> None:
    import ringcast

    seg = ringcast.Segment.open(cfg["path"])
    w = seg.adopt(cfg["conv"], "bench", cfg["generation"])
    maker = EventMaker(cfg["event_bytes"])
    go.wait()
    t0 = now_ns()
    if phase.pace_ns:
        for i in range(phase.events):
            _pace(i, t0, phase.pace_ns)
            w.write(maker.one(i))
    elif phase.batch == 1:
        # One append per event, as a server appends one SSE chunk at a time.
        for i in range(phase.events):
            w.write(maker.one(i))
    else:
        for first in range(0, phase.events, phase.batch):
            w.write(maker.batch(first, min(phase.batch, phase.events - first)))
    w.write(maker.one(END_SEQ))
    w.finalize()
    out.put(("producer", t0, now_ns()))


def read_ringcast_sync(cfg: dict[str, Any], ready: Any, out: Any) -> None:
    import ringcast

    seg = ringcast.Segment.open(cfg["path"])
    r = seg.reader(cfg["conv"], 0, "bench")
    rx = Receiver(cfg["event_bytes"])
    gc.disable()  # the receipts kept until the end must not cost collector passes mid-run
    ready.put(1)
    try:
        while not rx.ended:
            data = r.read(1 << 20, timeout=None)
            if not data:
                break
            rx.feed(data)
    except ringcast.RingcastError as exc:
        rx.errors.append(repr(exc))
    out.put(("reader", rx.result()))


def read_ringcast_async(cfg: dict[str, Any], ready: Any, out: Any) -> None:
    import ringcast
    import uvloop

    seg = ringcast.Segment.open(cfg["path"])
    r = seg.reader(cfg["conv"], 0, "bench")
    rx = Receiver(cfg["event_bytes"])
    gc.disable()  # the receipts kept until the end must not cost collector passes mid-run

    async def main() -> None:
        ready.put(1)
        try:
            while not rx.ended:
                data = await r.aread(1 << 20)
                if not data:
                    break
                rx.feed(data)
        except ringcast.RingcastError as exc:
            rx.errors.append(repr(exc))

    uvloop.run(main())
    out.put(("reader", rx.result()))


def produce_redis(cfg: dict[str, Any], phase: Phase, go: Any, out: Any) -> None:
    import redis

    client = redis.Redis(host=cfg["redis_host"], port=cfg["redis_port"])
    maker = EventMaker(cfg["event_bytes"])
    key = cfg["key"]
    go.wait()
    t0 = now_ns()
    if phase.pace_ns:
        for i in range(phase.events):
            _pace(i, t0, phase.pace_ns)
            client.xadd(key, {b"d": maker.one(i)})
    else:
        pipe = client.pipeline(transaction=False)
        batch = cfg["redis_batch"]
        for first in range(0, phase.events, batch):
            for i in range(first, min(first + batch, phase.events)):
                pipe.xadd(key, {b"d": maker.one(i)})
            pipe.execute()
    client.xadd(key, {b"d": maker.one(END_SEQ)})
    out.put(("producer", t0, now_ns()))


def read_redis(cfg: dict[str, Any], ready: Any, out: Any) -> None:
    import redis

    client = redis.Redis(host=cfg["redis_host"], port=cfg["redis_port"])
    client.ping()
    rx = Receiver(cfg["event_bytes"])
    gc.disable()  # the receipts kept until the end must not cost collector passes mid-run
    key = cfg["key"]
    last = b"0-0"
    ready.put(1)
    while not rx.ended:
        resp = client.xread({key: last}, count=cfg["redis_count"], block=0)
        for _stream, entries in resp:
            last = entries[-1][0]
            rx.feed_entries([fields[b"d"] for _id, fields in entries])
    out.put(("reader", rx.result()))


def produce_pipe(cfg: dict[str, Any], phase: Phase, go: Any, out: Any) -> None:
    fds = cfg["write_fds"]
    for fd in cfg["read_fds"]:
        os.close(fd)
    maker = EventMaker(cfg["event_bytes"])
    go.wait()
    t0 = now_ns()

    def send(data: bytes) -> None:
        for fd in fds:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]

    if phase.pace_ns:
        for i in range(phase.events):
            _pace(i, t0, phase.pace_ns)
            send(maker.one(i))
    elif phase.batch == 1:
        for i in range(phase.events):
            send(maker.one(i))
    else:
        for first in range(0, phase.events, phase.batch):
            send(maker.batch(first, min(phase.batch, phase.events - first)))
    send(maker.one(END_SEQ))
    for fd in fds:
        os.close(fd)
    out.put(("producer", t0, now_ns()))


def read_pipe(cfg: dict[str, Any], ready: Any, out: Any) -> None:
    mine = cfg["read_fds"][cfg["index"]]
    for fd in cfg["read_fds"] + cfg["write_fds"]:
        if fd != mine:
            os.close(fd)
    rx = Receiver(cfg["event_bytes"])
    gc.disable()  # the receipts kept until the end must not cost collector passes mid-run
    ready.put(1)
    while not rx.ended:
        data = os.read(mine, 1 << 20)
        if not data:
            break
        rx.feed(data)
    out.put(("reader", rx.result()))


# --- orchestration ---------------------------------------------------------------------------


@dataclass
class Result:
    transport: str
    readers: int
    phase: str
    events: int
    event_bytes: int
    delivered_events: int
    seconds: float
    events_per_s: float
    bytes_per_s: float
    lat_p50_us: float
    lat_p99_us: float
    producer_events_per_s: float
    errors: list[str] = field(default_factory=list)


def _percentile(sorted_points: list[int], q: float) -> float:
    if not sorted_points:
        return float("nan")
    i = min(len(sorted_points) - 1, int(q * len(sorted_points)))
    return sorted_points[i] / 1000.0


class RedisServer:
    """Uses the Redis at (host, port) if it answers, else (or if port is 0) starts a private
    redis-server on a free loopback port, without persistence."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.proc: subprocess.Popen[bytes] | None = None
        self.tmp: str | None = None

    def __enter__(self) -> RedisServer:
        import redis

        if self.port:
            try:
                redis.Redis(host=self.host, port=self.port, socket_timeout=2).ping()
                return self
            except redis.exceptions.ConnectionError:
                pass
        exe = shutil.which("redis-server")
        if exe is None:
            raise SystemExit("no Redis answers and redis-server is not installed")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.host, self.port = "127.0.0.1", s.getsockname()[1]
        self.tmp = tempfile.mkdtemp(prefix="ringcast-bench-redis-")
        self.proc = subprocess.Popen(
            private_redis_argv(exe, self.port, self.tmp),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(100):
            try:
                redis.Redis(host=self.host, port=self.port).ping()
                return self
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        raise SystemExit("started redis-server but it never answered")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def run_one(
    transport: str,
    readers: int,
    phase: Phase,
    args: argparse.Namespace,
    redis_addr: tuple[str, int] | None,
) -> Result:
    cfg: dict[str, Any] = {"event_bytes": args.event_bytes}
    cleanup: list[Any] = []
    if transport.startswith("ringcast"):
        import ringcast

        path = f"/dev/shm/ringcast-bench-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        ring = max(args.session_bytes, (phase.events + 16) * args.event_bytes + (1 << 20))
        seg = ringcast.Segment.create(path, max_sessions=4, session_bytes=ring)
        w = seg.create_or_replace("bench", "bench")
        cfg.update(path=path, conv="bench", generation=w.generation)
        # The readers' notifier sockets too: a reader process that exits without closing its
        # segment leaves its socket file (and so the directory) behind.
        wake = path + ".wake"
        cleanup.extend([seg.close, lambda: os.unlink(path), lambda: shutil.rmtree(wake, True)])
        producer_fn = produce_ringcast
        reader_fn = read_ringcast_sync if transport == "ringcast-sync" else read_ringcast_async
    elif transport == "redis":
        import redis

        assert redis_addr is not None
        key = f"ringcast-bench:{uuid.uuid4().hex}"
        cfg.update(
            redis_host=redis_addr[0],
            redis_port=redis_addr[1],
            key=key,
            redis_count=args.redis_count,
            redis_batch=args.redis_batch,
        )
        cleanup.append(lambda: redis.Redis(host=redis_addr[0], port=redis_addr[1]).delete(key))
        producer_fn, reader_fn = produce_redis, read_redis
    else:
        pipes = [os.pipe() for _ in range(readers)]
        cfg.update(read_fds=[r for r, _ in pipes], write_fds=[w for _, w in pipes])
        producer_fn, reader_fn = produce_pipe, read_pipe

    go, ready, out = CTX.Event(), CTX.Queue(), CTX.Queue()
    procs = []
    for i in range(readers):
        p = CTX.Process(target=reader_fn, args=(dict(cfg, index=i), ready, out), daemon=True)
        p.start()
        procs.append(p)
    producer = CTX.Process(target=producer_fn, args=(cfg, phase, go, out), daemon=True)
    producer.start()
    if transport == "pipe":
        for fd in cfg["read_fds"] + cfg["write_fds"]:
            os.close(fd)
    t0 = t_prod = 0
    got: list[dict[str, Any]] = []
    timed_out = False
    try:
        for _ in range(readers):
            ready.get(timeout=120)
        # Readers are attached (ringcast) or connected (redis); give blocking reads a moment to
        # start waiting so the first events measure a wake, not process start-up.
        time.sleep(0.2)
        go.set()
        deadline = time.monotonic() + args.timeout
        for _ in range(readers + 1):
            msg = out.get(timeout=max(0.1, deadline - time.monotonic()))
            if msg[0] == "producer":
                t0, t_prod = msg[1], msg[2]
            else:
                got.append(msg[1])
    except queue.Empty:
        timed_out = True
    for p in [producer, *procs]:
        p.join(0 if timed_out else 30)
        if p.is_alive():
            p.kill()
            p.join()
    for fn in cleanup:
        with contextlib.suppress(Exception):
            fn()
    if timed_out or not got or not t0:
        return Result(
            transport=transport,
            readers=readers,
            phase="paced" if phase.pace_ns else "throughput",
            events=phase.events,
            event_bytes=args.event_bytes,
            delivered_events=sum(r["events"] for r in got),
            seconds=float("nan"),
            events_per_s=float("nan"),
            bytes_per_s=float("nan"),
            lat_p50_us=float("nan"),
            lat_p99_us=float("nan"),
            producer_events_per_s=float("nan"),
            errors=[f"timed out after {args.timeout:.0f}s ({len(got)}/{readers} readers done)"],
        )
    t_end = max(r["t_last"] for r in got)
    delivered = sum(r["events"] for r in got)
    seconds = (t_end - t0) / 1e9
    points = sorted(x for r in got for x in r["lat_points"])
    errors = [e for r in got for e in r["errors"]]
    expected = readers * phase.events
    if delivered != expected:
        errors.append(f"delivered {delivered} events, expected {expected}")
    eps = delivered / seconds if seconds > 0 else float("nan")
    return Result(
        transport=transport,
        readers=readers,
        phase="paced" if phase.pace_ns else "throughput",
        events=phase.events,
        event_bytes=args.event_bytes,
        delivered_events=delivered,
        seconds=round(seconds, 4),
        events_per_s=round(eps, 1),
        bytes_per_s=round(eps * args.event_bytes, 1),
        lat_p50_us=round(_percentile(points, 0.50), 1),
        lat_p99_us=round(_percentile(points, 0.99), 1),
        producer_events_per_s=round(phase.events / max(1e-9, (t_prod - t0) / 1e9), 1),
        errors=errors[:5],
    )


def machine_facts() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError):
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) * 1024
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "mem_bytes": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": os.getloadavg(),
    }


def _fmt_rate(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def print_table(results: list[Result]) -> None:
    hdr = (
        f"{'transport':<15} {'readers':>7} {'phase':<10} {'events/s':>10} {'bytes/s':>10} "
        f"{'p50 us':>9} {'p99 us':>9} {'producer ev/s':>13}  errors"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        print(
            f"{r.transport:<15} {r.readers:>7} {r.phase:<10} {_fmt_rate(r.events_per_s):>10} "
            f"{_fmt_rate(r.bytes_per_s) + 'B':>10} {r.lat_p50_us:>9.1f} {r.lat_p99_us:>9.1f} "
            f"{_fmt_rate(r.producer_events_per_s):>13}  "
            f"{'; '.join(r.errors) if r.errors else '-'}"
        )


def ratios(results: list[Result], reader_counts: list[int]) -> list[str]:
    by = {(r.transport, r.readers, r.phase): r for r in results}
    lines = []
    for n in reader_counts:
        for ours in ("ringcast-sync", "ringcast-async"):
            for base in ("redis", "pipe"):
                a, b = by.get((ours, n, "throughput")), by.get((base, n, "throughput"))
                if a and b and b.events_per_s > 0:
                    lines.append(
                        f"{ours} / {base}, {n} readers: delivered events/s x"
                        f"{a.events_per_s / b.events_per_s:.1f}"
                    )
    for ours in ("ringcast-sync", "ringcast-async"):
        a, b = by.get((ours, 64, "throughput")), by.get(("redis", 64, "throughput"))
        if a and b and b.events_per_s > 0:
            x = a.events_per_s / b.events_per_s
            lines.append(
                f"target >=10x Redis Streams events/s at 64 readers ({ours}): "
                f"x{x:.1f} -> {'MET' if x >= 10 else 'NOT MET'}"
            )
        p = by.get((ours, 8, "paced"))
        if p:
            lines.append(
                f"target p50 wake latency < 50 us at 8 readers ({ours}): "
                f"{p.lat_p50_us:.1f} us -> {'MET' if p.lat_p50_us < 50 else 'NOT MET'}"
            )
    return lines


def rust_wake_latency(events: int, interval_us: int) -> str:
    """The same paced wake to 8 reader processes without Python: readers in Rust on the core,
    and a bare futex (the floor of any futex design on this machine)."""
    cargo = shutil.which("cargo")
    if cargo is None:
        return "# wake latency without Python: skipped (no cargo on PATH)"
    cmd = [cargo, "run", "--release", "-q", "-p", "ringcast-core", "--example", "wake_latency"]
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run(
        [*cmd, "--", "8", str(events), str(interval_us)],
        cwd=os.path.dirname(here),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if out.returncode != 0:
        return f"# wake latency without Python: failed: {out.stderr.strip()[-500:]}"
    return "# wake latency without Python (" + " ".join(cmd[1:]) + " -- 8):\n" + out.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Fan-out benchmark: one producer, N reader processes; ringcast vs Redis "
        "Streams vs a pipe per reader.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--events", type=int, default=50_000, help="events in the throughput phase")
    ap.add_argument(
        "--paced-events",
        type=int,
        default=500,
        help="events in the paced (wake latency) phase; 0 skips it",
    )
    ap.add_argument("--paced-interval-us", type=int, default=1000, help="gap between paced events")
    ap.add_argument("--readers", default="1,8,64", help="comma-separated reader process counts")
    ap.add_argument(
        "--only",
        default=",".join(TRANSPORTS),
        help=f"comma-separated subset of {', '.join(TRANSPORTS)}",
    )
    ap.add_argument("--event-bytes", type=int, default=200)
    ap.add_argument(
        "--batch",
        type=int,
        default=1,
        help="events per append (ringcast) / per write to each pipe in the "
        "throughput phase; 1 is what a server does, one SSE chunk at a time "
        "(Redis uses --redis-batch)",
    )
    ap.add_argument(
        "--redis-events",
        type=int,
        default=10_000,
        help="events in Redis' throughput phase (0: same as --events); Redis is "
        "~10-100x slower here, and a rate needs no more events to be measured",
    )
    ap.add_argument("--redis-batch", type=int, default=256, help="XADDs per pipeline execute")
    ap.add_argument("--redis-count", type=int, default=10_000, help="XREAD COUNT")
    ap.add_argument(
        "--redis-url",
        default="private",
        help="host:port of a Redis to use (a private redis-server is started on a "
        "free port if none answers there), or 'private' to always start one, so "
        "that other users of a shared Redis do not skew the figures",
    )
    ap.add_argument(
        "--session-bytes",
        type=int,
        default=4 << 20,
        help="minimum ring size (grown to hold the whole run, so nothing is lost)",
    )
    ap.add_argument("--timeout", type=float, default=300, help="seconds to wait for one run")
    ap.add_argument("--json", help="write the results as JSON to this path")
    ap.add_argument(
        "--no-rust",
        action="store_true",
        help="skip the wake latency of Rust readers and of a bare futex (cargo run --release "
        "-p ringcast-core --example wake_latency), printed at the end for comparison",
    )
    args = ap.parse_args(argv)

    reader_counts = [int(x) for x in args.readers.split(",") if x]
    only = [t for t in args.only.split(",") if t]
    unknown = set(only) - set(TRANSPORTS)
    if unknown:
        ap.error(f"unknown transport(s) {sorted(unknown)}; choose from {TRANSPORTS}")
    phases = [("throughput", Phase(args.events, 0, args.batch))]
    if args.paced_events:
        phases.append(("paced", Phase(args.paced_events, args.paced_interval_us * 1000, 1)))
    # Transports interleaved per (readers, phase): on a shared machine the load drifts, and the
    # figures that are compared should be taken close together in time.
    runs = []
    for n in reader_counts:
        for _, ph in phases:
            for t in only:
                if t == "redis" and not ph.pace_ns and args.redis_events:
                    runs.append((t, n, Phase(args.redis_events, 0, ph.batch)))
                else:
                    runs.append((t, n, ph))

    facts = machine_facts()
    print(
        f"# core fan-out: {facts['cpus']} CPUs ({facts['cpu_model']}), kernel "
        f"{facts['kernel']}, Python {facts['python']}; {args.events} events of "
        f"{args.event_bytes} B; paced {args.paced_events} @ {args.paced_interval_us} us"
    )
    if (facts["cpus"] or 0) < 4:
        print(
            f"# note: only {facts['cpus']} cores: producer, readers (and redis-server) share "
            "them, so fan-out to many readers is CPU-bound here"
        )
    results: list[Result] = []
    started = time.monotonic()
    redis_ctx: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if "redis" in only:
        if args.redis_url == "private":
            redis_ctx = RedisServer("127.0.0.1", 0)
        else:
            host, _, port = args.redis_url.rpartition(":")
            redis_ctx = RedisServer(host or "127.0.0.1", int(port))
    with redis_ctx as rs:
        addr = (rs.host, rs.port) if rs is not None else None
        for i, (transport, n, ph) in enumerate(runs, 1):
            label = "paced" if ph.pace_ns else "throughput"
            print(
                f"\r[{i}/{len(runs)}] {transport} readers={n} {label} "
                f"({time.monotonic() - started:.0f}s)".ljust(70),
                end="",
                file=sys.stderr,
                flush=True,
            )
            results.append(run_one(transport, n, ph, args, addr))
    print("\r" + " " * 70 + "\r", end="", file=sys.stderr, flush=True)
    print_table(results)
    print()
    for line in ratios(results, reader_counts):
        print(line)
    if not args.no_rust and args.paced_events and 8 in reader_counts:
        print()
        print(rust_wake_latency(args.paced_events, args.paced_interval_us))
    load = os.getloadavg()
    print(
        f"# total {time.monotonic() - started:.0f}s; load average at start "
        f"{facts['loadavg_at_start'][0]:.1f}, at end {load[0]:.1f} (other work on the machine "
        "skews the figures)"
    )
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(
                {
                    "machine": facts,
                    "args": vars(args),
                    "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "results": [asdict(r) for r in results],
                },
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
