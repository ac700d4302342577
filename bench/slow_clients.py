"""Clients that hold connections and do nothing useful, against a live ``ringcast serve``:
what they cost (resident memory of the server's processes) and whether everyone else is
still served (``/health`` latency, a new stream's time to ``[DONE]``).

Two crowds, each from many loopback addresses (127.0.0.2 and up, as distinct clients would
be; one address would meet the per-client connection cap):

- **non-reading**: each opens ``GET /v1/stream`` on a long running stream, with a small
  receive buffer, and never reads: the server's write buffers fill and its fan-out must leave
  them behind;
- **slowloris**: each sends a request head one byte at a time, a byte per second, never
  finishing it.

Phases: baseline, with the non-reading crowd, with both crowds. In each, ``/health`` is timed
``--probes`` times and one short stream is run to its end.

    python bench/slow_clients.py                       # 1,000 of each (~1 min)
    python bench/slow_clients.py --clients 300 --hold 3

Results in bench/RESULTS.md ("Idle and slowloris clients").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import statistics
import time
from dataclasses import dataclass

from ringcast.http.client import stream
from serve_process import ServeProcess

ADDRESSES = 64
"""Loopback source addresses the crowds are spread over (127.0.0.2 ...)."""


def source(i: int) -> str:
    return f"127.0.0.{2 + i % ADDRESSES}"


async def connect(port: int, i: int, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((source(i), 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


async def non_reader(port: int, i: int, conv: str) -> socket.socket:
    sock = await connect(port, i, rcvbuf=4096)
    req = f"GET /v1/stream?conv_id={conv} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    await asyncio.get_running_loop().sock_sendall(sock, req)
    return sock


async def slowloris(port: int, i: int, stop: asyncio.Event) -> None:
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 4096
    try:
        sock = await connect(port, i)
    except OSError:
        return
    loop = asyncio.get_running_loop()
    try:
        for b in head:
            await loop.sock_sendall(sock, bytes([b]))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            if stop.is_set():
                return
    except OSError:
        pass  # closed by the server (its idle close)
    finally:
        sock.close()


async def timed_health(url: str) -> float:
    t0 = time.perf_counter()
    async for _, status, _, _ in stream(url, "/health", method="GET"):
        if status != 200:
            raise RuntimeError(f"/health answered {status}")
    return time.perf_counter() - t0


async def short_stream(url: str, conv: str) -> tuple[float, bytes]:
    body = b'{"messages":[{"role":"user","content":"hi"}],"max_tokens":20,"stream":true}'
    t0 = time.perf_counter()
    out = bytearray()
    async for _, status, _, piece in stream(
        url,
        "/v1/chat/completions",
        headers={"X-Conversation-Id": conv, "Content-Type": "application/json"},
        body=body,
    ):
        if status != 200:
            raise RuntimeError(f"a stream answered {status}")
        out += piece
    return time.perf_counter() - t0, bytes(out)


@dataclass
class Phase:
    name: str
    rss: int
    health: list[float]
    stream_s: float
    stream_ok: bool


async def measure(server: ServeProcess, name: str, probes: int, n: int) -> Phase:
    health = []
    for _ in range(probes):
        health.append(await timed_health(server.url))
        await asyncio.sleep(0.02)
    took, body = await short_stream(server.url, f"probe-{n}")
    return Phase(name, server.rss(), health, took, body.endswith(b"data: [DONE]\n\n"))


async def run(server: ServeProcess, clients: int, hold: float, probes: int) -> list[Phase]:
    phases = [await measure(server, "baseline", probes, 0)]
    # A long stream for the non-readers to fall behind on.
    long_body = (
        b'{"messages":[{"role":"user","content":"long"}],"max_tokens":1000000,"stream":true}'
    )
    feeder = asyncio.create_task(_drain(server.url, long_body))
    await asyncio.sleep(0.5)
    held = [await non_reader(server.port, i, "long") for i in range(clients)]
    await asyncio.sleep(hold)
    phases.append(await measure(server, f"{clients} non-reading", probes, 1))
    stop = asyncio.Event()
    loris = [asyncio.create_task(slowloris(server.port, i, stop)) for i in range(clients)]
    await asyncio.sleep(hold)
    phases.append(await measure(server, f"+ {clients} slowloris", probes, 2))
    stop.set()
    await asyncio.gather(*loris)
    for s in held:
        s.close()
    feeder.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await feeder
    return phases


async def _drain(url: str, body: bytes) -> None:
    async for _ in stream(
        url,
        "/v1/chat/completions",
        headers={"X-Conversation-Id": "long", "Content-Type": "application/json"},
        body=body,
    ):
        pass


def table(phases: list[Phase]) -> str:
    lines = [
        "| phase | server RSS (MiB) | /health p50 (ms) | /health max (ms) | 20-token stream (ms) |",
        "|---|---|---|---|---|",
    ]
    for p in phases:
        lines.append(
            f"| {p.name} | {p.rss / 2**20:.0f} | {statistics.median(p.health) * 1000:.1f} | "
            f"{max(p.health) * 1000:.1f} | {p.stream_s * 1000:.0f}"
            f"{'' if p.stream_ok else ' (no [DONE])'} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--clients", type=int, default=1000, help="of each kind (%(default)s)")
    ap.add_argument(
        "--hold", type=float, default=5.0, help="seconds before measuring (%(default)s)"
    )
    ap.add_argument("--probes", type=int, default=50, help="/health requests per phase")
    ap.add_argument("--http-procs", type=int, default=2)
    args = ap.parse_args()
    server = ServeProcess("--http-procs", str(args.http_procs), "--tokens-per-s", "200")
    try:
        phases = asyncio.run(run(server, args.clients, args.hold, args.probes))
    finally:
        server.stop()
    print(table(phases))


if __name__ == "__main__":
    main()
