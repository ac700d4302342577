"""Stream traces: the file format (record and synth write it, ``ringcast serve --replay`` and
``ringcast replay`` read it), and the player that answers requests with recorded streams.

A trace is JSON Lines (spec: ``docs/REPLAY.md``). Line 1 is a :class:`TraceHeader` naming the
format and its version; every further line is one :class:`Stream`: the request that was sent,
the response status and headers, the time to first byte, and every SSE event's exact text with
the time (seconds since the request was sent) at which its last byte arrived.

The player (:class:`ReplaySource`) answers a completion request with one recorded stream,
event by event at the recorded pace (or ``speed`` times faster, or as fast as possible). Which
stream: the request's ``replay_stream`` field if it has one (an index into the trace), else
the recorded stream whose request body has the same messages/prompt, else the next one in
turn.

This module sits below both the server (whose workers replay with
:func:`replay_generator`) and the ``ringcast.replay`` tools (record, synth, the load tester),
so neither imports the other.

>>> from ringcast.replay.synth import SynthParams, synthesize
>>> trace = synthesize(SynthParams(streams=2, seed=1))
>>> trace.streams[0].events[-1].data
'data: [DONE]\\n\\n'
>>> trace.streams[0].body() == b"".join(e.data.encode() for e in trace.streams[0].events)
True
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import math
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Literal

import msgspec

from ringcast._core import RingcastError
from ringcast.wire.sse import frame_event, strip_id_lines

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "Event",
    "ReplaySource",
    "Stream",
    "Trace",
    "TraceError",
    "TraceHeader",
    "check_trace",
    "expected_body",
    "iter_trace",
    "load_trace",
    "parse_speed",
    "replay_events",
    "replay_generator",
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
# Playing a trace


def parse_speed(text: str | float | None) -> float:
    """``"max"`` (or 0) = no pacing, as ``math.inf``; else a positive factor (``2`` = twice
    as fast as recorded)."""
    if text is None:
        return 1.0
    if isinstance(text, str) and text.strip().lower() in ("max", "inf", "0"):
        return math.inf
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"--speed must be a positive number or 'max', got {text!r}") from None
    if v == 0:
        return math.inf
    if not v > 0:
        raise ValueError(f"--speed must be a positive number or 'max', got {text!r}")
    return v


_replay_body = msgspec.json.Decoder(dict[str, Any])


class ReplaySource:
    """Answers requests with recorded streams, at recorded pace divided by ``speed``.

    ``events(body)`` is an async iterator of SSE event bytes (exact recorded bytes, unframed);
    ``iter_events(body)`` is the same for threaded producers (it sleeps with ``time.sleep``).
    """

    def __init__(self, trace: Trace | str | os.PathLike[str], speed: float | str = 1.0) -> None:
        self.trace = trace if isinstance(trace, Trace) else load_trace(trace)
        self.speed = parse_speed(speed) if isinstance(speed, str) else float(speed)
        if not self.speed > 0:
            raise ValueError(f"speed must be positive, got {speed!r}")
        self._playable = [s for s in self.trace.streams if s.events]
        self._by_key: dict[bytes, Stream] = {}
        for s in self._playable:
            key = self._key(s.request)
            if key is not None:
                self._by_key.setdefault(key, s)
        self._turn = itertools.count()

    @staticmethod
    def _key(body: Any) -> bytes | None:
        if not isinstance(body, dict):
            return None
        what = body.get("messages", body.get("prompt"))
        return None if what is None else msgspec.json.encode(what)

    def pick(self, body: bytes | dict[str, Any] | None) -> Stream:
        """The recorded stream that answers this request body."""
        req: Any = body
        if isinstance(body, (bytes, bytearray, memoryview)):
            try:
                req = _replay_body.decode(body)
            except msgspec.DecodeError:
                req = None
        if isinstance(req, dict):
            idx = req.get("replay_stream")
            if isinstance(idx, int) and not isinstance(idx, bool):
                streams = self.trace.streams
                s = streams[idx % len(streams)]
                if s.events:
                    return s
            key = self._key(req)
            if key is not None and key in self._by_key:
                return self._by_key[key]
        return self._playable[next(self._turn) % len(self._playable)]

    def schedule(self, body: bytes | dict[str, Any] | None) -> list[tuple[float, bytes]]:
        """``(seconds after start, event bytes)`` for the stream that answers ``body``."""
        s = self.pick(body)
        inv = 0.0 if math.isinf(self.speed) else 1.0 / self.speed
        return [(e.t * inv, b) for e, b in zip(s.events, replay_events(s), strict=True)]

    async def events(self, body: bytes | dict[str, Any] | None) -> AsyncIterator[bytes]:
        """Yield the recorded events at their recorded times (relative to this call)."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i, (at, data) in enumerate(self.schedule(body)):
            delay = start + at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif i % 16 == 15:
                # Behind (or --speed max): let the loop serve others now and then; a stream
                # that never suspends holds up every client of its process (with --workers 0,
                # the HTTP process's own) until it ends.
                await asyncio.sleep(0)
            yield data

    def iter_events(
        self, body: bytes | dict[str, Any] | None, cancelled: Any = None
    ) -> Iterator[bytes]:
        """Blocking version of :meth:`events`; ``cancelled()`` is polled between events."""
        start = time.monotonic()
        for at, data in self.schedule(body):
            delay = start + at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if cancelled is not None and cancelled():
                return
            yield data


def check_trace(path: str) -> str | None:
    """Load a trace once up front (``ringcast serve --replay``): the error message, or None."""
    try:
        load_trace(path)
    except TraceError as exc:
        return str(exc)
    return None


def replay_generator(trace: str | os.PathLike[str], speed: float | str = 1.0) -> Any:
    """A generator for ``ringcast serve``'s plug-in API (``ringcast.server.plugin``) that answers
    every request with a recorded stream. It yields whole recorded SSE events (``bytes``), and
    is marked ``ringcast_raw_stream`` so the worker adds no role chunk, final chunk or
    ``[DONE]`` of its own: readers get exactly the recorded events, each framed with its
    ``id:`` line."""
    if speed == 0:
        speed = math.inf
    source = ReplaySource(trace, speed)

    async def generate(ctx: Any) -> AsyncIterator[bytes]:
        async for event in source.events(ctx.body):
            yield event

    generate.ringcast_raw_stream = True  # type: ignore[attr-defined]
    generate.source = source  # type: ignore[attr-defined]
    return generate


def generate(ctx: Any) -> AsyncIterator[bytes]:
    """``--generator ringcast.replay:generate``: replay ``$RINGCAST_REPLAY`` at
    ``$RINGCAST_REPLAY_SPEED`` (default 1) through the plain plug-in API."""
    global _env_generator
    if _env_generator is None:
        path = os.environ.get("RINGCAST_REPLAY")
        if not path:
            raise RuntimeError("ringcast.replay:generate needs $RINGCAST_REPLAY (a trace file)")
        _env_generator = replay_generator(path, os.environ.get("RINGCAST_REPLAY_SPEED", "1"))
    result: AsyncIterator[bytes] = _env_generator(ctx)
    return result


generate.ringcast_raw_stream = True  # type: ignore[attr-defined]
_env_generator: Any = None


def replay_events(stream: Stream) -> list[bytes]:
    """The events a replay sends: recorded bytes less any ``id:`` lines (ringcast frames
    every event with its own, as the upstream proxy does)."""
    return [strip_id_lines(b) for b in stream.event_bytes()]


def expected_body(stream: Stream) -> tuple[bytes, list[int]]:
    """What a ringcast-protocol server sends for this stream: every event framed with its
    ``id: <offset>`` line. Returns the body and the end offset of each event in it."""
    out = bytearray()
    ends = []
    for ev in replay_events(stream):
        out += frame_event(len(out), ev)
        ends.append(len(out))
    return bytes(out), ends
