"""The worker's upstream proxy, client side: what reading one streamed completion costs with
ringcast's own HTTP/1.1 reader against httpx and aiohttp.

A server process (this file with ``--serve``) answers each POST with ``--events`` SSE events of
a llama-server-sized chat chunk (~250 bytes), one HTTP chunk each, as fast as the socket takes
them. The client process reads ``--streams`` such responses one after the other with each
client, splits the body into events (``ringcast.wire.sse.split_events``, as the proxy does) and
reports events/s and its own CPU microseconds per event (the worker's cost; the server's is
the same for every client). Clients take turns within each of ``--repeat`` rounds.

    python bench/upstream_client.py --events 20000 --streams 5 --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

from ringcast.http.client import stream
from ringcast.wire.sse import split_events

EVENT = (
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":" lighthouse"}}],'
    b'"created":1795000000,"id":"chatcmpl-0123456789abcdef0123456789abcdef","model":"bench",'
    b'"system_fingerprint":"b1-ringcast","object":"chat.completion.chunk"}\n\n'
)
BODY = b'{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}'


async def serve(events: int) -> None:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            head = await r.readuntil(b"\r\n\r\n")
            m = re.search(rb"(?i)content-length: *(\d+)", head)
            await r.readexactly(int(m.group(1)) if m else 0)
            w.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            )
            chunk = b"%x\r\n%s\r\n" % (len(EVENT), EVENT)
            for i in range(events):
                w.write(chunk)
                if i % 64 == 63:
                    await w.drain()
            done = b"data: [DONE]\n\n"
            w.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
            await w.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(f"listening on {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


async def read_ringcast(url: str) -> int:
    buf, n = bytearray(), 0
    async for _, _, _, piece in stream(url, "/v1/chat/completions", body=BODY):
        buf += piece
        n += sum(1 for _ in split_events(buf))
    return n


CLOSERS: list[Callable[[], Awaitable[None]]] = []


def make_httpx() -> Callable[[str], Awaitable[int]]:
    import httpx

    client = httpx.AsyncClient(timeout=None)
    CLOSERS.append(client.aclose)

    async def read(url: str) -> int:
        buf, n = bytearray(), 0
        async with client.stream("POST", url + "/v1/chat/completions", content=BODY) as r:
            async for piece in r.aiter_raw():
                buf += piece
                n += sum(1 for _ in split_events(buf))
        return n

    return read


def make_aiohttp() -> Callable[[str], Awaitable[int]]:
    import aiohttp

    session: aiohttp.ClientSession | None = None

    async def read(url: str) -> int:
        nonlocal session
        if session is None:
            session = aiohttp.ClientSession()
            CLOSERS.append(session.close)
        buf, n = bytearray(), 0
        async with session.post(url + "/v1/chat/completions", data=BODY) as r:
            async for piece in r.content.iter_any():
                buf += piece
                n += sum(1 for _ in split_events(buf))
        return n

    return read


async def measure(args: argparse.Namespace, url: str) -> None:
    clients: dict[str, Callable[[str], Awaitable[int]]] = {"ringcast": read_ringcast}
    for name, make in (("httpx", make_httpx), ("aiohttp", make_aiohttp)):
        try:
            clients[name] = make()
        except ImportError:
            print(f"({name} is not installed: skipped; pip install {name})")
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in clients}
    for _ in range(args.repeat):
        for name, read in clients.items():
            t0, c0 = time.perf_counter(), time.process_time()
            n = 0
            for _ in range(args.streams):
                n += await read(url)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            assert n == args.streams * (args.events + 1), (name, n)
            results[name].append((n / wall, cpu * 1e6 / n))
    for close in CLOSERS:
        await close()
    print(f"{args.streams} streams x {args.events} events, median of {args.repeat} rounds")
    print(f"{'client':10s} {'events/s':>10s} {'CPU us/event':>13s}")
    for name, runs in results.items():
        rate = statistics.median(r for r, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        print(f"{name:10s} {rate:10.0f} {cpu:13.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--streams", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    import uvloop

    if args.serve:
        uvloop.run(serve(args.events))
        return
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--events", str(args.events)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline().split()[-1])
        uvloop.run(measure(args, f"http://127.0.0.1:{port}"))
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
