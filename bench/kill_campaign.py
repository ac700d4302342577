"""kill -9 campaign: random processes of a live ``ringcast serve`` killed at random points
while clients stream, every client resumed to the end, and its bytes checked.

Each round starts a few streaming clients (``POST /v1/chat/completions`` with a conversation
id), waits a random time, and kills one process of a kind drawn at random (a worker, an HTTP
process, or the manager, which takes its children with it; a new manager then re-attaches the
segment). Every client reads until its stream's terminal event (``data: [DONE]`` or an error
event), resuming from its byte count with ``GET /v1/stream?...&from=N`` whenever its
connection drops, through whichever server is up (or sending its request again if the resume
finds no stream: the kill cut the request before the server created it). Then the bytes it
got are compared with the whole stream read from offset 0: they must be identical.

Measured (not asserted): for each kill and each stream it cut short, the time from the kill
to the client's terminal event (a worker or manager kill ends running streams with an
in-band error event) or, for an HTTP process kill, to the first byte of the resumed read.

    python bench/kill_campaign.py --rounds 200            # the full campaign (~6 min)
    python bench/kill_campaign.py --rounds 9 --seed 1     # what the test runs

Results of a full run are in bench/RESULTS.md ("kill -9 campaign").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import statistics
import time
from dataclasses import dataclass, field

from ringcast.http.client import HTTPError, stream
from serve_process import ServeProcess

KINDS = ("worker", "http", "manager")
TERMINAL = re.compile(rb"data: (\[DONE\]|\{\"error\")[^\n]*\n\n$")
"""The last event of a stream that ended: ``[DONE]`` or an error event."""


@dataclass
class Client:
    conv: str
    body: bytearray = field(default_factory=bytearray)
    reads: int = 0
    unsent: bool = True
    """No stream of this id exists yet: the first request, or one whose connection was cut
    before the server created the stream (a resume then answers 404)."""
    ended_at: float = 0.0
    resumed_at: list[float] = field(default_factory=list)


async def follow(server: ServeProcess, client: Client, tokens: int, deadline: float) -> None:
    """Read ``client``'s stream to its terminal event, resuming after every drop."""
    req = json.dumps(
        {
            "messages": [{"role": "user", "content": client.conv}],
            "max_tokens": tokens,
            "stream": True,
        }
    ).encode()
    while time.monotonic() < deadline:
        if client.unsent:
            client.unsent = False
            path, method, body = "/v1/chat/completions", "POST", req
            headers = {"X-Conversation-Id": client.conv, "Content-Type": "application/json"}
        else:
            path, method, body = (
                f"/v1/stream?conv_id={client.conv}&from={len(client.body)}",
                "GET",
                None,
            )
            headers = {}
        client.reads += 1
        first = True
        try:
            async for _, status, _, piece in stream(
                server.url, path, method=method, headers=headers, body=body, connect_timeout=2
            ):
                if status == 404 and method == "GET" and not client.body:
                    client.unsent = True  # cut before the stream existed: send it again
                    break
                if status != 200:
                    raise RuntimeError(f"{client.conv}: {method} answered {status}")
                if piece and first and client.reads > 1:
                    client.resumed_at.append(time.monotonic())
                first = first and not piece
                client.body += piece
        except (OSError, asyncio.IncompleteReadError, ConnectionError, HTTPError):
            pass  # HTTPError: the client's parser, on a connection cut mid-chunk
        if TERMINAL.search(client.body):
            client.ended_at = time.monotonic()
            return
        await asyncio.sleep(0.05)  # the server is restarting a process
    raise RuntimeError(f"{client.conv}: no terminal event before the deadline")


async def whole_stream(server: ServeProcess, conv: str) -> bytes:
    """The stream read from offset 0, again from 0 if the connection drops (an HTTP process
    killed in this round may still be going, or restarting)."""
    for _ in range(20):
        out = bytearray()
        try:
            async for _, status, _, piece in stream(
                server.url, f"/v1/stream?conv_id={conv}", method="GET", connect_timeout=2
            ):
                if status != 200:
                    raise RuntimeError(f"{conv}: a read from 0 answered {status}")
                out += piece
        except (OSError, asyncio.IncompleteReadError, ConnectionError, HTTPError):
            await asyncio.sleep(0.1)
            continue
        return bytes(out)
    raise RuntimeError(f"{conv}: no whole read from 0 in 20 attempts")


@dataclass
class Kill:
    kind: str
    at: float
    """Seconds after the round's clients started."""
    to_terminal: list[float]
    """Per stream that the kill cut short: seconds from the kill to the client's terminal
    event (worker, manager) or to the first byte of its resumed read (HTTP process)."""


async def campaign(rounds: int, seed: int, clients: int, tokens: int, tps: float) -> list[Kill]:
    rng = random.Random(seed)
    server = ServeProcess("--http-procs", "2", "--workers", "2", "--tokens-per-s", str(tps))
    kills: list[Kill] = []
    mismatches: list[str] = []
    try:
        for r in range(rounds):
            kind = KINDS[r % len(KINDS)] if r < len(KINDS) else rng.choice(KINDS)
            cs = [Client(f"k{r}-{i}") for i in range(clients)]
            started = time.monotonic()
            deadline = started + 60
            tasks = [asyncio.create_task(follow(server, c, tokens, deadline)) for c in cs]
            at = rng.uniform(0.0, tokens / tps)
            await asyncio.sleep(at)
            pids = server.pids(kind)
            if not pids:  # restarting right now: take the next kind that is up
                kind = next(k for k in KINDS if server.pids(k))
                pids = server.pids(kind)
            killed_at = time.monotonic()
            os.kill(rng.choice(pids), signal.SIGKILL)
            if kind == "manager":
                await asyncio.get_running_loop().run_in_executor(
                    None, server.restart_after_manager_kill
                )
            await asyncio.gather(*tasks)
            cut = [c for c in cs if c.ended_at > killed_at]
            if kind == "http":
                times = [
                    next(t for t in c.resumed_at if t > killed_at) - killed_at
                    for c in cs
                    if any(t > killed_at for t in c.resumed_at)
                ]
            else:
                times = [c.ended_at - killed_at for c in cut if c.reads >= 1]
            kills.append(Kill(kind, killed_at - started, times))
            for c in cs:
                whole = await whole_stream(server, c.conv)
                if whole != bytes(c.body):
                    mismatches.append(f"round {r} ({kind}): {c.conv} differs from its stream")
    finally:
        server.stop()
    if mismatches:
        raise AssertionError("; ".join(mismatches))
    return kills


def summary(kills: list[Kill]) -> str:
    lines = []
    for kind in KINDS:
        ts = sorted(t for k in kills if k.kind == kind for t in k.to_terminal)
        n = sum(1 for k in kills if k.kind == kind)
        if not ts:
            lines.append(f"{kind:8} kills {n:4}  (no stream cut short)")
            continue
        q = statistics.quantiles(ts, n=100, method="inclusive") if len(ts) > 1 else [ts[0]] * 99
        lines.append(
            f"{kind:8} kills {n:4}  streams cut {len(ts):4}  kill -> "
            f"{'first resumed byte' if kind == 'http' else 'terminal event'}: "
            f"p50 {q[49] * 1000:.0f} ms  p90 {q[89] * 1000:.0f} ms  p99 {q[98] * 1000:.0f} ms  "
            f"max {ts[-1] * 1000:.0f} ms  over 1 s: {sum(t > 1.0 for t in ts)}"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=200, help="kills (%(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clients", type=int, default=4, help="streams per round (%(default)s)")
    ap.add_argument("--tokens", type=int, default=60, help="tokens per stream (%(default)s)")
    ap.add_argument("--tokens-per-s", type=float, default=100.0, help="(%(default)s)")
    args = ap.parse_args()
    t0 = time.monotonic()
    kills = asyncio.run(
        campaign(args.rounds, args.seed, args.clients, args.tokens, args.tokens_per_s)
    )
    print(
        f"{len(kills)} kills in {time.monotonic() - t0:.0f} s; every resumed client's bytes "
        "equal its stream's"
    )
    print(summary(kills))


if __name__ == "__main__":
    main()
