"""HTTP fan-out: S streams x R readers over real HTTP connections, three servers compared.

- ``ringcast``: ``ringcast serve`` (``--http-procs`` HTTP processes, one worker), the events
  produced by a plug-in generator (``--generator baselines:timestamped``);
- the baselines, all in ``bench/baselines.py`` (the event source too):
- ``memory``: a single-process asyncio server on uvloop written by hand: sessions are
  ``bytearray``s, readers wait on futures woken by the producer (a task per reader, what one
  writes first);
- ``memory-broadcast``: the same server without a task per reader: the producer writes each
  event straight into every attached reader's transport (the strongest single-process design
  we could write; what ringcast's pumps do inside each of its processes);
- ``redis``: the same server with sessions in Redis Streams (redis-py + hiredis, Redis at
  127.0.0.1:6379): the producer ``XADD``s every event through a pipeline flushed by a
  background task (no round trip per event); one ``XREAD BLOCK`` loop per session mirrors the
  stream into memory for the local readers;
- ``redis-per-reader`` (not in the default set): every reader tails with its own
  ``XREAD BLOCK`` — the naive design, for reference;
- ``ringcast-redis`` (not in the default set): ``ringcast serve --redis`` on a private
  ``redis-server`` started for each run (its CPU counted with the server's): what mirroring
  every stream to Redis costs the same local fan-out (docs/CLUSTER.md).

Every event is a ``chat.completion.chunk`` framed with ``id: <offset>`` whose content is the
producer's ``time.time_ns()``; the client records producer-to-client latency of every event.
The client is ``ringcast-loadgen`` (bench/loadgen: Rust, one epoll loop, built with cargo on
first use) unless ``--client python`` (one uvloop process, a protocol per connection that
de-chunks as bytes arrive): on two cores the client shares the CPUs with the servers, and the
Python one, at ~1 us per event, is the bottleneck of every system above ~1 M events/s. For each
stream, the POST's own response is one reader and ``R - 1`` more attach with
``GET /v1/stream``; the producers wait ``--prefill`` seconds before the first token so every
reader is attached. Besides events/s and latency, each run reports the CPU seconds of the
server side (every process of it, ``redis-server`` included) and of the client: on a small
machine they share the cores, so CPU per event is the figure that carries over.

``ringcast serve`` coalesces writes adaptively (only while an HTTP process falls behind: up to
half of ``--coalesce-ms``, default 40, and all of it while far behind);
``--baseline-coalesce-ms`` gives the baselines a fixed delay after each write, to compare with
ringcast's ``--coalesce always``.

    python bench/http_fanout.py --streams 8 --readers 16 --tokens 200 --tokens-per-s 50
    python bench/http_fanout.py --streams 8 --readers 128 --tokens 1200 --tokens-per-s 400
    python bench/http_fanout.py --tokens-per-s 0          # unpaced: throughput
    python bench/http_fanout.py --streams 8 --readers 128 --sweep 100,400,1000,2000,3000 \
        --plot sweep.svg                                   # sustained rate within a p99 bound

Loopback only; every loop is bounded by --tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ringcast.http.client import HTTPError, ResponseParser
from ringcast.replay.loadtest import private_redis_argv

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CONTENT = re.compile(rb'"content":"(\d+)"')


# --------------------------------------------------------------------------------------------
# Client


class Stats:
    """What the client saw. The hot path stores, per received chunk, its arrival time and the
    producer timestamps found in it (one C-level ``findall``); latencies are computed once the
    run is over, so the client's cost per event stays small and the servers, not the client,
    are what the run measures."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[int, list[bytes]]] = []
        self.bytes = 0
        self.first = float("inf")
        self.last = 0.0

    @property
    def events(self) -> int:
        return sum(len(stamps) for _, stamps in self.arrivals)

    def latencies_ms(self) -> list[float]:
        return [(now - int(s)) / 1e6 for now, stamps in self.arrivals for s in stamps]


class ChunkedEvents(asyncio.Protocol):
    """One client connection: de-chunks the response body as bytes arrive (with
    ``ringcast.http.client``'s parser) and records the producer timestamps of every complete
    event (a partial event waits for its rest).

    Work per TCP read is the parser's per-chunk steps plus one C-level ``findall``, so the
    client's cost barely depends on how a server chunks its writes (a ``StreamReader`` loop
    of ``readline``/``readexactly`` costs several coroutine steps per chunk and made the
    client the bottleneck of every saturated run)."""

    def __init__(self, req: bytes, stats: Stats, head: asyncio.Future[None]) -> None:
        self.req = req
        self.stats = stats
        self.head = head
        self.done: asyncio.Future[None] = head.get_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.parser = ResponseParser()
        self.body = b""  # decoded body after the last complete event

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.req)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        now = time.time_ns()
        p = self.parser
        try:
            pieces = p.feed(data)
        except HTTPError as e:
            self._finish(RuntimeError(f"bad response: {e}"))
            return
        if not p.head_done:
            return
        if not self.head.done():
            if p.status != 200:
                self._finish(RuntimeError(f"bad response: status {p.status}"))
                return
            self.head.set_result(None)
        if pieces:
            body = self.body + b"".join(pieces) if self.body else b"".join(pieces)
            complete, sep, self.body = body.rpartition(b"\n\n")
            if sep:
                self.stats.arrivals.append((now, CONTENT.findall(complete)))
                self.stats.bytes += len(complete) + 2
                t = time.monotonic()
                if t < self.stats.first:
                    self.stats.first = t
                self.stats.last = t
        if p.done:
            self._finish(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(exc or ConnectionError("closed before the end of the stream"))

    def _finish(self, exc: BaseException | None) -> None:
        if not self.head.done():
            self.head.set_exception(exc or ConnectionError("no response"))
        if not self.done.done():
            if exc is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(exc)
        if self.transport is not None:
            self.transport.close()


async def consume(port: int, req: bytes, stats: Stats, ready: asyncio.Event | None) -> None:
    loop = asyncio.get_running_loop()
    head: asyncio.Future[None] = loop.create_future()
    _, proto = await loop.create_connection(
        lambda: ChunkedEvents(req, stats, head), "127.0.0.1", port
    )
    await head
    if ready is not None:
        ready.set()
    await proto.done


async def run_clients(port: int, streams: int, readers: int, tokens: int) -> Stats:
    stats = Stats()
    body = json.dumps(
        {
            "model": "m",
            "stream": True,
            "max_tokens": tokens,
            "messages": [{"role": "user", "content": "bench"}],
        }
    ).encode()
    jobs = []
    run = f"{os.getpid()}-{time.monotonic_ns()}"
    for s in range(streams):
        conv = f"bench-{run}-{s}"
        post = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Conversation-Id: {conv}"
            f"\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n"
        ).encode() + body
        ready = asyncio.Event()
        jobs.append(asyncio.ensure_future(consume(port, post, stats, ready)))
        await ready.wait()
        get = (
            f"GET /v1/stream?conv_id={conv}&from=0 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        ).encode()
        jobs += [asyncio.ensure_future(consume(port, get, stats, None)) for _ in range(readers - 1)]
    await asyncio.gather(*jobs)
    return stats


# --------------------------------------------------------------------------------------------
# Driver


def start_private_redis(tmp: str) -> tuple[subprocess.Popen[bytes], str]:
    """A throw-away ``redis-server`` for ``ringcast-redis`` (its CPU is the mirror's cost in
    Redis), answering before this returns."""
    import socket

    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("ringcast-redis needs redis-server on PATH")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(private_redis_argv(exe, port, tmp), stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.02)
    proc.kill()
    raise SystemExit("the private redis-server did not answer")


def start(
    system: str, args: argparse.Namespace, tmp: str, redis_url: str = ""
) -> tuple[subprocess.Popen[str], int]:
    env = dict(
        os.environ,
        BENCH_TPS=str(args.tokens_per_s),
        BENCH_PREFILL=str(args.prefill),
        PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
    )
    if system in ("ringcast", "ringcast-redis"):
        cmd = [
            sys.executable,
            "-m",
            "ringcast.cli",
            "serve",
            "--port",
            "0",
            "--http-procs",
            str(args.http_procs),
            "--workers",
            "1",
            "--segment",
            os.path.join(tmp, "bench.seg"),
            "--log-level",
            "WARNING",
            "--generator",
            "baselines:timestamped",
            "--max-sessions",
            str(max(64, args.streams * 4)),
            "--coalesce-ms",
            str(args.coalesce_ms),
            "--coalesce",
            args.coalesce,
            *(["--redis", redis_url] if redis_url else []),
        ]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
        assert p.stdout is not None
        line = p.stdout.readline()
        m = re.search(r":(\d+) \(", line)
        if not m:
            raise SystemExit(f"ringcast serve did not start: {line!r}")
        return p, int(m.group(1))
    p = subprocess.Popen(
        [
            sys.executable,
            str(HERE / "baselines.py"),
            system,
            "--port",
            "0",
            "--coalesce-ms",
            str(args.baseline_coalesce_ms),
            "--redis-url",
            "redis://127.0.0.1:6379/0",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert p.stdout is not None
    m = re.search(r"listening on http://[\w.]+:(\d+)", p.stdout.readline())
    if not m:
        raise SystemExit(f"{system} baseline did not start")
    return p, int(m.group(1))


def runqueue_wait_s(pid: int) -> float:
    """Seconds the threads of ``pid`` have spent runnable but waiting for a CPU
    (``/proc/<pid>/task/*/schedstat``, second field): on a machine with fewer cores than busy
    processes, the time a server or the client lost to the others."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue  # a thread that exited meanwhile
    return total / 1e9


def server_usage(pid: int, system: str, extra: tuple[int, ...] = ()) -> tuple[float, float]:
    """User + system CPU seconds and run-queue wait seconds of the server side of a run: the
    server process and its children, plus every ``redis-server`` for the Redis-backed
    systems, plus the ``extra`` processes (``ringcast-redis``'s private Redis)."""
    import psutil

    procs: list[psutil.Process] = []
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True), *(psutil.Process(x) for x in extra)]
    except psutil.NoSuchProcess:
        pass
    if system.startswith("redis"):
        procs += [p for p in psutil.process_iter(["name"]) if p.info["name"] == "redis-server"]
    cpu = wait = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            cpu += t.user + t.system
        except psutil.NoSuchProcess:
            continue
        wait += runqueue_wait_s(p.pid)
    return cpu, wait


def build_loadgen() -> str:
    """Builds ``ringcast-loadgen`` (bench/loadgen, release) and returns its path."""
    try:
        out = subprocess.run(
            ["cargo", "build", "--release", "-p", "ringcast-loadgen", "--message-format=json"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError:
        raise SystemExit(
            "--client rust needs cargo to build bench/loadgen (or use --client python)"
        ) from None
    if out.returncode != 0:
        raise SystemExit(f"building bench/loadgen failed:\n{out.stderr}")
    for line in out.stdout.splitlines():
        msg = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and msg["target"]["name"] == (
            "ringcast-loadgen"
        ):
            if msg.get("executable"):
                return str(msg["executable"])
    raise SystemExit("cargo built bench/loadgen but named no executable")


def run_loadgen(loadgen: str, port: int, args: argparse.Namespace) -> dict[str, float]:
    cmd = [
        loadgen,
        "--port",
        str(port),
        "--streams",
        str(args.streams),
        "--readers",
        str(args.readers),
        "--tokens",
        str(args.tokens),
        "--run-id",
        f"{os.getpid()}-{time.monotonic_ns()}",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"ringcast-loadgen failed: {out.stderr.strip()}")
    res: dict[str, float] = json.loads(out.stdout)
    return res


def measure(
    system: str, args: argparse.Namespace, tmp: str, loadgen: str | None
) -> dict[str, float]:
    redis: subprocess.Popen[bytes] | None = None
    redis_url = ""
    if system == "ringcast-redis":
        redis, redis_url = start_private_redis(tmp)
    extra = (redis.pid,) if redis is not None else ()
    proc, port = start(system, args, tmp, redis_url)
    try:
        cpu0, wait0 = server_usage(proc.pid, system, extra)
        if loadgen is not None:
            got = run_loadgen(loadgen, port, args)
            events, span = int(got["events"]), got["span_s"]
            p50, p99, client_cpu = got["p50_ms"], got["p99_ms"], got["cpu_s"]
            client_wait = got["wait_s"]
        else:
            import uvloop

            client0, client_wait0 = time.process_time(), runqueue_wait_s(os.getpid())
            # The client keeps millions of small objects until the run is over: without this,
            # the collector's full passes over them stall it for ~100 ms at a time, and those
            # stalls, not the servers, would set every system's p99.
            gc.disable()
            try:
                stats = uvloop.run(run_clients(port, args.streams, args.readers, args.tokens))
            finally:
                gc.enable()
            client_cpu = time.process_time() - client0
            client_wait = runqueue_wait_s(os.getpid()) - client_wait0
            events, span = stats.events, stats.last - stats.first
            lat = sorted(stats.latencies_ms())
            p50, p99 = statistics.median(lat), lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        cpu1, wait1 = server_usage(proc.pid, system, extra)
        server_cpu, server_wait = cpu1 - cpu0, wait1 - wait0
    finally:
        proc.terminate()
        proc.wait(30)
        if proc.stdout is not None:
            proc.stdout.close()
        if redis is not None:
            redis.kill()
            redis.wait()
    expected = args.streams * args.readers * args.tokens
    if events != expected:
        raise SystemExit(f"{system}: received {events} events, expected {expected}")
    return {
        "events_per_s": events / max(span, 1e-9),
        "p50_ms": p50,
        "p99_ms": p99,
        "events": events,
        "server_cpu_s": server_cpu,
        "client_cpu_s": client_cpu,
        "server_wait_s": server_wait,
        "client_wait_s": client_wait,
    }


def run_point(
    args: argparse.Namespace, systems: list[str], tmp: str, loadgen: str | None
) -> dict[str, dict[str, float]]:
    """Every system at ``args``' rate, ``--repeat`` times interleaved (so background load hits
    every system); each metric's median over the runs, robust to a run hit by a burst."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in systems}
    for _ in range(args.repeat):
        for system in systems:
            runs[system].append(measure(system, args, tmp, loadgen))
    return {
        name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()
    }


def print_table(results: dict[str, dict[str, float]]) -> None:
    print(
        f"{'system':<18}{'events/s':>12}{'p50 ms':>10}{'p99 ms':>10}"
        f"{'server cpu s':>14}{'client cpu s':>14}{'server wait s':>15}{'client wait s':>15}"
    )
    for name, r in results.items():
        print(
            f"{name:<18}{r['events_per_s']:>12.0f}{r['p50_ms']:>10.2f}{r['p99_ms']:>10.2f}"
            f"{r['server_cpu_s']:>14.2f}{r['client_cpu_s']:>14.2f}"
            f"{r['server_wait_s']:>15.2f}{r['client_wait_s']:>15.2f}"
        )
    if "ringcast" in results:
        rc = results["ringcast"]
        for name, r in results.items():
            if name != "ringcast":
                print(
                    f"ringcast/{name}: events/s x{rc['events_per_s'] / r['events_per_s']:.2f}, "
                    f"p50 x{rc['p50_ms'] / r['p50_ms']:.2f}, "
                    f"p99 x{rc['p99_ms'] / r['p99_ms']:.2f}"
                )


def sustained(
    points: list[tuple[float, dict[str, dict[str, float]]]], system: str, slo_ms: float
) -> tuple[float, float] | None:
    """(offered tok/s per stream, delivered events/s) of the fastest paced point at which
    ``system`` kept p99 within ``slo_ms`` (a system that falls behind sees its latency grow
    for the rest of the run, so this also says it kept up; every event arrived, or the run
    would have failed) and delivered at least 90 % of the offered events/s (the first to last
    arrival also spans the streams' staggered starts)."""
    best: tuple[float, float] | None = None
    for tps, results in points:
        r = results[system]
        if tps > 0 and r["events_per_s"] >= 0.9 * r["offered"] and r["p99_ms"] <= slo_ms:
            if best is None or r["events_per_s"] > best[1]:
                best = (tps, r["events_per_s"])
    return best


def plot_sweep(
    points: list[tuple[float, dict[str, dict[str, float]]]],
    slos: list[float],
    path: str,
    title: str,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter, NullFormatter, ScalarFormatter

    paced = [(tps, res) for tps, res in points if tps > 0]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in paced[0][1]:
        offered = [res[name]["offered"] for _, res in paced]
        ax1.plot(offered, [res[name]["p99_ms"] for _, res in paced], "o-", label=name)
        ax2.plot(offered, [res[name]["events_per_s"] for _, res in paced], "o-", label=name)
    for slo in slos:
        ax1.axhline(slo, color="grey", ls=":", lw=1)
    ax1.set(xscale="log", yscale="log", xlabel="offered events/s", ylabel="p99 latency, ms")
    lim = [min(r["offered"] for _, res in paced for r in res.values())] * 2
    lim[1] = max(r["offered"] for _, res in paced for r in res.values())
    ax2.plot(lim, lim, color="grey", ls="--", lw=1, label="offered")
    ax2.set(xscale="log", yscale="log", xlabel="offered events/s", ylabel="delivered events/s")
    for ax in (ax1, ax2):
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    ax1.yaxis.set_major_formatter(ScalarFormatter())
    ax2.yaxis.set_major_formatter(EngFormatter(sep=""))
    ax2.yaxis.set_minor_formatter(NullFormatter())
    ax1.legend()
    ax2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    print(f"plot: {path}")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="A sweep (--sweep 100,400,1000,2000,4000) runs every system at each rate and "
        "prints, per system, the most events/s delivered with p99 within --slo-ms: the "
        "throughput a user can count on, which a single unpaced run cannot tell (there, a "
        "producer in its own process runs ahead of the fan-out and its backlog is latency).",
    )
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--readers", type=int, default=16, help="readers per stream (incl. POST)")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--tokens-per-s", type=float, default=50.0, help="0 = unpaced")
    ap.add_argument(
        "--sweep",
        help="comma-separated tok/s per stream to run in turn instead of --tokens-per-s; "
        "each run's tokens are its rate x --duration",
    )
    ap.add_argument("--duration", type=float, default=3.0, help="seconds of tokens per sweep point")
    ap.add_argument(
        "--slo-ms",
        default="25,50,100",
        help="comma-separated p99 bounds: for each, a sweep prints every system's sustained "
        "rate (the most events/s it delivered with p99 within the bound)",
    )
    ap.add_argument("--plot", help="a sweep's p99 and delivered events/s against offered, to FILE")
    ap.add_argument("--prefill", type=float, default=1.0)
    ap.add_argument("--http-procs", type=int, default=2)
    ap.add_argument(
        "--coalesce-ms",
        type=float,
        default=40.0,
        help="ringcast serve --coalesce-ms (its default: 40)",
    )
    ap.add_argument(
        "--coalesce",
        choices=["adaptive", "always"],
        default="adaptive",
        help="ringcast serve --coalesce (its default: adaptive)",
    )
    ap.add_argument(
        "--baseline-coalesce-ms",
        type=float,
        default=0.0,
        help="give the baselines the same coalescing: each reader waits this long after a "
        "write before the next (default 0: written as a hand-written server does)",
    )
    ap.add_argument(
        "--client",
        choices=["rust", "python"],
        default="rust",
        help="the measuring client: rust = bench/loadgen (one epoll loop, ~0.1 us of CPU per "
        "event, built with cargo on first use), python = the uvloop client in this file "
        "(~1 us per event: above ~1 M events/s it, not the servers, is the bottleneck)",
    )
    ap.add_argument("--repeat", type=int, default=5, help="runs per system; medians are shown")
    ap.add_argument("--systems", default="ringcast,memory,memory-broadcast,redis")
    args = ap.parse_args()
    import tempfile

    if args.sweep and args.tokens_per_s != ap.get_default("tokens_per_s"):
        ap.error("--sweep replaces --tokens-per-s: give one of them")
    if args.plot and not args.sweep:
        ap.error("--plot draws a sweep: give --sweep too")

    def numbers(text: str, flag: str) -> list[float]:
        try:
            return [float(x) for x in text.split(",")]
        except ValueError:
            ap.error(f"{flag} wants numbers separated by commas, got {text!r}")

    rates = numbers(args.sweep, "--sweep") if args.sweep else [args.tokens_per_s]
    if any(r < 0 for r in rates):
        ap.error("a rate cannot be negative (0 = unpaced)")
    if args.plot and not any(r > 0 for r in rates):
        ap.error("--plot draws the paced rates of a sweep: give at least one rate above 0")
    slos = numbers(args.slo_ms, "--slo-ms")
    systems = args.systems.split(",")
    known = {"ringcast", "memory", "memory-broadcast", "redis", "redis-per-reader"}
    known.add("ringcast-redis")  # ringcast serve --redis (a private redis-server per run)
    if not systems or not set(systems) <= known:
        ap.error(f"--systems: a comma-separated subset of {', '.join(sorted(known))}")
    loadgen = build_loadgen() if args.client == "rust" else None
    points: list[tuple[float, dict[str, dict[str, float]]]] = []
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as t:
        for tps in rates:
            point = argparse.Namespace(**vars(args))
            point.tokens_per_s = tps
            if args.sweep and tps > 0:
                point.tokens = max(20, round(tps * args.duration))
            results = run_point(point, systems, t, loadgen)
            for r in results.values():
                r["offered"] = args.streams * args.readers * tps if tps > 0 else float("nan")
            points.append((tps, results))
            print(
                f"S={args.streams} streams x R={args.readers} readers, {point.tokens} tokens, "
                f"{tps or 'unpaced'} tok/s, ringcast --http-procs {args.http_procs} "
                f"--coalesce {args.coalesce} --coalesce-ms {args.coalesce_ms:g}, baselines' "
                f"coalescing {args.baseline_coalesce_ms:g} ms, {args.client} client, medians of "
                f"{args.repeat} runs, load average {os.getloadavg()[0]:.1f}",
                flush=True,
            )
            print_table(results)
    if not args.sweep:
        return
    top = max((r for r in rates if r > 0), default=0.0)
    for slo in slos:
        print(f"\nsustained: the most events/s delivered with p99 within {slo:g} ms")
        best = {name: sustained(points, name, slo) for name in systems}
        for name, b in best.items():
            if b is None:
                shown = "at none of the paced rates"
            else:
                shown = f"{b[1]:>12.0f} events/s at {b[0]:g} tok/s"
                if b[0] == top:
                    shown += " (the fastest rate swept: the limit may be higher)"
            print(f"{name:<18}{shown}")
        rc = best.get("ringcast")
        for name, b in best.items():
            if name != "ringcast" and rc is not None and b is not None:
                print(f"ringcast/{name}: sustained events/s x{rc[1] / b[1]:.2f}")
    if args.plot:
        plot_sweep(
            points,
            slos,
            args.plot,
            f"{args.streams} streams x {args.readers} readers, {os.cpu_count()} CPUs (ringcast "
            f"--http-procs {args.http_procs} --coalesce {args.coalesce} --coalesce-ms "
            f"{args.coalesce_ms:g}; {args.client} client)",
        )


if __name__ == "__main__":
    main()
