"""Stream traces: record real SSE streams with their timing, synthesize realistic ones, load them.

A trace is JSON Lines (spec: ``docs/REPLAY.md``). Line 1 is a :class:`TraceHeader` naming the
format and its version; every further line is one :class:`Stream`: the request that was sent,
the response status and headers, the time to first byte, and every SSE event's exact text with
the time (seconds since the request was sent) at which its last byte arrived.

>>> from ringcast.trace import SynthParams, synthesize
>>> trace = synthesize(SynthParams(streams=2, seed=1))
>>> trace.streams[0].events[-1].data
'data: [DONE]\\n\\n'
>>> trace.streams[0].body() == b"".join(e.data.encode() for e in trace.streams[0].events)
True
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import math
import os
import random
import string
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import msgspec

from ringcast import _http
from ringcast._core import RingcastError

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "Event",
    "Stream",
    "SynthParams",
    "Trace",
    "TraceError",
    "TraceHeader",
    "load_trace",
    "record",
    "register",
    "split_events",
    "synthesize",
    "write_trace",
]

FORMAT_NAME = "ringcast-trace"
FORMAT_VERSION = 1


class TraceError(RingcastError, ValueError):
    """A trace file is missing, truncated, of another format or version, or malformed."""


class TraceHeader(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """First line of a trace file."""

    format: str
    version: int
    source: Literal["record", "synth"]
    streams: int
    """How many stream lines follow; fewer means the file was cut short."""
    created: float = 0.0
    """Unix time the trace was written."""
    upstream: str | None = None
    params: dict[str, Any] = {}
    """How it was made: synthesis parameters, or record options."""


class Event(msgspec.Struct, array_like=True):
    """One SSE event: ``[t, data]`` on the wire."""

    t: float
    """Seconds from sending the request to the arrival of the event's last byte."""
    data: str
    """The event's exact text including its terminating blank line (base64 of the bytes when
    the stream's ``encoding`` is ``"base64"``)."""


class Stream(msgspec.Struct, kw_only=True):
    """One recorded (or synthesized) streaming response."""

    index: int
    method: str = "POST"
    path: str = "/v1/chat/completions"
    request: Any = None
    """The JSON request body that was sent."""
    status: int = 200
    headers: list[str] = []
    """Response header lines, ``"Name: value"``."""
    ttfb: float = 0.0
    """Seconds from sending the request to the first response byte."""
    duration: float = 0.0
    """Seconds from sending the request to the end of the response."""
    encoding: Literal["utf-8", "base64"] = "utf-8"
    events: list[Event] = []
    error: str | None = None
    """Set when the request failed (connection refused, cut short, ...)."""

    def event_bytes(self) -> list[bytes]:
        if self.encoding == "base64":
            return [base64.b64decode(e.data) for e in self.events]
        return [e.data.encode() for e in self.events]

    def body(self) -> bytes:
        """The response body byte for byte: every event joined."""
        return b"".join(self.event_bytes())


class Trace(msgspec.Struct):
    header: TraceHeader
    streams: list[Stream]


_encoder = msgspec.json.Encoder()
_header_decoder = msgspec.json.Decoder(TraceHeader)
_stream_decoder = msgspec.json.Decoder(Stream)


def _fail(path: str | os.PathLike[str], line: int, what: str) -> TraceError:
    return TraceError(f"{path}:{line}: {what}")


def iter_trace(path: str | os.PathLike[str]) -> tuple[TraceHeader, Iterator[Stream]]:
    """Open a trace: the checked header, and an iterator of its streams (checked as read).

    Every problem raises :class:`TraceError` with ``file:line`` first.
    """
    try:
        fh = open(path, "rb")  # closed by the generator below
    except OSError as exc:
        raise TraceError(f"cannot open trace {str(path)!r}: {exc.strerror}") from None
    first = fh.readline()
    if not first:
        fh.close()
        raise _fail(path, 1, "empty file: expected a ringcast-trace header line")
    try:
        raw = msgspec.json.decode(first)
    except msgspec.DecodeError as exc:
        fh.close()
        raise _fail(path, 1, f"header is not valid JSON ({exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        fh.close()
        got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise _fail(path, 1, f"not a {FORMAT_NAME} file (format={got!r})")
    if raw.get("version") != FORMAT_VERSION:
        fh.close()
        raise _fail(
            path,
            1,
            f"trace format version {raw.get('version')!r} is not supported "
            f"(this ringcast reads version {FORMAT_VERSION}); re-record or convert it",
        )
    try:
        header = _header_decoder.decode(first)
    except msgspec.ValidationError as exc:
        fh.close()
        raise _fail(path, 1, f"bad header: {exc}") from None

    def streams() -> Iterator[Stream]:
        with fh:
            lineno = 1
            count = 0
            for line in fh:
                lineno += 1
                if not line.strip():
                    continue
                if not line.endswith(b"\n"):
                    # The writer ends every line; a missing newline means a cut-short file.
                    try:
                        _stream_decoder.decode(line)
                    except msgspec.DecodeError:
                        raise _fail(path, lineno, "truncated line (file cut short?)") from None
                try:
                    s = _stream_decoder.decode(line)
                except msgspec.ValidationError as exc:
                    raise _fail(path, lineno, f"bad stream record: {exc}") from None
                except msgspec.DecodeError as exc:
                    raise _fail(path, lineno, f"not valid JSON ({exc})") from None
                if s.encoding == "base64":
                    for e in s.events:
                        try:
                            base64.b64decode(e.data, validate=True)
                        except ValueError:
                            raise _fail(path, lineno, "event data is not valid base64") from None
                count += 1
                yield s
            if count != header.streams:
                raise _fail(
                    path,
                    lineno + 1,
                    f"truncated trace: header announces {header.streams} streams, found {count}",
                )

    return header, streams()


def load_trace(path: str | os.PathLike[str], *, require_events: bool = True) -> Trace:
    """Read and check a whole trace. ``require_events``: at least one stream with events."""
    header, it = iter_trace(path)
    streams = list(it)
    if require_events and not any(s.events for s in streams):
        raise TraceError(f"{path}: no stream in this trace has any events to replay")
    return Trace(header, streams)


def write_trace(path: str | os.PathLike[str], trace: Trace) -> None:
    """Write a trace atomically (a temporary file renamed into place)."""
    header = msgspec.structs.replace(trace.header, streams=len(trace.streams))
    tmp = Path(f"{path}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(_encoder.encode(header) + b"\n")
        for s in trace.streams:
            fh.write(_encoder.encode(s) + b"\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# SSE splitting


def split_events(buf: bytearray) -> Iterator[bytes]:
    """Pop every complete SSE event (ending in a blank line) from the front of ``buf``."""
    while True:
        a = buf.find(b"\n\n")
        b = buf.find(b"\r\n\r\n")
        if a < 0 and b < 0:
            return
        end = a + 2 if b < 0 or (0 <= a < b) else b + 4
        event = bytes(buf[:end])
        del buf[:end]
        yield event


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


# --------------------------------------------------------------------------------------------
# Recording


def upstream_path(url: str) -> tuple[str, str]:
    """``(base_url, path)`` for an OpenAI-style base URL: ``http://h:p`` and ``.../v1`` both
    map to ``/v1/chat/completions``; a URL that already names a route is used as it is."""
    target = _http.parse_url(url)
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
            async for now, st, hd, piece in _http.stream(url, path, headers=hdrs, body=payload):
                if not status:
                    status = st
                    ttfb = now - t0
                    resp_headers = [f"{k}: {v}" for k, v in hd]
                if piece:
                    buf += piece
                    events.extend((now - t0, e) for e in split_events(buf))
    except (OSError, _http.HTTPError, TimeoutError) as exc:
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
# Synthesis

# Defaults measured on the llama-server capture in shared/data/llama-server (8 chat streams,
# ~50 tokens/s on CPU): time to first token 48-103 ms (median ~81 ms); inter-token gaps
# lognormal with median 19.8 ms and log-sd 0.10; 46-145 tokens; content events 235-250 bytes.


class SynthParams(msgspec.Struct, kw_only=True):
    streams: int = 100
    ttft_ms: float = 80.0
    """Median time to first token (lognormal)."""
    ttft_sigma: float = 0.25
    """Log-space standard deviation of the time to first token."""
    itl_ms: float = 19.8
    """Median gap between tokens (lognormal)."""
    itl_sigma: float = 0.10
    tokens_min: int = 40
    tokens_max: int = 150
    """Completion length, uniform in [tokens_min, tokens_max]."""
    model: str = "synthetic"
    usage: bool = False
    """Add a usage chunk before ``[DONE]`` (``stream_options.include_usage``)."""
    seed: int = 0


_PIECES = (
    " the",
    " a",
    " of",
    " and",
    " to",
    " in",
    " is",
    " light",
    "house",
    " keeper",
    " storm",
    " wave",
    " night",
    " lamp",
    " ship",
    " rock",
    " sea",
    ",",
    ".",
    " she",
    " he",
    " it",
    " was",
    " watched",
    " through",
    " every",
    " cold",
    " bright",
    " beam",
    " har",
    "bour",
    " synchron",
    "ized",
    " hash",
    " map",
    " bucket",
    " key",
    " value",
    " futex",
    " kernel",
)
_ID_CHARS = string.ascii_letters + string.digits


def _chunk(cid: str, created: int, model: str, choices: str, extra: str = "") -> str:
    return (
        f'data: {{"choices":[{choices}],"created":{created},"id":"{cid}","model":"{model}",'
        f'"system_fingerprint":"b1-ringcast","object":"chat.completion.chunk"{extra}}}\n\n'
    )


def _content(text: str) -> str:
    return msgspec.json.encode(text).decode()


def synth_stream(index: int, p: SynthParams, rng: random.Random, created: int) -> Stream:
    cid = "chatcmpl-" + "".join(rng.choice(_ID_CHARS) for _ in range(32))
    n = rng.randint(p.tokens_min, p.tokens_max)
    prompt_n = rng.randint(12, 48)
    ttft = rng.lognormvariate(math.log(p.ttft_ms / 1000), p.ttft_sigma)
    model = p.model
    # llama-server sends the role chunk and the first token in one write, at the first token.
    events = [
        Event(
            ttft,
            _chunk(
                cid,
                created,
                model,
                '{"finish_reason":null,"index":0,"delta":{"role":"assistant","content":null}}',
            ),
        )
    ]
    t = ttft
    for k in range(n):
        if k:
            t += rng.lognormvariate(math.log(p.itl_ms / 1000), p.itl_sigma)
        text = _content(rng.choice(_PIECES))
        events.append(
            Event(
                t,
                _chunk(
                    cid,
                    created + int(t),
                    model,
                    f'{{"finish_reason":null,"index":0,"delta":{{"content":{text}}}}}',
                ),
            )
        )
    t_end = t + 0.0004
    predicted_ms = (t - ttft) * 1000
    timings = (
        f',"timings":{{"cache_n":0,"prompt_n":{prompt_n},"prompt_ms":{ttft * 1000:.3f},'
        f'"prompt_per_token_ms":{ttft * 1000 / prompt_n:.6f},'
        f'"prompt_per_second":{prompt_n / ttft:.6f},"predicted_n":{n},'
        f'"predicted_ms":{predicted_ms:.3f},'
        f'"predicted_per_token_ms":{predicted_ms / n:.6f},'
        f'"predicted_per_second":{n * 1000 / max(predicted_ms, 1e-3):.6f}}}'
    )
    final = '{"finish_reason":"length","index":0,"delta":{}}'
    created_end = created + int(t_end)
    if p.usage:
        events.append(Event(t_end, _chunk(cid, created_end, model, final)))
        usage = (
            f',"usage":{{"completion_tokens":{n},"prompt_tokens":{prompt_n},'
            f'"total_tokens":{n + prompt_n}}}'
        )
        events.append(Event(t_end, _chunk(cid, created_end, model, "", usage + timings)))
    else:
        events.append(Event(t_end, _chunk(cid, created_end, model, final, timings)))
    events.append(Event(t_end + 0.00005, "data: [DONE]\n\n"))
    request = {
        "model": model,
        "stream": True,
        "max_tokens": n,
        "messages": [{"role": "user", "content": f"synthetic request {index}"}],
    }
    return Stream(
        index=index,
        request=request,
        status=200,
        headers=["Content-Type: text/event-stream"],
        ttfb=ttft,
        duration=t_end + 0.00005,
        events=events,
    )


def synthesize(p: SynthParams) -> Trace:
    """A trace of ``p.streams`` chat completion streams with lognormal timing."""
    if p.streams < 1 or p.tokens_min < 1 or p.tokens_max < p.tokens_min:
        raise ValueError(f"bad synthesis parameters: {p}")
    if p.ttft_ms <= 0 or p.itl_ms <= 0 or p.ttft_sigma < 0 or p.itl_sigma < 0:
        raise ValueError(f"times must be positive and sigmas non-negative: {p}")
    rng = random.Random(p.seed)
    created = 1_795_000_000 + p.seed
    streams = [synth_stream(i, p, rng, created + i) for i in range(p.streams)]
    header = TraceHeader(
        format=FORMAT_NAME,
        version=FORMAT_VERSION,
        source="synth",
        streams=len(streams),
        created=time.time(),
        params=msgspec.structs.asdict(p),
    )
    return Trace(header, streams)


def stream_summary(streams: Iterable[Stream]) -> dict[str, float]:
    """Counts and medians of a trace, for ``ringcast trace info``."""
    ss = [s for s in streams if s.events]
    ttft = sorted(s.events[0].t for s in ss)
    gaps = sorted(b.t - a.t for s in ss for a, b in itertools.pairwise(s.events[1:-2]))
    nbytes = sum(len(b) for s in ss for b in s.event_bytes())
    nevents = sum(len(s.events) for s in ss)

    def med(xs: list[float]) -> float:
        return xs[len(xs) // 2] if xs else 0.0

    return {
        "streams": len(ss),
        "events": nevents,
        "bytes": nbytes,
        "ttft_median_ms": med(ttft) * 1000,
        "gap_median_ms": med(gaps) * 1000,
        "duration_max_s": max((s.events[-1].t for s in ss), default=0.0),
    }


# --------------------------------------------------------------------------------------------
# Command line: ``ringcast record`` and ``ringcast trace ...``


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
_SYNTH_DESCRIPTION = (
    "Write a trace of chat.completion.chunk streams shaped like llama-server's, with "
    "lognormal time to first token and inter-token gaps (defaults measured on a real "
    "llama-server capture: ~80 ms TTFT, ~20 ms between tokens, 40-150 tokens). For machines "
    "with no model."
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
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per request")


def run_record(args: argparse.Namespace) -> int:
    """``ringcast record``: capture streams from an OpenAI-compatible server into a trace."""
    try:
        headers = _parse_header_arg(args.header)
        if args.api_key:
            headers.setdefault("Authorization", f"Bearer {args.api_key}")
        requests = read_requests(args.requests)
        _http.parse_url(args.upstream)
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


def configure_trace(ap: argparse.ArgumentParser) -> None:
    """Arguments of ``ringcast trace synth|info``."""
    d = SynthParams()
    sub = ap.add_subparsers(dest="trace_cmd", required=True, metavar="<synth|info>")
    sp = sub.add_parser(
        "synth",
        help="write a synthetic trace with realistic timing",
        description=_SYNTH_DESCRIPTION,
        epilog="example: ringcast trace synth --streams 100 --out trace.jsonl",
    )
    sp.add_argument("--streams", type=int, required=True, help="number of streams")
    sp.add_argument("--out", required=True, help="trace file to write")
    sp.add_argument(
        "--ttft-ms", type=float, default=d.ttft_ms, help="median TTFT, ms (%(default)s)"
    )
    sp.add_argument(
        "--ttft-sigma", type=float, default=d.ttft_sigma, help="log-sd of TTFT (%(default)s)"
    )
    sp.add_argument(
        "--itl-ms", type=float, default=d.itl_ms, help="median inter-token gap, ms (%(default)s)"
    )
    sp.add_argument(
        "--itl-sigma", type=float, default=d.itl_sigma, help="log-sd of the gap (%(default)s)"
    )
    sp.add_argument("--tokens-min", type=int, default=d.tokens_min, help="fewest tokens")
    sp.add_argument("--tokens-max", type=int, default=d.tokens_max, help="most tokens")
    sp.add_argument("--model", default=d.model, help="model name in the chunks")
    sp.add_argument("--usage", action="store_true", help="add a usage chunk before [DONE]")
    sp.add_argument("--seed", type=int, default=d.seed, help="random seed (%(default)s)")
    sp.set_defaults(func=run_trace_synth)
    ip = sub.add_parser(
        "info",
        help="check a trace and print its summary",
        description="Validate a trace file and print counts and median timings as JSON. A "
        "missing, truncated, corrupt or wrong-version file exits with status 2 and names "
        "the line.",
    )
    ip.add_argument("trace", help="trace file")
    ip.set_defaults(func=run_trace_info)


def run_trace_info(args: argparse.Namespace) -> int:
    try:
        tr = load_trace(args.trace, require_events=False)
    except TraceError as exc:
        print(f"ringcast trace info: {exc}", file=sys.stderr)
        return 2
    info: dict[str, Any] = {
        "format": tr.header.format,
        "version": tr.header.version,
        "source": tr.header.source,
        **stream_summary(tr.streams),
        "failed": sum(1 for s in tr.streams if s.error or s.status != 200),
    }
    print(msgspec.json.encode(info).decode())
    return 0


def run_trace_synth(args: argparse.Namespace) -> int:
    try:
        params = SynthParams(
            streams=args.streams,
            ttft_ms=args.ttft_ms,
            ttft_sigma=args.ttft_sigma,
            itl_ms=args.itl_ms,
            itl_sigma=args.itl_sigma,
            tokens_min=args.tokens_min,
            tokens_max=args.tokens_max,
            model=args.model,
            usage=args.usage,
            seed=args.seed,
        )
        trace = synthesize(params)
    except ValueError as exc:
        print(f"ringcast trace synth: {exc}", file=sys.stderr)
        return 2
    write_trace(args.out, trace)
    s = stream_summary(trace.streams)
    print(
        f"wrote {args.out}: {s['streams']} streams, {s['events']} events, {s['bytes']} bytes",
        file=sys.stderr,
    )
    return 0


def register(subparsers: Any) -> None:
    """Add ``record`` and ``trace`` to the ``ringcast`` command line (see ``ringcast.cli``)."""
    p = subparsers.add_parser(
        "record",
        help="record streams from an OpenAI-compatible server into a trace",
        description=_RECORD_DESCRIPTION,
        epilog="example: ringcast record --upstream http://127.0.0.1:8080/v1 "
        "--requests prompts.jsonl --out trace.jsonl",
    )
    configure_record(p)
    p.set_defaults(func=run_record)
    t = subparsers.add_parser(
        "trace",
        help="make a synthetic trace, or check one",
        description="Make and inspect stream traces (format: docs/REPLAY.md).",
    )
    configure_trace(t)
