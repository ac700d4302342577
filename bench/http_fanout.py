"""HTTP fan-out: S streams x R readers over real HTTP connections, ringcast against baselines.

- ``ringcast``: ``ringcast serve`` at its defaults (what a user who sets nothing gets), or
  with the ``--http-procs``, ``--workers``, ``--coalesce`` and ``--coalesce-ms`` given here;
  ``ringcast-<N>p``: ``ringcast serve --http-procs N`` (so ``--spread all``: every process
  takes new connections), the rest at its defaults. The events are produced by a plug-in
  generator (``--generator baselines:timestamped``) in the process that runs the jobs;
- the baselines, all in ``bench/baselines.py`` (the event source too):
- ``memory``: a single-process asyncio server on uvloop written by hand: sessions are
  ``bytearray``s, readers wait on futures woken by the producer (a task per reader, what one
  writes first);
- ``memory-broadcast``: the same server without a task per reader: the producer writes each
  event straight into every attached reader's transport (the strongest single-process design
  we could write; what ringcast's pumps do inside each of its processes);
- ``memory-broadcast-<N>p`` (N from 2): ``memory-broadcast`` in N processes on one port
  (``SO_REUSEPORT``, each with sessions of its own), only at points with one reader per
  stream (a ``GET`` could land in a process without its stream; skipped, and said so, at
  the others): what spreading over N cores costs a hand-written server, next to what it
  costs ringcast (``ringcast-<N>p``);
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

The grid (``--grid``) runs every ``--points`` (streams x readers; default 1000x1, 1000x2,
100x10, 8x128, 50x20) at every ``--rates`` (default 20 tok/s, a model's pace, and 10x it),
each point with ``ringcast`` (its defaults), ``ringcast-1p``, ``ringcast-<cores>p``, the
single-process servers and ``memory-broadcast-<cores>p``, and prints for each point the
server CPU per delivered event split by process (manager, each worker, each HTTP process,
each process of a baseline) and the ratios of issue 15's "Done when": CPU per event and p99
of the defaults against the best single-process server, and p99 against the best fixed
``--http-procs``; and those of ``memory-broadcast-<N>p`` against its one process.
``--profile DIR`` records flame graphs (py-spy of the worker and each HTTP process, perf of
every server process; ``bench/flame_summary.py`` sorts them into the steps of an event's
path).

``ringcast serve`` coalesces writes adaptively (only while an HTTP process falls behind: up to
half of ``--coalesce-ms``, default 40, and all of it while far behind);
``--baseline-coalesce-ms`` gives the baselines a fixed delay after each write, to compare with
ringcast's ``--coalesce always``.

    python bench/http_fanout.py --streams 8 --readers 16 --tokens 200 --tokens-per-s 50
    python bench/http_fanout.py --streams 8 --readers 128 --tokens 1200 --tokens-per-s 400
    python bench/http_fanout.py --tokens-per-s 0          # unpaced: throughput
    python bench/http_fanout.py --grid --json grid.json    # issue 15's grid, ~10 min
    python bench/http_fanout.py --grid --points 1000x1 --rates 20 --profile /tmp/flame
    python bench/http_fanout.py --streams 8 --readers 128 --sweep 100,400,1000,2000,3000 \
        --plot sweep.svg                                   # sustained rate within a p99 bound

Loopback only; every loop is bounded by --tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import re
import shutil
import signal
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


RINGCAST_PROCS = re.compile(r"ringcast-(\d+)p")
"""``ringcast-<N>p``: ``ringcast serve --http-procs N``, everything else at its default."""


BASELINE_PROCS = re.compile(r"(memory-broadcast)-([2-9]|[1-9]\d+)p", re.ASCII)
"""``memory-broadcast-<N>p``, N from 2: ``bench/baselines.py memory-broadcast --procs N``."""


def is_ringcast(system: str) -> bool:
    return system.startswith("ringcast")


def serves_point(system: str, readers: int) -> bool:
    """Whether ``system`` can serve streams of ``readers`` readers: a baseline in several
    processes only those read by their POST alone (each process has its own sessions)."""
    return readers == 1 or not BASELINE_PROCS.fullmatch(system)


def ringcast_options(system: str, args: argparse.Namespace) -> list[str]:
    """The ``ringcast serve`` options that ``system`` stands for: ``ringcast-<N>p`` sets only
    ``--http-procs N``; ``ringcast`` and ``ringcast-redis`` pass the ``--http-procs``,
    ``--workers``, ``--coalesce`` and ``--coalesce-ms`` given to this script, and leave
    each one that was not given to ringcast's own default (what a user who sets nothing
    gets)."""
    m = RINGCAST_PROCS.fullmatch(system)
    if m:
        return ["--http-procs", m.group(1)]
    given = (
        ("--http-procs", args.http_procs),
        ("--workers", args.workers),
        ("--coalesce", args.coalesce),
        ("--coalesce-ms", args.coalesce_ms),
    )
    return [x for flag, value in given if value is not None for x in (flag, str(value))]


def ringcast_setting(args: argparse.Namespace) -> str:
    """How ``ringcast`` is configured, for the tables' headings."""
    shown = " ".join(ringcast_options("ringcast", args))
    return shown or "its defaults"


def start(
    system: str, args: argparse.Namespace, tmp: str, redis_url: str = ""
) -> tuple[subprocess.Popen[str], int]:
    env = dict(
        os.environ,
        BENCH_TPS=str(args.tokens_per_s),
        BENCH_PREFILL=str(args.prefill),
        PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
    )
    if is_ringcast(system):
        cmd = [
            sys.executable,
            "-m",
            "ringcast.cli",
            "serve",
            "--port",
            "0",
            *ringcast_options(system, args),
            "--segment",
            os.path.join(tmp, "bench.seg"),
            "--log-level",
            "WARNING",
            "--generator",
            "baselines:timestamped",
            "--max-sessions",
            str(max(64, args.streams * 4)),
            *(["--redis", redis_url] if redis_url else []),
        ]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
        assert p.stdout is not None
        line = p.stdout.readline()
        m = re.search(r":(\d+) \(", line)
        if not m:
            p.kill()
            p.wait()
            raise SystemExit(f"{system}: ringcast serve did not start: {line!r}")
        return p, int(m.group(1))
    many = BASELINE_PROCS.fullmatch(system)
    p = subprocess.Popen(
        [
            sys.executable,
            str(HERE / "baselines.py"),
            *([many.group(1), "--procs", many.group(2)] if many else [system]),
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
        p.kill()
        p.wait()
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


CHILD_ROLES = (
    ("ringcast.server.http_process", "http"),
    ("ringcast.server.worker", "worker"),
    ("ringcast.server.cluster.mirror", "mirror"),
)
"""The children of ``ringcast serve`` by the module they run (``python -m MODULE CONFIG i``)."""


def server_processes(pid: int, system: str, extra: tuple[int, ...] = ()) -> dict[int, str]:
    """Every process of the server side of a run, pid -> role: ``manager`` and its children
    ``http<i>``, ``worker<j>``, ``mirror0`` for ringcast, ``server`` for a baseline (and
    ``server<k>`` for the other processes of ``memory-broadcast-<N>p``), ``redis``
    for every ``redis-server`` of the Redis-backed systems and the ``extra`` processes
    (``ringcast-redis``'s private Redis)."""
    import psutil

    roles: dict[int, str] = {}
    try:
        root = psutil.Process(pid)
        roles[pid] = "manager" if is_ringcast(system) else "server"
        children = root.children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    for c in children:
        try:
            cmd = c.cmdline()
        except psutil.Error:
            continue  # gone meanwhile
        role = c.name()
        if "--sibling" in cmd:  # a baseline's other processes: --sibling K:PID
            i = cmd.index("--sibling") + 1
            role = "server" + (cmd[i].split(":")[0] if i < len(cmd) else "?")
        for module, kind in CHILD_ROLES:
            if module in cmd:
                i = cmd.index(module) + 2
                role = kind + (cmd[i] if i < len(cmd) else "")
        roles[c.pid] = role
    for x in extra:
        roles[x] = "redis"
    if system.startswith("redis"):
        for p in psutil.process_iter(["name"]):
            if p.info["name"] == "redis-server":
                roles[p.pid] = "redis"
    return roles


def server_usage(
    pid: int, system: str, extra: tuple[int, ...] = ()
) -> tuple[dict[str, float], float]:
    """User + system CPU seconds of the server side of a run by role (see
    :func:`server_processes`; processes of one role summed), and the run-queue wait seconds
    of all of them together."""
    import psutil

    cpu: dict[str, float] = {}
    wait = 0.0
    for p, role in server_processes(pid, system, extra).items():
        try:
            t = psutil.Process(p).cpu_times()
        except psutil.NoSuchProcess:
            continue
        cpu[role] = cpu.get(role, 0.0) + t.user + t.system
        wait += runqueue_wait_s(p)
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


PROFILERS = ("py-spy", "perf")


class Profiler:
    """Flame graphs of the server processes during one run (``--profile DIR``): with
    ``py-spy``, ``py-spy record --native`` of the worker and of every HTTP process, or of a
    baseline's one process (Python
    frames with the native ones under them: the Rust core, libpython, the kernel's entry);
    with ``perf``, one ``perf record -g`` of every server process (sampled on ``cpu-clock``,
    the only event a VM without a PMU offers; frame-pointer stacks, so kernel stacks are
    whole while Python and Rust frames, built without frame pointers, show mostly their
    leaves). Each profile's folded stacks go to ``DIR/<label>-<role>.<tool>.folded`` and,
    with ``inferno-flamegraph`` on ``PATH`` (``cargo install inferno``), an SVG beside it.
    A profiled run is not one of the measured runs: sampling slows what it samples."""

    def __init__(self, tool: str, out: Path, label: str, roles: dict[int, str]) -> None:
        self.tool = tool
        self.out = out
        self.label = label
        self.roles = {p: r for p, r in roles.items() if r.startswith(("worker", "http", "server"))}
        if tool == "perf":
            self.roles = dict(roles)
        self.procs: list[tuple[subprocess.Popen[bytes], str]] = []
        self.tmp = out / f".{label}.perf.data"

    def start(self) -> None:
        exe = shutil.which(self.tool)
        if exe is None:
            raise SystemExit(
                f"--profile needs {self.tool} on PATH "
                + (
                    "(pip install py-spy)"
                    if self.tool == "py-spy"
                    else "(apt-get install linux-perf)"
                )
            )
        if self.tool == "py-spy":
            for pid, role in self.roles.items():
                cmd = [exe, "record", "--native", "--nolineno", "--rate", "250", "--format", "raw"]
                cmd += ["--pid", str(pid), "-o", str(self.path(role, "folded"))]
                self.procs.append(
                    (subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), role)
                )
        else:
            pids = ",".join(str(p) for p in self.roles)
            cmd = [exe, "record", "-e", "cpu-clock", "-F", "999", "-g", "-p", pids]
            cmd += ["-o", str(self.tmp)]
            self.procs.append(
                (subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), "all")
            )
        time.sleep(0.5)  # attached before the load starts
        for p, role in self.procs:
            if p.poll() is not None:
                err = p.stderr.read().decode(errors="replace") if p.stderr else ""
                raise SystemExit(f"{self.tool} on {role} failed: {err.strip()}")

    def path(self, role: str, ext: str) -> Path:
        tool = "pyspy" if self.tool == "py-spy" else self.tool
        return self.out / f"{self.label}-{role}.{tool}.{ext}"

    def stop(self) -> list[Path]:
        """Stops the recorders (SIGINT: each writes what it has) and renders the graphs."""
        for p, _ in self.procs:
            p.send_signal(signal.SIGINT)
        for p, _ in self.procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.stderr is not None:
                p.stderr.close()
        folded: list[Path] = []
        if self.tool == "py-spy":
            folded = [self.path(r, "folded") for _, r in self.procs]
        else:
            folded = self._perf_folded()
        return [f for f in folded if f.exists()] + [
            svg for f in folded if f.exists() and (svg := render_svg(f, self.tool)) is not None
        ]

    def _perf_folded(self) -> list[Path]:
        """``perf script`` folded per process (``inferno-collapse-perf --pid``, or
        ``stackcollapse-perf.pl`` style by hand when inferno is missing), one file per role
        and one for all of them, each stack rooted at its role."""
        if not self.tmp.exists():
            return []
        script = subprocess.run(
            ["perf", "script", "-i", str(self.tmp)], capture_output=True, check=False
        ).stdout
        self.tmp.unlink()
        by_role: dict[str, dict[str, int]] = {}
        for pid, stack in collapse_perf(script.decode(errors="replace")):
            role = self.roles.get(pid, "other")
            counts = by_role.setdefault(role, {})
            counts[stack] = counts.get(stack, 0) + 1
        files = []
        everything: dict[str, int] = {}
        for role, counts in sorted(by_role.items()):
            f = self.path(role, "folded")
            f.write_text("".join(f"{k} {v}\n" for k, v in sorted(counts.items())))
            files.append(f)
            for k, v in counts.items():
                everything[f"{role};{k}"] = v
        f = self.path("all", "folded")
        f.write_text("".join(f"{k} {v}\n" for k, v in sorted(everything.items())))
        return [*files, f]


def collapse_perf(text: str) -> list[tuple[int, str]]:
    """``perf script`` output -> (pid, folded stack root first) per sample. A sample is a
    header line ``comm pid [cpu] time: period event:`` then one ``addr symbol (dso)`` line per
    frame, leaf first, then a blank line."""
    out: list[tuple[int, str]] = []
    pid = -1
    frames: list[str] = []
    header = re.compile(r"^\S.*?\s+(\d+)(?:/\d+)?\s+")
    for line in [*text.splitlines(), ""]:
        if not line.strip():
            if pid >= 0 and frames:
                out.append((pid, ";".join(reversed(frames))))
            pid, frames = -1, []
        elif line[0] not in " \t":
            m = header.match(line)
            pid = int(m.group(1)) if m else -1
        else:
            parts = line.split(None, 1)
            sym = parts[1] if len(parts) > 1 else parts[0]
            sym = re.sub(r"\+0x[0-9a-f]+", "", sym)
            if sym.startswith("[unknown]"):
                dso = re.search(r"\(([^)]*)\)\s*$", sym)
                sym = f"[{os.path.basename(dso.group(1))}]" if dso else "[unknown]"
            else:
                sym = re.sub(r"\s*\([^)]*\)\s*$", "", sym)
            frames.append(sym.replace(";", ":"))
    return out


def render_svg(folded: Path, tool: str) -> Path | None:
    """``folded`` as a flame graph SVG beside it, if ``inferno-flamegraph`` is on PATH."""
    exe = shutil.which("inferno-flamegraph")
    if exe is None or folded.stat().st_size == 0:
        return None
    svg = folded.with_suffix(".svg")
    with folded.open("rb") as src, svg.open("wb") as dst:
        subprocess.run(
            [exe, "--title", f"{folded.stem} ({tool})", "--minwidth", "0.3"],
            stdin=src,
            stdout=dst,
            check=False,
        )
    return svg


FAILURE_METRICS = re.compile(
    r"^ringcast_(handoff_failures|sessions\{state=\"failed\"|evictions|offsets_lost|"
    r"worker_jobs_total\{outcome=\"(failed|cancelled)\"|write_timeouts|dead_producers)"
)


def ringcast_failures(port: int) -> str:
    """The counters of ``ringcast serve``'s ``/metrics`` that say why streams ended early."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
    except OSError as e:
        return f"/metrics did not answer: {e}"
    found = [line for line in text.splitlines() if FAILURE_METRICS.match(line)]
    return ", ".join(found) or "no failure counted in /metrics"


def measure(
    system: str,
    args: argparse.Namespace,
    tmp: str,
    loadgen: str | None,
    profile: tuple[str, Path, str] | None = None,
) -> dict[str, float]:
    """One run of ``system``: its figures, the server CPU seconds of each role under
    ``cpu:<role>``. With ``profile`` (tool, directory, label) the run is recorded by a
    :class:`Profiler`."""
    redis: subprocess.Popen[bytes] | None = None
    redis_url = ""
    if system == "ringcast-redis":
        redis, redis_url = start_private_redis(tmp)
    extra = (redis.pid,) if redis is not None else ()
    proc, port = start(system, args, tmp, redis_url)
    profiler: Profiler | None = None
    try:
        many = BASELINE_PROCS.fullmatch(system)
        pids = set(server_processes(proc.pid, system, extra)) if many else set()
        if many and len(pids) != int(many.group(2)):
            raise SystemExit(f"{system}: {len(pids)} processes serve, not {many.group(2)}")
        cpu0, wait0 = server_usage(proc.pid, system, extra)
        if profile is not None:
            profiler = Profiler(
                profile[0], profile[1], profile[2], server_processes(proc.pid, system, extra)
            )
            profiler.start()
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
        if many and set(server_processes(proc.pid, system, extra)) != pids:
            raise SystemExit(f"{system}: one of its processes ended during the run")
        if is_ringcast(system) and events != args.streams * args.readers * args.tokens:
            print(f"{system} when events went missing: {ringcast_failures(port)}", flush=True)
        if profiler is not None:
            for f in profiler.stop():
                print(f"profile: {f}", flush=True)
            profiler = None
    finally:
        if profiler is not None:
            profiler.stop()
        proc.terminate()
        proc.wait(30)
        if proc.stdout is not None:
            proc.stdout.close()
        if redis is not None:
            redis.kill()
            redis.wait()
    expected = args.streams * args.readers * args.tokens
    if events != expected:
        if not args.grid:
            raise SystemExit(f"{system}: received {events} events, expected {expected}")
        # A grid goes on: past its capacity a server may end streams early (ringcast ends a
        # stream whose job no worker accepted within 10 s with worker_unavailable); the run
        # counts what arrived, and the point says how much did not.
        print(
            f"{system}: received {events} events of {expected} (streams ended early or "
            "failed: the server is past its capacity here)",
            flush=True,
        )
    by_role = {f"cpu:{r}": cpu1[r] - cpu0.get(r, 0.0) for r in cpu1}
    server_cpu = sum(by_role.values())
    return {
        "events_per_s": events / max(span, 1e-9),
        "p50_ms": p50,
        "p99_ms": p99,
        "events": events,
        "missing_events": expected - events,
        "server_cpu_s": server_cpu,
        "cpu_us_per_event": server_cpu / max(events, 1) * 1e6,
        "client_cpu_s": client_cpu,
        "server_wait_s": wait1 - wait0,
        "client_wait_s": client_wait,
        **by_role,
    }


def run_point(
    args: argparse.Namespace, systems: list[str], tmp: str, loadgen: str | None
) -> dict[str, dict[str, float]]:
    """Every system at ``args``' rate, ``--repeat`` times interleaved (so background load hits
    every system); each metric's median over the runs, robust to a run hit by a burst. With
    ``--profile``, each system then runs once more under each profiler (not counted)."""
    skipped = [x for x in systems if not serves_point(x, args.readers)]
    if skipped:
        print(f"not run at {args.readers} readers per stream (one reader only): "
              f"{', '.join(skipped)}", flush=True)  # fmt: skip
    systems = [x for x in systems if x not in skipped]
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in systems}
    for _ in range(args.repeat):
        for system in systems:
            runs[system].append(measure(system, args, tmp, loadgen))
    if args.profile:
        out = Path(args.profile)
        out.mkdir(parents=True, exist_ok=True)
        rate = f"{args.tokens_per_s:g}tps" if args.tokens_per_s else "unpaced"
        for system in systems:
            label = f"{args.streams}x{args.readers}-{rate}-{system}"
            for tool in args.profiler.split(","):
                measure(system, args, tmp, loadgen, (tool, out, label))
    return {
        name: {k: statistics.median(r.get(k, 0.0) for r in rs) for k in set().union(*rs)}
        for name, rs in runs.items()
    }


def roles_text(r: dict[str, float]) -> str:
    """A run's server CPU by process, in microseconds per delivered event."""
    events = max(r["events"], 1)
    order = {"manager": 0, "server": 0, "worker": 1, "http": 2, "mirror": 3, "redis": 4}
    roles = sorted(
        (k[4:] for k in r if k.startswith("cpu:")),
        key=lambda x: (order.get(x.rstrip("0123456789"), 9), x),
    )
    return " ".join(f"{x} {r['cpu:' + x] / events * 1e6:.1f}" for x in roles)


def div(a: float, b: float) -> float:
    """``a / b``, NaN for ``b == 0`` (a short run whose CPU time, counted in 10 ms ticks,
    came out 0)."""
    return a / b if b else math.nan


def print_table(results: dict[str, dict[str, float]]) -> None:
    print(
        f"{'system':<20}{'events/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'us/event':>10}"
        f"{'server cpu s':>13}{'client cpu s':>13}{'server wait s':>14}"
        f"  server CPU by process, us/event"
    )
    for name, r in results.items():
        print(
            f"{name:<20}{r['events_per_s']:>10.0f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}"
            f"{r['cpu_us_per_event']:>10.1f}{r['server_cpu_s']:>13.2f}{r['client_cpu_s']:>13.2f}"
            f"{r['server_wait_s']:>14.2f}  {roles_text(r)}"
            + (f"  ({r['missing_events']:.0f} events missing)" if r.get("missing_events") else "")
        )
    if "ringcast" in results:
        rc = results["ringcast"]
        for name, r in results.items():
            if name != "ringcast":
                print(
                    f"ringcast/{name}: events/s x{div(rc['events_per_s'], r['events_per_s']):.2f}, "
                    f"p50 x{div(rc['p50_ms'], r['p50_ms']):.2f}, "
                    f"p99 x{div(rc['p99_ms'], r['p99_ms']):.2f}, "
                    f"CPU/event x{div(rc['cpu_us_per_event'], r['cpu_us_per_event']):.2f}"
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


GRID_POINTS = "1000x1,1000x2,100x10,8x128,50x20"
GRID_RATES = "20,200"
"""The common-case grid of issue 15: streams x readers, at model pace (20 tok/s, what a
model streams and what the issue measured) and at 10x it."""
GRID_CPU_POINTS = ((1000, 1), (1000, 2))
"""The points where the defaults' CPU per event is held to the best single-process
server's."""


def cores() -> int:
    """The CPUs this process may run on (its affinity mask, as ringcast's ``auto`` counts)."""
    return len(os.sched_getaffinity(0))


def grid_systems() -> str:
    """ringcast at its defaults, at one HTTP process and at one per core, the
    single-process servers, and memory-broadcast in one process per core."""
    fixed = dict.fromkeys(["ringcast-1p", f"ringcast-{cores()}p"])
    spread = [f"memory-broadcast-{min(cores(), 64)}p"] if cores() > 1 else []
    return ",".join(["ringcast", *fixed, "memory-broadcast", *spread, "memory"])


def verdict(s: int, r: int, results: dict[str, dict[str, float]]) -> dict[str, float | str]:
    """The figures of issue 15's "Done when" at one point: ringcast at its defaults (system
    ``ringcast``) against the best single-process server (the least CPU per event; its p99,
    and the least p99 of any of them) and against the best fixed ringcast setting (the
    ``ringcast-<N>p`` with the least p99)."""
    out: dict[str, float | str] = {}
    for name in results:
        many = BASELINE_PROCS.fullmatch(name)
        if many and many.group(1) in results:
            one, spread = results[many.group(1)], results[name]
            out["spread_cpu:" + name] = div(spread["cpu_us_per_event"], one["cpu_us_per_event"])
            out["spread_p99:" + name] = div(spread["p99_ms"], one["p99_ms"])
    rc = results.get("ringcast")
    single = [n for n in results if not is_ringcast(n) and not BASELINE_PROCS.fullmatch(n)]
    fixed = [n for n in results if RINGCAST_PROCS.fullmatch(n)]
    if rc is None:
        return out
    if single:
        best = min(single, key=lambda n: results[n]["cpu_us_per_event"])
        fastest = min(single, key=lambda n: results[n]["p99_ms"])
        out["best_single"] = best
        out["cpu_vs_single"] = div(rc["cpu_us_per_event"], results[best]["cpu_us_per_event"])
        out["p99_vs_single"] = div(rc["p99_ms"], results[fastest]["p99_ms"])
        out["fastest_single"] = fastest
    if fixed:
        best_fixed = min(fixed, key=lambda n: results[n]["p99_ms"])
        out["best_fixed"] = best_fixed
        out["p99_vs_fixed"] = div(rc["p99_ms"], results[best_fixed]["p99_ms"])
    # Each bound the run can check: "no" if one fails; "-" (not judged) if they hold but the
    # run lacks what another is set against; "yes" if every bound was checked and holds.
    # A NaN ratio (a figure of 0 in a run too short to measure) checks nothing either.
    held: list[bool] = [rc.get("missing_events", 0) == 0]
    if rc.get("missing_events", 0) > 0:
        out["missing"] = rc["missing_events"]
    bounds = [("p99_vs_fixed", 1.5)] if fixed else []
    if (s, r) in GRID_CPU_POINTS and single:
        bounds += [("cpu_vs_single", 1.0), ("p99_vs_single", 1.0)]
    judged = bool(fixed) and (bool(single) or (s, r) not in GRID_CPU_POINTS)
    for key, bound in bounds:
        x = float(out[key])
        if math.isnan(x):
            judged = False
        else:
            held.append(x <= bound)
    out["done"] = "no" if not all(held) else "yes" if judged else "-"
    return out


def print_verdict(s: int, r: int, v: dict[str, float | str]) -> None:
    parts, spread = [], []
    if "cpu_vs_single" in v:
        parts.append(
            f"CPU/event x{v['cpu_vs_single']:.2f} of {v['best_single']}'s, "
            f"p99 x{v['p99_vs_single']:.2f} of {v['fastest_single']}'s"
            + ("" if (s, r) in GRID_CPU_POINTS else " (not held to it here)")
        )
    if "p99_vs_fixed" in v:
        parts.append(
            f"p99 x{v['p99_vs_fixed']:.2f} of the best fixed setting's ({v['best_fixed']})"
        )
    if "missing" in v:
        parts.append(f"{v['missing']:.0f} events never arrived")
    for key in v:
        if key.startswith("spread_cpu:"):
            name = key.split(":", 1)[1]
            spread.append(
                f"{name}: CPU/event x{v[key]:.2f} and p99 x{v['spread_p99:' + name]:.2f} of "
                "its one process's"
            )
    if parts:
        done = str(v["done"])
        if done == "-":
            done = "not judged (no single-process server, or no ringcast-<N>p, in this run)"
        print(f"defaults: {'; '.join(parts)}; done-when met: {done}")
    for line in spread:
        print(line)


def parse_points(text: str) -> list[tuple[int, int]]:
    """``1000x1,8x128`` -> [(1000, 1), (8, 128)]; ValueError naming a bad one."""
    points = []
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", item)
        if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
            raise ValueError(f"{item!r} is not STREAMSxREADERS (e.g. 1000x1)")
        points.append((int(m.group(1)), int(m.group(2))))
    return points


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return f"load average {os.getloadavg()}"


def run_grid(
    args: argparse.Namespace, systems: list[str], rates: list[float], loadgen: str | None
) -> list[dict[str, object]]:
    """Every point of ``--points`` at every rate of ``--rates``, every system at each;
    prints each point's table and verdict as it goes, then a summary."""
    import tempfile

    points = parse_points(args.points)
    out: list[dict[str, object]] = []
    print(f"grid start: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; {uptime()}")
    print(f"{cores()} CPUs in this process's affinity mask; systems: {', '.join(systems)}")
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as t:
        for s, r in points:
            for tps in rates:
                point = argparse.Namespace(**vars(args))
                point.streams, point.readers, point.tokens_per_s = s, r, tps
                tokens = round(tps * args.duration) if tps else args.tokens
                point.tokens = max(20, min(tokens, args.max_events // (s * r)))
                if not any(serves_point(x, r) for x in systems):
                    print(f"\n{s} streams x {r} readers: none of --systems serves more than "
                          "one reader per stream; skipped", flush=True)  # fmt: skip
                    continue
                t0 = time.monotonic()
                results = run_point(point, systems, t, loadgen)
                print(
                    f"\n{s} streams x {r} readers, {tps or 'unpaced'} tok/s, {point.tokens} "
                    f"tokens ({s * r * point.tokens} events per run), medians of {args.repeat}, "
                    f"{time.monotonic() - t0:.0f} s, load average {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
                print_table(results)
                v = verdict(s, r, results)
                print_verdict(s, r, v)
                out.append(
                    {
                        "streams": s,
                        "readers": r,
                        "tokens_per_s": tps,
                        "tokens": point.tokens,
                        "results": results,
                        "verdict": v,
                    }
                )
    print(f"\ngrid end: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; {uptime()}")
    print_grid_summary(out)
    return out


def print_grid_summary(out: list[dict[str, object]]) -> None:
    print(
        f"\n{'point':<16}{'tok/s':>6}{'default us/ev':>14}{'best 1-proc':>12}{'x':>6}"
        f"{'default p99':>12}{'1-proc p99':>11}{'x':>6}{'fixed p99':>10}{'x':>6}  done"
    )
    for p in out:
        res: dict[str, dict[str, float]] = p["results"]  # type: ignore[assignment]
        v: dict[str, float | str] = p["verdict"]  # type: ignore[assignment]
        rc = res.get("ringcast")
        if rc is None:
            continue

        best, fastest, fixed = (
            str(v.get(k, "")) for k in ("best_single", "fastest_single", "best_fixed")
        )
        print(
            f"{str(p['streams']) + 'x' + str(p['readers']):<16}{p['tokens_per_s']:>6g}"
            f"{rc['cpu_us_per_event']:>14.1f}{cell(res, best, 'cpu_us_per_event'):>12}"
            f"{ratio(v, 'cpu_vs_single'):>6}{rc['p99_ms']:>12.2f}"
            f"{cell(res, fastest, 'p99_ms'):>11}{ratio(v, 'p99_vs_single'):>6}"
            f"{cell(res, fixed, 'p99_ms'):>10}{ratio(v, 'p99_vs_fixed'):>6}  {v.get('done', '-')}"
        )


def cell(res: dict[str, dict[str, float]], name: str, key: str) -> str:
    return f"{res[name][key]:.1f}" if name in res else "-"


def ratio(v: dict[str, float | str], key: str) -> str:
    return f"{v[key]:.2f}" if key in v else "-"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="A sweep (--sweep 100,400,1000,2000,4000) runs every system at each rate and "
        "prints, per system, the most events/s delivered with p99 within --slo-ms: the "
        "throughput a user can count on, which a single unpaced run cannot tell (there, a "
        "producer in its own process runs ahead of the fan-out and its backlog is latency). "
        "The grid (--grid) runs issue 15's common case: every point of --points at every "
        "rate of --rates, ringcast at its defaults, at --http-procs 1 and one per core, "
        "the single-process servers and memory-broadcast in one process per core, and prints "
        "the ratios its 'Done when' states, and what the processes cost that baseline.",
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
    ap.add_argument(
        "--grid",
        action="store_true",
        help="run the grid: every --points at every --rates (default systems: "
        f"{grid_systems()}; 'ringcast-<N>p' is ringcast serve --http-procs N, "
        "'memory-broadcast-<N>p' that baseline in N processes, at one reader per stream)",
    )
    ap.add_argument(
        "--points",
        default=GRID_POINTS,
        help="with --grid: comma-separated STREAMSxREADERS (%(default)s)",
    )
    ap.add_argument(
        "--rates",
        default=GRID_RATES,
        help="with --grid: comma-separated tok/s per stream; 20 is a model's pace (%(default)s)",
    )
    ap.add_argument(
        "--max-events",
        type=int,
        default=300_000,
        help="with --grid: fewer tokens per stream where a point's rate x --duration would "
        "deliver more events than this per run (at least 20 tokens) (%(default)s)",
    )
    ap.add_argument(
        "--duration",
        type=float,
        default=3.0,
        help="seconds of tokens per sweep or grid point (%(default)s)",
    )
    ap.add_argument(
        "--slo-ms",
        default="25,50,100",
        help="comma-separated p99 bounds: for each, a sweep prints every system's sustained "
        "rate (the most events/s it delivered with p99 within the bound)",
    )
    ap.add_argument("--plot", help="a sweep's p99 and delivered events/s against offered, to FILE")
    ap.add_argument("--prefill", type=float, default=1.0)
    ap.add_argument(
        "--http-procs",
        help="ringcast serve --http-procs for the system 'ringcast' (default: not given, "
        "ringcast's own default)",
    )
    ap.add_argument(
        "--workers",
        help="ringcast serve --workers for 'ringcast' (default: not given)",
    )
    ap.add_argument(
        "--coalesce-ms",
        type=float,
        help="ringcast serve --coalesce-ms for 'ringcast' (default: not given)",
    )
    ap.add_argument(
        "--coalesce",
        choices=["adaptive", "always"],
        help="ringcast serve --coalesce for 'ringcast' (default: not given)",
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
    ap.add_argument(
        "--repeat",
        type=int,
        help="runs per system; medians are shown (default 5, with --grid 1)",
    )
    ap.add_argument(
        "--systems",
        help="comma-separated, from: ringcast, ringcast-<N>p, memory (alias asyncio), "
        "memory-broadcast, memory-broadcast-<N>p (N >= 2 processes; one reader per stream "
        "only), redis, redis-per-reader, ringcast-redis (default "
        "ringcast,memory,memory-broadcast,redis; with --grid, see --grid)",
    )
    ap.add_argument("--json", metavar="FILE", help="write every point's figures to FILE")
    ap.add_argument(
        "--profile",
        metavar="DIR",
        help="after each point's measured runs, run every system once more under "
        "each --profiler and write its flame graphs (folded stacks, and SVGs with "
        "inferno-flamegraph on PATH) to DIR; see bench/RESULTS.md, 'Where an event's "
        "microseconds go'",
    )
    ap.add_argument(
        "--profiler",
        default=",".join(PROFILERS),
        help="with --profile: comma-separated, from py-spy (the worker and each HTTP "
        "process, --native) and perf (every server process, cpu-clock) (%(default)s)",
    )
    args = ap.parse_args()
    import tempfile

    if args.sweep and args.tokens_per_s != ap.get_default("tokens_per_s"):
        ap.error("--sweep replaces --tokens-per-s: give one of them")
    if args.grid and args.sweep:
        ap.error("--grid and --sweep are two different runs: give one of them")
    if args.plot and not args.sweep:
        ap.error("--plot draws a sweep: give --sweep too")
    if args.repeat is None:
        args.repeat = 1 if args.grid else 5
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    if args.profile and not set(args.profiler.split(",")) <= set(PROFILERS):
        ap.error(f"--profiler: a comma-separated subset of {', '.join(PROFILERS)}")
    if args.grid:
        try:
            parse_points(args.points)
        except ValueError as e:
            ap.error(f"--points: {e}")

    def numbers(text: str, flag: str) -> list[float]:
        try:
            return [float(x) for x in text.split(",")]
        except ValueError:
            ap.error(f"{flag} wants numbers separated by commas, got {text!r}")

    if args.grid:
        rates = numbers(args.rates, "--rates")
    else:
        rates = numbers(args.sweep, "--sweep") if args.sweep else [args.tokens_per_s]
    if any(r < 0 for r in rates):
        ap.error("a rate cannot be negative (0 = unpaced)")
    if args.plot and not any(r > 0 for r in rates):
        ap.error("--plot draws the paced rates of a sweep: give at least one rate above 0")
    slos = numbers(args.slo_ms, "--slo-ms")
    default_systems = grid_systems() if args.grid else "ringcast,memory,memory-broadcast,redis"
    systems = (args.systems or default_systems).split(",")
    known = {"ringcast", "memory", "asyncio", "memory-broadcast", "redis", "redis-per-reader"}
    known.add("ringcast-redis")  # ringcast serve --redis (a private redis-server per run)
    patterns = (RINGCAST_PROCS, BASELINE_PROCS)
    if args.streams < 1 or args.readers < 1:
        ap.error("--streams and --readers: at least 1")
    if not systems or not all(x in known or any(p.fullmatch(x) for p in patterns) for x in systems):
        ap.error(
            f"--systems: a comma-separated subset of {', '.join(sorted(known))}, "
            "ringcast-<N>p, memory-broadcast-<N>p (N >= 2)"
        )
    for x in systems:
        many = BASELINE_PROCS.fullmatch(x)
        if many and int(many.group(2)) > 64:
            ap.error(f"--systems: {x}: from 2 to 64 processes")
    if not args.grid and not all(serves_point(x, args.readers) for x in systems):
        ap.error(
            "memory-broadcast-<N>p serves streams read by their POST alone: --readers 1 "
            "(a GET could land in a process without its stream)"
        )
    loadgen = build_loadgen() if args.client == "rust" else None
    if args.grid:
        grid = run_grid(args, systems, rates, loadgen)
        if args.json:
            Path(args.json).write_text(
                json.dumps({"command": sys.argv, "uptime": uptime(), "points": grid}, indent=1)
            )
        return
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
                f"{tps or 'unpaced'} tok/s, ringcast: {ringcast_setting(args)}, baselines' "
                f"coalescing {args.baseline_coalesce_ms:g} ms, {args.client} client, medians of "
                f"{args.repeat} runs, load average {os.getloadavg()[0]:.1f}",
                flush=True,
            )
            print_table(results)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "command": sys.argv,
                    "uptime": uptime(),
                    "points": [{"tokens_per_s": tps, "results": res} for tps, res in points],
                },
                indent=1,
            )
        )
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
            print(f"{name:<20}{shown}")
        rc = best.get("ringcast")
        for name, b in best.items():
            if name != "ringcast" and rc is not None and b is not None:
                print(f"ringcast/{name}: sustained events/s x{rc[1] / b[1]:.2f}")
    if args.plot:
        plot_sweep(
            points,
            slos,
            args.plot,
            f"{args.streams} streams x {args.readers} readers, {os.cpu_count()} CPUs (ringcast: "
            f"{ringcast_setting(args)}; {args.client} client)",
        )


if __name__ == "__main__":
    main()
