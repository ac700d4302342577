"""``ringcast record``: send requests to an OpenAI-compatible server and store every SSE
event's exact bytes with its arrival time in a trace (format: :mod:`ringcast.trace`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Literal

import msgspec

from ringcast.http import client
from ringcast.replay.synth import stream_summary
from ringcast.trace import (
    FORMAT_NAME,
    FORMAT_VERSION,
    Event,
    Stream,
    Trace,
    TraceError,
    TraceHeader,
    write_trace,
)
from ringcast.wire.sse import split_events

__all__ = ["read_requests", "record", "register", "upstream_path"]


def _make_stream(
    index: int, request: Any, path: str, events: list[tuple[float, bytes]], **kw: Any
) -> Stream:
    try:
        evs = [Event(t, d.decode()) for t, d in events]
        encoding: Literal["utf-8", "base64"] = "utf-8"
    except UnicodeDecodeError:
        evs = [Event(t, base64.b64encode(d).decode()) for t, d in events]
        encoding = "base64"
    return Stream(index=index, request=request, path=path, events=evs, encoding=encoding, **kw)


def upstream_path(url: str) -> tuple[str, str]:
    """``(base_url, path)`` for an OpenAI-style base URL: ``http://h:p`` and ``.../v1`` both
    map to ``/v1/chat/completions``; a URL that already names a route is used as it is."""
    target = client.parse_url(url)
    base = target.origin
    p = target.path
    if p.endswith("/completions"):
        return base, p
    if p.endswith("/v1"):
        return base, p + "/chat/completions"
    return base, p + "/v1/chat/completions"


def read_requests(path: str | os.PathLike[str]) -> list[Any]:
    """A JSON Lines file of request bodies (``stream`` is forced on); blank lines skipped."""
    try:
        lines = Path(path).read_bytes().splitlines()
    except OSError as exc:
        raise TraceError(f"cannot read requests {str(path)!r}: {exc.strerror}") from None
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            body = msgspec.json.decode(line)
        except msgspec.DecodeError as exc:
            raise TraceError(f"{path}:{i}: request is not valid JSON ({exc})") from None
        if not isinstance(body, dict):
            raise TraceError(f"{path}:{i}: a request line must be a JSON object")
        body["stream"] = True
        out.append(body)
    if not out:
        raise TraceError(f"{path}: no requests in file")
    return out


async def record_one(
    index: int, url: str, path: str, body: Any, headers: dict[str, str], timeout: float
) -> Stream:
    payload = msgspec.json.encode(body)
    hdrs = {"Content-Type": "application/json", "Accept": "text/event-stream", **headers}
    events: list[tuple[float, bytes]] = []
    buf = bytearray()
    status = 0
    resp_headers: list[str] = []
    ttfb = 0.0
    t0 = time.perf_counter()
    error = None
    try:
        async with asyncio.timeout(timeout):
            async for now, st, hd, piece in client.stream(url, path, headers=hdrs, body=payload):
                if not status:
                    status = st
                    ttfb = now - t0
                    resp_headers = [f"{k}: {v}" for k, v in hd]
                if piece:
                    buf += piece
                    events.extend((now - t0, e) for e in split_events(buf))
    except (OSError, client.HTTPError, TimeoutError) as exc:
        error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    end = time.perf_counter() - t0
    if buf:  # bytes after the last blank line: keep them, so the body stays exact
        events.append((end, bytes(buf)))
    return _make_stream(
        index,
        body,
        path,
        events,
        status=status,
        headers=resp_headers,
        ttfb=ttfb,
        duration=end,
        error=error,
    )


async def record(
    upstream: str,
    requests: list[Any],
    out: str | os.PathLike[str],
    *,
    headers: dict[str, str] | None = None,
    concurrency: int = 1,
    timeout: float = 300.0,
    progress: bool = True,
) -> Trace:
    """Send every request (streaming) to ``upstream`` and write the trace to ``out``."""
    base, path = upstream_path(upstream)
    sem = asyncio.Semaphore(max(1, concurrency))
    done = 0

    async def one(i: int, body: Any) -> Stream:
        nonlocal done
        async with sem:
            s = await record_one(i, base, path, body, headers or {}, timeout)
        done += 1
        if progress and sys.stderr.isatty():
            sys.stderr.write(f"\rrecorded {done}/{len(requests)}")
            sys.stderr.flush()
        return s

    streams = await asyncio.gather(*(one(i, b) for i, b in enumerate(requests)))
    if progress and sys.stderr.isatty():
        sys.stderr.write("\n")
    header = TraceHeader(
        format=FORMAT_NAME,
        version=FORMAT_VERSION,
        source="record",
        streams=len(streams),
        created=time.time(),
        upstream=base + path,
        params={"concurrency": concurrency},
    )
    trace = Trace(header, list(streams))
    write_trace(out, trace)
    return trace


# --------------------------------------------------------------------------------------------
# Command line


def _parse_header_arg(values: list[str]) -> dict[str, str]:
    out = {}
    for v in values:
        name, sep, value = v.partition(":")
        if not sep or not name.strip():
            raise SystemExit(f"ringcast record: --header expects 'Name: value', got {v!r}")
        out[name.strip()] = value.strip()
    return out


_RECORD_DESCRIPTION = (
    "Send each request of a JSON Lines file (one chat/completions body a line; 'stream' is "
    "forced to true) to an OpenAI-compatible server and store every SSE event's exact bytes "
    "with its arrival time in a trace (format: docs/REPLAY.md). Replay it with "
    "'ringcast serve --replay' or 'ringcast replay'."
)


def configure_record(ap: argparse.ArgumentParser) -> None:
    """Arguments of ``ringcast record``."""
    ap.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:8080/v1")
    ap.add_argument("--requests", required=True, help="JSON Lines file of request bodies")
    ap.add_argument("--out", required=True, help="trace file to write")
    ap.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="extra request header (repeatable)",
    )
    ap.add_argument(
        "--api-key",
        default=os.environ.get("OPENAI_API_KEY"),
        help="sent as 'Authorization: Bearer KEY' (default: $OPENAI_API_KEY)",
    )
    ap.add_argument("--concurrency", type=int, default=1, help="requests in flight (default 1)")
    ap.add_argument(
        "--timeout", type=float, default=300.0, help="seconds per request (default 300)"
    )


def run_record(args: argparse.Namespace) -> int:
    """``ringcast record``: capture streams from an OpenAI-compatible server into a trace."""
    try:
        if args.concurrency < 1:
            raise ValueError(f"--concurrency must be at least 1 (got {args.concurrency})")
        if not 0 < args.timeout < math.inf:  # also NaN
            raise ValueError(f"--timeout must be a number of seconds > 0 (got {args.timeout})")
        headers = _parse_header_arg(args.header)
        if args.api_key:
            headers.setdefault("Authorization", f"Bearer {args.api_key}")
        requests = read_requests(args.requests)
        client.parse_url(args.upstream)
    except (TraceError, ValueError) as exc:
        print(f"ringcast record: {exc}", file=sys.stderr)
        return 2
    trace = asyncio.run(
        record(
            args.upstream,
            requests,
            args.out,
            headers=headers,
            concurrency=args.concurrency,
            timeout=args.timeout,
        )
    )
    failed = [s for s in trace.streams if s.error or s.status != 200]
    summary = stream_summary(trace.streams)
    print(
        f"wrote {args.out}: {len(trace.streams)} streams, {summary['events']} events, "
        f"{summary['bytes']} bytes, median TTFT {summary['ttft_median_ms']:.1f} ms"
        + (f"; {len(failed)} failed" if failed else ""),
        file=sys.stderr,
    )
    for s in failed[:5]:
        print(f"  request {s.index}: status {s.status} {s.error or ''}", file=sys.stderr)
    return 1 if len(failed) == len(trace.streams) else 0


def register(p: argparse.ArgumentParser) -> None:
    """``ringcast record`` (see ``ringcast.cli``)."""
    p.description = _RECORD_DESCRIPTION
    p.epilog = (
        "example: ringcast record --upstream http://127.0.0.1:8080/v1 "
        "--requests prompts.jsonl --out trace.jsonl"
    )
    configure_record(p)
    p.set_defaults(func=run_record)
