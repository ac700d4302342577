"""Durable Streams SSE fan-out: one stream, R readers tailing it with ``live=sse``, one writer
appending at a fixed rate; ringcast (``/ds``) against the Node reference server
(``@durable-streams/server``, installed by ``ci/setup.sh`` in ``ci/conformance``), in one run.

Each append is ``"<seq> <time.time_ns()>\\n"`` (``text/plain``); a reader takes every line of
every ``event: data`` and records producer-to-reader latency. The writer closes the stream
after the last append, which ends every SSE response. Reported per server: events delivered
per second (appends x readers, over the time from the first append to the last delivery),
latency p50/p99, and the CPU seconds of the server's processes (all of them) per delivered
event, and the ratios ringcast / Node. The client is one uvloop process (parsing with
``ringcast.http.client``), on the same cores as the servers.

The issue's benchmark (1,000 readers; recorded in bench/RESULTS.md):

    python bench/ds_sse_fanout.py --readers 1000 --events 500 --rate 50

(a model's pace, 50 tokens/s, to 1,000 tails: 50,000 deliveries/s offered; the writer waits
for each append's answer, so a server that cannot keep up also slows the appends, and
events/s is what it sustained).

Needs the reference server's packages (``bash ci/setup.sh``, or ``npm ci`` in
ci/conformance) and about ``readers + 100`` open files: the script raises its soft
open-file limit to the hard one (the servers it starts inherit it) and gives ringcast
``--max-conns-per-client`` for the readers, which all come from 127.0.0.1. Loopback only;
every loop is bounded by ``--events``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import uvloop
from ringcast.http.client import ResponseParser

REPO = Path(__file__).resolve().parent.parent
REFERENCE = REPO / "ci" / "conformance" / "reference-server.mjs"
LINE = re.compile(rb"^data: ?(\d+) (\d+)$", re.M)


class Stats:
    def __init__(self) -> None:
        self.latencies_ns: list[int] = []
        self.delivered = 0
        self.last_ns = 0


class SseReader(asyncio.Protocol):
    """One tailing reader: de-chunks, splits SSE events, times every appended line."""

    def __init__(self, req: bytes, stats: Stats, loop: asyncio.AbstractEventLoop) -> None:
        self.req = req
        self.stats = stats
        self.parser = ResponseParser()
        self.buf = b""
        self.head: asyncio.Future[None] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.req)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        now = time.time_ns()
        pieces = self.parser.feed(data)
        if self.parser.head_done and not self.head.done():
            if self.parser.status != 200:
                self.head.set_exception(RuntimeError(f"status {self.parser.status}"))
                return
            self.head.set_result(None)
        if pieces:
            complete, sep, self.buf = (self.buf + b"".join(pieces)).rpartition(b"\n\n")
            if sep:
                st = self.stats
                for _, ts in LINE.findall(complete):
                    st.latencies_ns.append(now - int(ts))
                    st.delivered += 1
                st.last_ns = now
                if b'"streamClosed":true' in complete and not self.done.done():
                    self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.head.done():
            self.head.set_exception(exc or ConnectionError("closed before the head"))
        if not self.done.done():
            self.done.set_result(None)


async def request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: str, body: bytes
) -> int:
    """One request on a kept-alive connection; its status."""
    writer.write(head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    p = ResponseParser()
    while not p.done:
        data = await reader.read(65536)
        if not data:
            raise ConnectionError("the server closed the writer's connection")
        p.feed(data)
        if (
            p.head_done
            and p.header("content-length") in (None, "0")
            and not p.header("transfer-encoding")
        ):
            break
    return p.status


async def run(
    port: int, prefix: str, args: argparse.Namespace, pids: list[int]
) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    path = f"{prefix}/v1/stream/bench-{os.getpid()}-{time.monotonic_ns()}"
    r, w = await asyncio.open_connection("127.0.0.1", port)
    host = f"Host: 127.0.0.1:{port}\r\n"
    status = await request(r, w, f"PUT {path} HTTP/1.1\r\n{host}Content-Type: text/plain\r\n", b"")
    assert status == 201, status
    stats = Stats()
    get = f"GET {path}?offset=now&live=sse HTTP/1.1\r\n{host}Connection: close\r\n\r\n".encode()
    readers: list[SseReader] = []
    for _ in range(args.readers):
        _, proto = await loop.create_connection(
            lambda: SseReader(get, stats, loop), "127.0.0.1", port
        )
        readers.append(proto)
    await asyncio.gather(*(p.head for p in readers))
    await asyncio.sleep(0.5)  # every reader's first control event is out
    procs = [psutil.Process(pid) for pid in pids]
    cpu0 = sum(sum(p.cpu_times()[:2]) for p in procs)
    me0 = sum(psutil.Process().cpu_times()[:2])
    start = time.time_ns()
    post = f"POST {path} HTTP/1.1\r\n{host}Content-Type: text/plain\r\n"
    for seq in range(args.events):
        due = start + int(seq * 1e9 / args.rate)
        delay = (due - time.time_ns()) / 1e9
        if delay > 0:
            await asyncio.sleep(delay)
        status = await request(r, w, post, f"{seq} {time.time_ns()}\n".encode())
        assert status in (200, 204), status
    status = await request(r, w, f"POST {path} HTTP/1.1\r\n{host}Stream-Closed: true\r\n", b"")
    assert status == 204, status
    # A server that cannot keep up still gets to finish (bounded); the line then shows what
    # was delivered of what was expected.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(
            asyncio.gather(*(p.done for p in readers)), 120 + 4 * args.events / args.rate
        )
    cpu = sum(sum(p.cpu_times()[:2]) for p in procs) - cpu0
    me = sum(psutil.Process().cpu_times()[:2]) - me0
    w.close()
    for p in readers:
        if p.transport is not None:
            p.transport.close()
    lat = sorted(stats.latencies_ns)
    secs = (stats.last_ns - start) / 1e9
    return {
        "delivered": stats.delivered,
        "expected": args.events * args.readers,
        "events_per_s": stats.delivered / secs,
        "p50_ms": lat[len(lat) // 2] / 1e6,
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] / 1e6,
        "server_cpu_s": cpu,
        "cpu_us_per_event": cpu / stats.delivered * 1e6,
        "client_cpu_s": me,
    }


def start(
    system: str, args: argparse.Namespace, tmp: str
) -> tuple[subprocess.Popen[str], int, str]:
    if system == "ringcast":
        cmd = [
            sys.executable, "-m", "ringcast.cli", "serve", "--port", "0",
            "--http-procs", str(args.http_procs), "--workers", "1",
            "--segment", os.path.join(tmp, "seg"), "--max-sessions", "64",
            # Every reader comes from 127.0.0.1: one client, as far as the server can tell.
            "--max-conns-per-client", str(args.readers + 16),
        ]  # fmt: skip
        prefix = "/ds"
    else:
        cmd = ["node", str(REFERENCE), "0"]
        prefix = ""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=tmp)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    m = re.search(r"listening on http://[^:]+:(\d+)", line)
    if m is None:
        proc.kill()
        raise RuntimeError(f"{system} did not start: {line!r}")
    return proc, int(m.group(1)), prefix


def raise_open_files(need: int) -> None:
    """The soft open-file limit up to the hard one (inherited by the servers started)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(hard, max(need, soft))
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = new
    if soft != resource.RLIM_INFINITY and soft < need:
        sys.exit(
            f"ds_sse_fanout: {need} open files needed, the hard limit is {hard}; raise it "
            "(ulimit -Hn, or LimitNOFILE) or use fewer --readers"
        )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="The issue's benchmark: python bench/ds_sse_fanout.py --readers 1000 "
        "--events 500 --rate 50 (the defaults; see bench/RESULTS.md)",
    )
    ap.add_argument("--readers", type=int, default=1000, help="SSE tails (%(default)s)")
    ap.add_argument("--events", type=int, default=500, help="appends (%(default)s)")
    ap.add_argument("--rate", type=float, default=50.0, help="appends per second (%(default)s)")
    ap.add_argument("--http-procs", type=int, default=1, help="ringcast's (default %(default)s)")
    ap.add_argument("--systems", default="ringcast,node", help="which, in order (%(default)s)")
    args = ap.parse_args()
    raise_open_files(args.readers * 2 + 256)  # each reader: a client and a server socket
    print(
        f"# {args.readers} SSE readers, {args.events} appends at {args.rate:g}/s, "
        f"ringcast --http-procs {args.http_procs}, load {os.getloadavg()[0]:.1f}"
    )
    print(
        "system    delivered/expected  events/s   p50 ms   p99 ms  server CPU s  CPU us/event"
        "  client CPU s"
    )
    results: dict[str, dict[str, float]] = {}
    for system in args.systems.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            proc, port, prefix = start(system, args, tmp)
            try:
                pids = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(True)]
                res = uvloop.run(run(port, prefix, args, pids))
            finally:
                proc.terminate()
                proc.wait(30)
                if proc.stdout is not None:
                    proc.stdout.close()
        print(
            f"{system:9s} {res['delivered']:>9.0f}/{res['expected']:<9.0f} "
            f"{res['events_per_s']:9.0f} {res['p50_ms']:8.1f} {res['p99_ms']:8.1f} "
            f"{res['server_cpu_s']:12.2f} {res['cpu_us_per_event']:13.2f} "
            f"{res['client_cpu_s']:13.2f}",
            flush=True,
        )
        results[system] = res
    if {"ringcast", "node"} <= results.keys():
        rc, nd = results["ringcast"], results["node"]
        print(
            f"ringcast/node: events/s x{rc['events_per_s'] / nd['events_per_s']:.2f}, "
            f"p99 x{rc['p99_ms'] / nd['p99_ms']:.2f}, "
            f"CPU per event x{rc['cpu_us_per_event'] / nd['cpu_us_per_event']:.2f}"
        )


if __name__ == "__main__":
    main()
