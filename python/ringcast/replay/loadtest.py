"""``ringcast replay``: a fan-out load test that checks every byte.

The load test (:func:`run_replay`) starts a server (or targets ``--url``), replays S streams,
attaches R readers per stream over HTTP (the POST that started the stream is reader 0, the
others ``GET /v1/stream?conv_id=...&from=0``; a share of them disconnect part-way and resume
with ``from=<bytes received>``), checks that every reader got exactly the bytes the server
must have sent, and reports throughput, latency from recorded emit time to receipt, resumes,
offsets lost, errors, and CPU and memory per process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import msgspec
import psutil  # type: ignore[import-untyped,unused-ignore]

from ringcast._extras import require
from ringcast.http import client as _http
from ringcast.trace import Trace, TraceError, expected_body, load_trace, parse_speed

__all__ = ["ReplayOptions", "register", "run_replay"]


# --------------------------------------------------------------------------------------------
# Load generator


@dataclass
class ReplayOptions:
    trace: str
    fanout: int = 10
    streams: int | None = None
    speed: float = 1.0
    http_procs: str = "auto"  # ringcast serve --http-procs: auto (its default) or N
    resume_share: float = 0.0
    url: str | None = None
    compare: list[str] = field(default_factory=list)
    ramp: float = 0.5
    seed: int = 0
    json_out: str | None = None
    png_out: str | None = None
    progress: bool = True
    server_args: list[str] = field(default_factory=list)
    timeout: float | None = None
    repeat: int = 1


@dataclass
class _Expect:
    body: bytes
    ends: list[int]
    times: list[float]


@dataclass
class _Stats:
    t0: float
    bin_s: float = 0.1
    latency: array[float] = field(default_factory=lambda: array("d"))
    bin_events: list[int] = field(default_factory=list)
    bin_bytes: list[int] = field(default_factory=list)
    events: int = 0
    bytes: int = 0
    resumes: int = 0
    offsets_lost: int = 0
    errors: int = 0
    mismatches: int = 0
    readers_done: int = 0
    readers_complete: int = 0
    events_lost: int = 0
    error_samples: list[str] = field(default_factory=list)

    def error(self, msg: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 10:
            self.error_samples.append(msg)

    def add(self, now: float, nbytes: int, nevents: int) -> None:
        b = int((now - self.t0) / self.bin_s)
        if b >= len(self.bin_events):
            grow = b + 1 - len(self.bin_events)
            self.bin_events.extend([0] * grow)
            self.bin_bytes.extend([0] * grow)
        if b >= 0:
            self.bin_events[b] += nevents
            self.bin_bytes[b] += nbytes


class _ReaderState:
    """One reader's progress across its (re)connections."""

    __slots__ = ("cut", "exp", "k", "pos", "t_emit0")

    def __init__(self, exp: _Expect, cut: int) -> None:
        self.exp = exp
        self.pos = 0  # bytes received and checked
        self.k = 0  # events completed
        self.cut = cut  # disconnect once this many bytes arrived (0 = never)
        self.t_emit0 = 0.0


class _ReaderProto(asyncio.Protocol):
    """One HTTP exchange of one reader: checks bytes as they arrive, times each event."""

    def __init__(
        self,
        st: _ReaderState,
        stats: _Stats,
        request: bytes,
        inv_speed: float,
        done: asyncio.Future[str],
        head: asyncio.Future[int] | None = None,
    ) -> None:
        self.st = st
        self.stats = stats
        self.request = request
        self.inv = inv_speed
        self.done = done
        self.head = head
        self.parser = _http.ResponseParser()
        self.transport: asyncio.Transport | None = None
        self.errbody = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def _finish(self, how: str) -> None:
        if not self.done.done():
            self.done.set_result(how)
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        try:
            pieces = self.parser.feed(data)
        except _http.HTTPError as exc:
            self._finish(f"error: {exc}")
            return
        p = self.parser
        if not p.head_done:
            return
        if self.head is not None and not self.head.done():
            self.head.set_result(p.status)
        if p.status != 200:
            self.errbody += b"".join(pieces)
            if p.done:
                self._finish(f"status {p.status}: {self.errbody[:200]!r}")
            return
        st = self.st
        exp = st.exp
        stats = self.stats
        for piece in pieces:
            n = len(piece)
            if not exp.body.startswith(piece, st.pos):
                if b"offset_lost" in piece:  # ringcast's in-band end for a reader left behind
                    self._finish(f"offset_lost in-band at byte {st.pos}")
                else:
                    self._finish(f"mismatch at byte {st.pos}: got {piece[:60]!r}")
                return
            st.pos += n
            k0 = st.k
            ends = exp.ends
            while st.k < len(ends) and ends[st.k] <= st.pos:
                stats.latency.append(now - (st.t_emit0 + exp.times[st.k] * self.inv))
                st.k += 1
            stats.events += st.k - k0
            stats.bytes += n
            stats.add(now, n, st.k - k0)
            if st.cut and st.pos >= st.cut:
                st.cut = 0
                self._finish("cut")
                return
        if p.done:
            self._finish("end")

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done.done():
            return
        try:
            self.parser.eof()
        except _http.HTTPError as e:
            self._finish(f"error: {e}")
            return
        if self.parser.status != 200:
            self._finish(f"status {self.parser.status}: {self.errbody[:200]!r}")
        else:
            self._finish("end")


class _Load:
    """Drives one replay against one server URL."""

    def __init__(
        self, url: str, exps: list[_Expect], streams: list[int], opts: ReplayOptions, tag: str
    ) -> None:
        self.target = _http.parse_url(url)
        self.exps = exps
        self.stream_of = streams  # for replayed stream i, which trace stream
        self.opts = opts
        self.tag = tag
        self.inv = 0.0 if math.isinf(opts.speed) else 1.0 / opts.speed
        self.stats = _Stats(t0=time.perf_counter())
        self.rng = random.Random(opts.seed)
        self.readers_total = len(streams) * opts.fanout
        self.sem = asyncio.Semaphore(256)  # connects in flight, to stay under the accept backlog
        # For the run deadline: readers still reading, and readers not started yet (per
        # stream: how many, and how many events each would get), so a cut-short run still
        # accounts for every event as received or lost.
        self.live: set[_ReaderState] = set()
        self.unstarted: dict[int, tuple[int, int]] = {}

    async def _connect(self, proto: _ReaderProto) -> None:
        loop = asyncio.get_running_loop()
        async with self.sem:
            await loop.create_connection(lambda: proto, self.target.host, self.target.port)

    async def _exchange(
        self,
        st: _ReaderState,
        request: bytes,
        head: asyncio.Future[int] | None = None,
    ) -> str:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[str] = loop.create_future()
        proto = _ReaderProto(st, self.stats, request, self.inv, done, head)
        try:
            await self._connect(proto)
        except OSError as exc:
            if head is not None and not head.done():
                head.set_result(0)
            return f"error: connect: {exc}"
        try:
            return await done
        finally:
            if proto.transport is not None:
                proto.transport.abort()
            if head is not None and not head.done():
                head.set_result(0)

    def _get(self, conv: str, offset: int) -> bytes:
        return _http.build_request(
            "GET",
            self.target,
            f"{self.target.path}/v1/stream?conv_id={conv}&from={offset}",
            {"Accept": "text/event-stream"},
        )

    async def _reader(self, conv: str, st: _ReaderState, first: bytes | None, head: Any) -> None:
        request = first if first is not None else self._get(conv, 0)
        how = "error: no attempt"
        self.live.add(st)
        try:
            for _attempt in range(8):
                how = await self._exchange(st, request, head)
                head = None
                if how != "cut":
                    break
                self.stats.resumes += 1
                request = self._get(conv, st.pos)
        finally:
            self.live.discard(st)
        stats = self.stats
        stats.readers_done += 1
        if how == "end" and st.k == len(st.exp.ends) and st.pos == len(st.exp.body):
            stats.readers_complete += 1
            return
        stats.events_lost += len(st.exp.ends) - st.k
        if "offset_lost" in how:  # 410 with type offset_lost, or the in-band event
            stats.offsets_lost += 1
            if len(stats.error_samples) < 10:
                stats.error_samples.append(f"{conv}: {how}")
        elif how.startswith("mismatch"):
            stats.mismatches += 1
            stats.error(f"{conv}: {how}")
        elif how == "end":
            stats.error(f"{conv}: response ended at byte {st.pos} of {len(st.exp.body)}")
        else:
            stats.error(f"{conv}: {how}")

    async def _stream(self, i: int, run_id: str) -> None:
        j = self.stream_of[i]
        exp = self.exps[j]
        self.unstarted[i] = (self.opts.fanout, len(exp.ends))
        await asyncio.sleep(self.opts.ramp * i / max(1, len(self.stream_of)))
        conv = f"replay-{run_id}-{i}"
        tr = self.opts_trace.streams[j]
        body = dict(tr.request) if isinstance(tr.request, dict) else {}
        body.setdefault("messages", [{"role": "user", "content": conv}])
        body["stream"] = True
        body["replay_stream"] = j
        path = tr.path if tr.path.endswith("completions") else "/v1/chat/completions"
        post = _http.build_request(
            "POST",
            self.target,
            self.target.path + path,
            {
                "Content-Type": "application/json",
                "Accept": "text/event-stream",
                "X-Conversation-Id": conv,
            },
            msgspec.json.encode(body),
        )
        loop = asyncio.get_running_loop()
        head: asyncio.Future[int] = loop.create_future()
        st0 = _ReaderState(exp, 0)
        st0.t_emit0 = time.perf_counter()
        first = asyncio.ensure_future(self._reader(conv, st0, post, head))
        self.unstarted[i] = (self.opts.fanout - 1, len(exp.ends))
        tasks = [first]
        try:
            await asyncio.wait_for(asyncio.shield(head), 30.0)
        except TimeoutError:
            pass
        except asyncio.CancelledError:
            first.cancel()
            raise
        if head.done() and head.result() == 200:
            for _ in range(self.opts.fanout - 1):
                cut = 0
                if self.rng.random() < self.opts.resume_share and len(exp.body) > 1:
                    cut = self.rng.randint(1, len(exp.body) - 1)
                st = _ReaderState(exp, cut)
                st.t_emit0 = st0.t_emit0
                tasks.append(asyncio.ensure_future(self._reader(conv, st, None, None)))
        else:
            # The stream never started: its other readers are lost without trying.
            self.stats.readers_done += self.opts.fanout - 1
            self.stats.events_lost += (self.opts.fanout - 1) * len(exp.ends)
            self.stats.error(f"{conv}: POST did not start a stream")
        del self.unstarted[i]
        await asyncio.gather(*tasks)

    opts_trace: Trace

    async def run(self, trace: Trace, deadline: float) -> float:
        self.opts_trace = trace
        run_id = f"{os.getpid()}-{int(time.time() * 1000) % 10**8}-{self.tag}"
        self.stats.t0 = time.perf_counter()
        tasks = [asyncio.ensure_future(self._stream(i, run_id)) for i in range(len(self.stream_of))]
        done, pending = await asyncio.wait(tasks, timeout=deadline)
        for t in pending:
            t.cancel()
        if pending:
            # Cancelled readers have left ``live`` (their ``finally``); count them first.
            cut = list(self.live)
            await asyncio.gather(*pending, return_exceptions=True)
            stats = self.stats
            for st in cut:
                stats.events_lost += len(st.exp.ends) - st.k
            for count, events in self.unstarted.values():
                stats.events_lost += count * events
            missing = len(cut) + sum(c for c, _ in self.unstarted.values())
            stats.readers_done += missing
            stats.error(f"run deadline of {deadline:.0f}s passed; {missing} readers cut short")
        for t in done:
            if t.exception() is not None:
                self.stats.error(f"internal: {t.exception()!r}")
        return time.perf_counter() - self.stats.t0


# --------------------------------------------------------------------------------------------
# Servers under test

BASELINES = Path("bench") / "baselines.py"
"""The baseline servers of ``--compare``, relative to a ringcast source checkout: benchmark
code, not part of the installed package."""


def _is_ringcast_checkout(root: Path) -> bool:
    """``root`` holds ``bench/baselines.py`` and a ``pyproject.toml`` of the project ringcast."""
    try:
        with (root / "pyproject.toml").open("rb") as f:
            name = tomllib.load(f).get("project", {}).get("name")
    except (OSError, tomllib.TOMLDecodeError):
        return False
    return name == "ringcast" and (root / BASELINES).is_file()


def baselines_script(cwd: Path | None = None) -> Path:
    """``bench/baselines.py`` of the checkout this package runs from (an editable install)
    or, for an installed package, of the checkout the current directory is in (the nearest
    directory at or above it that is one); RuntimeError saying what is needed otherwise."""
    here = (Path.cwd() if cwd is None else cwd).resolve()
    for root in (Path(__file__).resolve().parents[3], here, *here.parents):
        if _is_ringcast_checkout(root):
            return root / BASELINES
    raise RuntimeError(
        "--compare runs the baseline servers of bench/baselines.py, which a pip install does "
        f"not include and no ringcast source checkout holds at or above {here}: run "
        "ringcast replay from inside a checkout (git clone the ringcast repository), or "
        "leave out --compare"
    )


REDIS_SERVER_MISSING = (
    "--compare redis needs redis-server on PATH (Debian: apt install redis-server)"
)


def private_redis_argv(exe: str, port: int, data_dir: str) -> list[str]:
    """Command line of a throw-away ``redis-server`` for a benchmark: loopback only, on
    ``port``, nothing persisted (``data_dir`` only holds what Redis insists on writing)."""
    return [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", data_dir]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _wait_reachable(url: str, timeout: float) -> None:
    """Connect until the server accepts; ``ConnectionError`` with the cause after ``timeout``."""
    t = _http.parse_url(url)
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            _, w = await asyncio.wait_for(asyncio.open_connection(t.host, t.port), 1.0)
            w.close()
            return
        except (OSError, TimeoutError) as exc:
            last = exc
            await asyncio.sleep(0.05)
    raise ConnectionError(f"cannot reach {url} within {timeout:g}s: {last or 'timed out'}")


@dataclass
class _Server:
    name: str
    url: str
    procs: list[subprocess.Popen[bytes]]
    log: Path
    tmp: str | None = None

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _spawn(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def http_procs_value(text: str) -> str:
    """argparse ``type`` of ``--http-procs``: ``auto`` or a whole number >= 1, as given to
    ``ringcast serve``."""
    if text.strip().lower() == "auto":
        return "auto"
    if not text.strip().isdecimal() or int(text) < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of HTTP processes: give auto or a whole number >= 1"
        )
    return str(int(text))


def ringcast_serve_command(
    trace: str, speed: float, port: int, http_procs: str, extra: Sequence[str] = ()
) -> list[str]:
    """The ``ringcast serve`` command line that replays ``trace``."""
    return [
        sys.executable,
        "-m",
        "ringcast.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--http-procs",
        http_procs,
        "--replay",
        trace,
        "--speed",
        "max" if math.isinf(speed) else repr(speed),
        *extra,
    ]


_LISTENING = re.compile(r"listening on (http://[\w.\-\[\]:]+)")


async def _wait_listening(
    name: str, proc: subprocess.Popen[bytes], log: Path, timeout: float
) -> str:
    """The URL a server announces on its output (it is started with ``--port 0``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        m = _LISTENING.search(text)
        if m:
            return m.group(1)
        if proc.poll() is not None:
            raise RuntimeError(
                f"{name} server exited with status {proc.returncode}; its output:\n" + text[-2000:]
            )
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{name} server did not announce its port within {timeout:g}s")


async def _start_server(name: str, opts: ReplayOptions, workdir: str) -> _Server:
    # A fresh log per start: the URL is read back from it (--repeat starts servers again).
    fd, log_name = tempfile.mkstemp(prefix=f"{name}-", suffix=".log", dir=workdir)
    os.close(fd)
    log = Path(log_name)
    speed = "max" if math.isinf(opts.speed) else repr(opts.speed)
    procs: list[subprocess.Popen[bytes]] = []
    tmp = None
    if name == "ringcast":
        tmp = tempfile.mkdtemp(
            prefix="ringcast-replay-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None
        )
        cmd = ringcast_serve_command(
            opts.trace,
            opts.speed,
            0,
            opts.http_procs,
            [
                "--segment",
                os.path.join(tmp, "segment"),
                "--log-level",
                "WARNING",
                *opts.server_args,
            ],
        )
    elif name in ("asyncio", "redis"):
        cmd = [sys.executable, str(baselines_script()), name]
        cmd += ["--port", "0", "--replay", opts.trace, "--speed", speed]
        if name == "redis":
            exe = shutil.which("redis-server")
            if exe is None:
                raise RuntimeError(REDIS_SERVER_MISSING)
            rport = _free_port()
            tmp = tempfile.mkdtemp(prefix="ringcast-redis-")
            rcmd = [*private_redis_argv(exe, rport, tmp), "--maxclients", "20000"]
            procs.append(_spawn(rcmd, Path(workdir) / "redis-server.log"))
            try:
                await _wait_reachable(f"http://127.0.0.1:{rport}", 10.0)
            except ConnectionError:
                _Server(name, "", procs, log, tmp).stop()
                raise
            cmd += ["--redis-url", f"redis://127.0.0.1:{rport}/0"]
    else:
        raise ValueError(f"unknown server {name!r}: choose from ringcast, asyncio, redis")
    procs.append(_spawn(cmd, log))
    server = _Server(name, "", procs, log, tmp)
    try:
        server.url = await _wait_listening(name, procs[-1], log, 60.0)
    except RuntimeError:
        server.stop()
        raise
    return server


# --------------------------------------------------------------------------------------------
# Measurement of processes


class _ProcSampler:
    """Samples CPU time and RSS of the given processes and their children (psutil)."""

    def __init__(self, roots: list[int], include_self: bool = True) -> None:
        self._psutil = psutil
        self.roots = roots
        self.include_self = include_self
        self.procs: dict[int, Any] = {}
        self.first_cpu: dict[int, float] = {}
        self.last_cpu: dict[int, float] = {}
        self.rss_max: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self._next_discover = 0.0

    def _discover(self) -> None:
        ps = self._psutil
        found = []
        for pid in self.roots:
            try:
                p = ps.Process(pid)
                found.append(p)
                found.extend(p.children(recursive=True))
            except ps.Error:
                continue
        if self.include_self:
            found.append(ps.Process(os.getpid()))
        for p in found:
            if p.pid not in self.procs:
                self.procs[p.pid] = p
                try:
                    cmd = p.cmdline()
                    self.names[p.pid] = _role(cmd, p.pid == os.getpid())
                except ps.Error:
                    self.names[p.pid] = "?"

    def sample(self) -> None:
        # Listing children scans /proc, which stalls this (load-generating) loop for a few ms:
        # the server's processes all exist before it says it listens, so look again rarely.
        now = time.monotonic()
        if now >= self._next_discover:
            self._next_discover = now + 5.0
            self._discover()
        ps = self._psutil
        for pid, p in list(self.procs.items()):
            try:
                with p.oneshot():
                    c = p.cpu_times()
                    cpu = c.user + c.system
                    rss = p.memory_info().rss
            except ps.Error:
                continue
            self.first_cpu.setdefault(pid, cpu)
            self.last_cpu[pid] = cpu
            self.rss_max[pid] = max(self.rss_max.get(pid, 0), rss)

    def report(self, wall: float) -> list[dict[str, Any]]:
        out = []
        for pid in self.procs:
            if pid not in self.last_cpu:
                continue
            cpu = self.last_cpu[pid] - self.first_cpu[pid]
            out.append(
                {
                    "pid": pid,
                    "role": self.names.get(pid, "?"),
                    "cpu_s": round(cpu, 3),
                    "cpu_pct": round(100 * cpu / wall, 1) if wall > 0 else 0.0,
                    "rss_max_mb": round(self.rss_max[pid] / 2**20, 1),
                }
            )
        return out


def _role(cmd: list[str], is_self: bool) -> str:
    if is_self:
        return "load generator"
    text = " ".join(cmd)
    for needle, role in (
        ("redis-server", "redis-server"),
        ("baselines.py redis", "baseline redis"),
        ("baselines.py asyncio", "baseline asyncio"),
        ("ringcast.server.http_process", "ringcast http"),
        ("ringcast.server.worker", "ringcast worker"),
        ("serve", "ringcast manager"),
    ):
        if needle in text:
            return role
    return os.path.basename(cmd[0]) if cmd else "?"


# --------------------------------------------------------------------------------------------
# Report


def _percentile(sorted_xs: Sequence[float], q: float) -> float:
    if not sorted_xs:
        return math.nan
    i = min(len(sorted_xs) - 1, max(0, math.ceil(q * len(sorted_xs)) - 1))
    return sorted_xs[i]


def _target_report(
    name: str, url: str, load: _Load, wall: float, procs: list[dict[str, Any]], emitted: int
) -> dict[str, Any]:
    s = load.stats
    lat = sorted(s.latency)
    # A compact CDF for the figure: 200 quantiles.
    cdf = [[_percentile(lat, q / 200) * 1000, q / 200] for q in range(1, 201)] if lat else []
    readers = load.readers_total
    server_cpu = sum(p["cpu_s"] for p in procs if p["role"] != "load generator")
    return {
        "name": name,
        "url": url,
        "streams": len(load.stream_of),
        "readers_per_stream": load.opts.fanout,
        "readers": readers,
        "readers_complete": s.readers_complete,
        "events_emitted": emitted,
        "events_expected": emitted * load.opts.fanout,
        "events_received": s.events,
        "events_lost": s.events_lost,
        "bytes_received": s.bytes,
        "wall_s": round(wall, 3),
        "events_per_s": round(s.events / wall, 1) if wall > 0 else 0.0,
        "bytes_per_s": round(s.bytes / wall, 1) if wall > 0 else 0.0,
        "latency_ms": {
            "p50": round(_percentile(lat, 0.50) * 1000, 3),
            "p99": round(_percentile(lat, 0.99) * 1000, 3),
            "p99.9": round(_percentile(lat, 0.999) * 1000, 3),
            "max": round(lat[-1] * 1000, 3) if lat else math.nan,
        },
        "resumes": s.resumes,
        "offsets_lost": s.offsets_lost,
        "errors": s.errors,
        "mismatches": s.mismatches,
        "error_samples": s.error_samples,
        "processes": procs,
        "server_cpu_s": round(server_cpu, 3),
        # Server CPU per delivered event: less sensitive to a busy machine than latency.
        "server_cpu_us_per_event": round(1e6 * server_cpu / s.events, 2) if s.events else 0.0,
        "timeline": {"bin_s": s.bin_s, "events": s.bin_events, "bytes": s.bin_bytes},
        "latency_cdf_ms": cdf,
    }


def format_table(report: dict[str, Any]) -> str:
    """A plain-text table: one row per server."""
    cols = [
        ("server", "{name}"),
        ("readers", "{readers}"),
        ("events recv", "{events_received}"),
        ("lost", "{events_lost}"),
        ("events/s", "{events_per_s:.0f}"),
        ("MB/s", "{mbps:.2f}"),
        ("p50 ms", "{p50:.2f}"),
        ("p99 ms", "{p99:.2f}"),
        ("p99.9 ms", "{p999:.2f}"),
        ("resumes", "{resumes}"),
        ("off.lost", "{offsets_lost}"),
        ("errors", "{errors}"),
        ("srv CPU s", "{cpu:.1f}"),
        ("CPU us/event", "{cpu_us:.1f}"),
        ("srv RSS MB", "{rss:.0f}"),
    ]
    rows = []
    for t in report["targets"]:
        server_procs = [p for p in t["processes"] if p["role"] != "load generator"]
        vals = dict(t)
        vals.update(
            mbps=t["bytes_per_s"] / 1e6,
            p50=t["latency_ms"]["p50"],
            p99=t["latency_ms"]["p99"],
            p999=t["latency_ms"]["p99.9"],
            cpu=sum(p["cpu_s"] for p in server_procs),
            cpu_us=t["server_cpu_us_per_event"],
            rss=sum(p["rss_max_mb"] for p in server_procs),
        )
        rows.append([fmt.format(**vals) for _, fmt in cols])
    heads = [h for h, _ in cols]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(heads)]
    lines = [
        " | ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True)),
        "-|-".join("-" * w for w in widths),
    ]
    lines += [" | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def format_markdown(report: dict[str, Any]) -> str:
    """The same table as Markdown, for bench/RESULTS.md."""
    text = format_table(report).splitlines()
    head = "| " + text[0].replace(" | ", " | ") + " |"
    sep = "|" + "|".join("---" for _ in text[0].split(" | ")) + "|"
    body = ["| " + line + " |" for line in text[2:]]
    return "\n".join([head, sep, *body])


def plot(report: dict[str, Any] | list[dict[str, Any]], path: str) -> None:
    """Latency CDF and delivered events/s over time, one line per server, one row per report
    (matplotlib, Agg backend)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reports = report if isinstance(report, list) else [report]
    fig, axes = plt.subplots(len(reports), 2, figsize=(12, 4.2 * len(reports)), squeeze=False)
    colors = {"ringcast": "tab:blue", "asyncio": "tab:orange", "redis": "tab:red"}
    for row, rep in zip(axes, reports, strict=True):
        ax1, ax2 = row
        shape = (
            f"{rep['streams']} streams x {rep['fanout']} readers, speed {rep['speed']}, "
            f"resume share {rep['resume_share']}"
        )
        for t in rep["targets"]:
            c = colors.get(t["name"])
            cdf = t["latency_cdf_ms"]
            if cdf:
                # The server's timers may fire a little early (libuv rounds to 1 ms), so a few
                # latencies are ~0: clip at 0.1 ms for the log axis.
                xs = [max(x, 0.1) for x, _ in cdf]
                ax1.plot(xs, [y for _, y in cdf], label=t["name"], color=c, lw=2)
            tl = t["timeline"]
            xs2 = [i * tl["bin_s"] for i in range(len(tl["events"]))]
            ys2 = [e / tl["bin_s"] for e in tl["events"]]
            ax2.plot(xs2, ys2, label=t["name"], color=c, lw=1.5)
        ax1.set_xscale("log")
        # Labels at the decades only (0.1, 1, 10 ms): labelled minor ticks ran together.
        ax1.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax1.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        lows = [t["latency_cdf_ms"][0][0] for t in rep["targets"] if t["latency_cdf_ms"]]
        ax1.set_xlim(left=max(0.1, min(lows, default=0.1) / 2))
        ax1.set_xlabel("latency: recorded emit time -> reader receipt (ms, log scale)")
        ax1.set_ylabel("fraction of events")
        ax1.set_ylim(0, 1.01)
        ax1.grid(True, which="both", alpha=0.3)
        ax1.legend(loc="lower right")
        ax1.set_title(f"latency CDF: {shape}", fontsize=10)
        ax2.set_xlabel("time since the first request (s)")
        ax2.set_ylabel("events delivered / s (all readers)")
        ax2.grid(True, alpha=0.3)
        ax2.legend(loc="upper right")
        ax2.set_title("delivered throughput", fontsize=10)
    names = sorted({t["name"] for rep in reports for t in rep["targets"]} - {"ringcast"})
    against = f" against {', '.join(names)}" if names else ""
    fig.suptitle(f"ringcast replay: ringcast{against}, every byte checked")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))  # room for the suptitle
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Driver


class _Progress:
    """A one-line progress bar on stderr when it is a terminal; silent otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()

    def show(self, name: str, load: _Load) -> None:
        if not self.enabled:
            return
        s = load.stats
        total = max(1, load.readers_total)
        frac = s.readers_done / total
        bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
        sys.stderr.write(
            f"\r{name:9s} [{bar}] {s.readers_done}/{total} readers  "
            f"{s.events} events  {s.resumes} resumes  {s.errors} errors "
        )
        sys.stderr.flush()

    def end(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _raise_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, need))
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


async def _run_target(
    name: str,
    opts: ReplayOptions,
    trace: Trace,
    exps: list[_Expect],
    order: list[int],
    workdir: str,
    progress: _Progress,
) -> dict[str, Any]:
    server: _Server | None = None
    if opts.url:
        url = opts.url
        await _wait_reachable(url, 3.0)
        pids: list[int] = []
    else:
        server = await _start_server(name, opts, workdir)
        url = server.url
        pids = server.pids()
    try:
        sampler = _ProcSampler(pids)
        sampler.sample()
        load = _Load(url, exps, order, opts, name)
        longest = max(exps[j].times[-1] for j in set(order)) * load.inv
        deadline = opts.timeout or (60.0 + 3 * (longest + opts.ramp))
        task = asyncio.ensure_future(load.run(trace, deadline))
        while not task.done():
            await asyncio.wait([task], timeout=0.25)
            sampler.sample()
            progress.show(name, load)
        wall = task.result()
        sampler.sample()
        progress.show(name, load)
        progress.end()
        emitted = sum(len(exps[j].ends) for j in order)
        return _target_report(name, url, load, wall, sampler.report(wall), emitted)
    finally:
        if server is not None:
            server.stop()


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """With ``--repeat``: the run with the median p99 latency, plus every run's key numbers."""
    if len(runs) == 1:
        return runs[0]
    ranked = sorted(runs, key=lambda t: t["latency_ms"]["p99"])
    chosen = dict(ranked[(len(ranked) - 1) // 2])
    chosen["runs"] = [
        {
            "events_per_s": t["events_per_s"],
            "latency_ms": t["latency_ms"],
            "server_cpu_us_per_event": t["server_cpu_us_per_event"],
            "events_lost": t["events_lost"],
            "errors": t["errors"],
            "mismatches": t["mismatches"],
        }
        for t in runs
    ]
    return chosen


async def run_replay(opts: ReplayOptions) -> dict[str, Any]:
    """Run the replay against ringcast (or ``opts.url``) and each ``opts.compare`` baseline."""
    trace = load_trace(opts.trace)
    playable = [i for i, s in enumerate(trace.streams) if s.events]
    n = opts.streams or len(playable)
    order = [playable[i % len(playable)] for i in range(n)]
    exps = []
    for s in trace.streams:
        body, ends = expected_body(s)
        exps.append(_Expect(body, ends, [e.t for e in s.events]))
    _raise_nofile(n * opts.fanout * 2 + 256)
    names = ["url" if opts.url else "ringcast", *opts.compare]
    progress = _Progress(opts.progress)
    runs: list[list[dict[str, Any]]] = []
    with tempfile.TemporaryDirectory(prefix="ringcast-replay-") as workdir:
        # Servers take turns within each round, so a busy spell on a shared machine is less
        # likely to land on one of them only.
        for _round in range(max(1, opts.repeat)):
            results = []
            for name in names:
                sub = ReplayOptions(**{**opts.__dict__, "url": None}) if name != "url" else opts
                results.append(await _run_target(name, sub, trace, exps, order, workdir, progress))
            runs.append(results)
    results = [_median_run([r[k] for r in runs]) for k in range(len(names))]
    report = {
        "command": " ".join(["ringcast", "replay", *sys.argv[2:]])
        if sys.argv[1:2] == ["replay"]
        else None,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "trace": str(opts.trace),
        "streams": n,
        "fanout": opts.fanout,
        "speed": "max" if math.isinf(opts.speed) else opts.speed,
        "resume_share": opts.resume_share,
        "http_procs": opts.http_procs,
        "cpus": os.cpu_count(),
        "repeat": len(runs),
        "targets": results,
    }
    if opts.json_out:
        Path(opts.json_out).write_bytes(msgspec.json.format(msgspec.json.encode(report)))
    if opts.png_out:
        plot(report, opts.png_out)
    return report


_REPLAY_DESCRIPTION = (
    "Replay S recorded streams through a server (started here, or --url) and attach R readers "
    "per stream over HTTP: the POST that starts a stream is reader 0, the rest GET "
    "/v1/stream?conv_id=..&from=0. Every reader's bytes are checked against the trace; the "
    "report gives delivered events/s and bytes/s, latency from recorded emit time to receipt "
    "(p50/p99/p99.9), resumes, offsets lost, errors, and CPU/RSS per process. With --url the "
    "server must replay the same trace at the same --speed."
)


def configure(ap: argparse.ArgumentParser) -> None:
    """Arguments of ``ringcast replay``."""
    ap.add_argument("trace", help="trace file (ringcast record / ringcast trace synth)")
    ap.add_argument("--fanout", type=int, default=10, help="readers per stream, R (default 10)")
    ap.add_argument(
        "--streams",
        type=int,
        default=None,
        help="streams to replay, S (default: every stream in the trace; cycles if more)",
    )
    ap.add_argument("--speed", default="1", help="pace: factor over recorded time, or 'max'")
    ap.add_argument(
        "--http-procs",
        type=http_procs_value,
        default="auto",
        help="HTTP processes of ringcast serve: auto (its default: one per CPU core the "
        "workers leave; see ringcast serve --help) or N (default: %(default)s)",
    )
    ap.add_argument(
        "--resume-share",
        type=float,
        default=0.0,
        metavar="P",
        help="chance (0-1) that each GET reader disconnects part-way and resumes with from=<bytes>",
    )
    ap.add_argument("--url", help="replay against this running server instead of starting one")
    ap.add_argument("--json", dest="json_out", help="write the full report as JSON here")
    ap.add_argument("--png", dest="png_out", help="write a figure here (latency CDF, throughput)")
    ap.add_argument(
        "--compare",
        default="",
        help="also run the replay through these baselines: asyncio, redis (comma-separated)",
    )
    ap.add_argument("--ramp", type=float, default=0.5, help="spread stream starts over N s")
    ap.add_argument("--seed", type=int, default=0, help="seed for the resume cut points")
    ap.add_argument(
        "--timeout", type=float, help="give up on a run after this many seconds (default: no limit)"
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run every server N times (taking turns); report each server's median-p99 run",
    )
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for 'ringcast serve', e.g. --serve-arg=--workers=2 (repeatable)",
    )


def check_requirements(compare: list[str], png_out: str | None) -> None:
    """What the options need beyond ringcast's own dependencies, checked before any run
    (a missing one used to surface after minutes of load test, losing the report):
    ``RuntimeError`` (:class:`~ringcast._extras.MissingExtra` for a package) naming it."""
    if png_out:
        require("matplotlib", "--png")
    if "redis" in compare:
        require("redis", "--compare redis")
    if compare:
        baselines_script()
    if "redis" in compare and shutil.which("redis-server") is None:
        raise RuntimeError(REDIS_SERVER_MISSING)


def run(args: argparse.Namespace) -> int:
    """``ringcast replay``: fan-out replay load test with byte-exact checks."""
    try:
        speed = parse_speed(args.speed)
        compare = [c.strip() for c in args.compare.split(",") if c.strip()]
        for c in compare:
            if c not in ("asyncio", "redis"):
                raise ValueError(f"--compare: unknown baseline {c!r} (choose asyncio, redis)")
        if args.fanout < 1 or args.repeat < 1 or (args.streams is not None and args.streams < 1):
            raise ValueError("--fanout, --streams and --repeat must be at least 1")
        if not 0 <= args.resume_share <= 1:
            raise ValueError(f"--resume-share must be within 0..1, got {args.resume_share}")
        if args.url:
            _http.parse_url(args.url)
        check_requirements(compare, args.png_out)
    except (ValueError, RuntimeError) as exc:
        print(f"ringcast replay: {exc}", file=sys.stderr)
        return 2
    opts = ReplayOptions(
        trace=args.trace,
        fanout=args.fanout,
        streams=args.streams,
        speed=speed,
        http_procs=args.http_procs,
        resume_share=args.resume_share,
        url=args.url,
        compare=compare,
        ramp=args.ramp,
        seed=args.seed,
        json_out=args.json_out,
        png_out=args.png_out,
        progress=not args.no_progress,
        server_args=args.serve_arg,
        timeout=args.timeout,
        repeat=args.repeat,
    )
    try:
        report = _run(opts)
    except TraceError as exc:
        print(f"ringcast replay: {exc}", file=sys.stderr)
        return 2
    except (ConnectionError, RuntimeError) as exc:
        print(f"ringcast replay: {exc}", file=sys.stderr)
        return 1
    print(format_table(report))
    for t in report["targets"]:
        procs = ", ".join(
            f"{p['role']} {p['cpu_s']:.1f}s/{p['rss_max_mb']:.0f}MB" for p in t["processes"]
        )
        print(f"  {t['name']}: CPU s / max RSS per process: {procs}")
        if "runs" in t:
            p99s = " / ".join(f"{r['latency_ms']['p99']:.0f}" for r in t["runs"])
            bad = sum(r["errors"] + r["mismatches"] + r["events_lost"] for r in t["runs"])
            print(f"  {t['name']}: p99 ms of each run: {p99s}; errors+mismatches+lost: {bad}")
    bad = any(t["errors"] or t["mismatches"] for t in report["targets"])
    return 1 if bad else 0


def register(p: argparse.ArgumentParser) -> None:
    """``ringcast replay`` (see ``ringcast.cli``)."""
    p.description = _REPLAY_DESCRIPTION
    p.epilog = (
        "example (make a trace first, then replay it):\n"
        "  ringcast trace synth --streams 100 --out trace.jsonl\n"
        "  ringcast replay trace.jsonl --fanout 10 --streams 100 --json out.json --png out.png\n"
        "From a source checkout, a recorded trace (bench/sample-trace.jsonl) and the baselines\n"
        "of --compare asyncio,redis (bench/baselines.py) are there too."
    )
    configure(p)
    p.set_defaults(func=run)


def _run(opts: ReplayOptions) -> dict[str, Any]:
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency
        runner = asyncio.run
    with contextlib.suppress(KeyboardInterrupt):
        result: dict[str, Any] = runner(run_replay(opts))
        return result
    raise SystemExit(130)
