"""What the core tests need at import time, in this module rather than in ``conftest.py``:

- the bodies of child processes (started with ``multiprocess``'s spawn context, which imports
  them by module name, and by ``python -c`` scripts with this directory on ``PYTHONPATH``),
  and the byte pattern they and the tests check;
- ``scaled``, which parametrize decorators call (a fixture cannot serve a decorator).

Each child body opens the segment itself: nothing mapped by the parent is inherited. Results
go back through queues as plain tuples; an unexpected exception is reported as
``("error", repr)`` rather than lost.

``RINGCAST_TEST_SCALE`` (a float, default 1.0) scales iteration counts and stream sizes: set it
below 1 on a loaded machine or under slow tools, above 1 for a soak run.
"""

from __future__ import annotations

import os
import random
import traceback
import uuid
from typing import Any

import ringcast

SCALE = float(os.environ.get("RINGCAST_TEST_SCALE", "1.0"))


def scaled(n: int, minimum: int = 1) -> int:
    """``n`` times the test scale, never below ``minimum``."""
    return max(minimum, int(n * SCALE))


def shm_path(tag: str = "t") -> str:
    """A fresh, unique segment path under /dev/shm (not created)."""
    return f"/dev/shm/ringcast-test-{tag}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


# A deterministic byte pattern: the byte at absolute offset i is PATTERN[i % PERIOD]. The period is
# prime so that it never lines up with a power-of-two ring: a reader handed bytes from the wrong
# lap of the ring (offset +/- k * session_bytes) sees a mismatch.
PERIOD = 1_000_003
_SEED = 20261129


def _make_pattern() -> bytes:
    import random

    # randbytes is deterministic for a seed within one interpreter version, and every process of
    # a test run uses the same interpreter.
    return random.Random(_SEED).randbytes(PERIOD)


_PATTERN_ONE = _make_pattern()
# Two periods back to back: any slice of length <= PERIOD starting anywhere is one bytes slice.
PATTERN = _PATTERN_ONE + _PATTERN_ONE


def pattern_at(offset: int, length: int) -> bytes:
    """The pattern bytes for absolute offsets ``[offset, offset + length)``."""
    out = bytearray()
    while length > 0:
        start = offset % PERIOD
        n = min(length, PERIOD)
        out += PATTERN[start : start + n]
        offset += n
        length -= n
    return bytes(out)


# Largest read whose expected bytes are one slice of the doubled pattern.
READ_CHUNK = 512 * 1024
# Slicing a memoryview does not copy; comparing it with bytes compares contents.
PATTERN_VIEW = memoryview(PATTERN)


def _report_errors(q: Any, tag: Any) -> Any:
    """Decorator-free helper: call inside ``except BaseException`` to ship the traceback."""
    q.put(("error", tag, traceback.format_exc()))


# --- fan-out ------------------------------------------------------------------------------


def fanout_producer(
    path: str, conv: str, total: int, seed: int, created: Any, start: Any, out: Any
) -> None:
    try:
        seg = ringcast.Segment.open(path)
        w = seg.create_or_replace(conv, "fan")
        created.set()
        start.wait()
        rng = random.Random(seed)
        off = 0
        while off < total:
            n = min(total - off, rng.choice((1, 7, 200, 4096, 65536, 300_000)))
            if not w.write(pattern_at(off, n)):
                out.put(("error", "producer", f"write refused at {off}"))
                return
            off += n
        w.finalize()
        out.put(("producer", off, w.total_bytes))
    except BaseException:
        _report_errors(out, "producer")


def fanout_reader(
    path: str, conv: str, idx: int, offset: int, allow_loss: bool, start: Any, out: Any
) -> None:
    """Read from ``offset`` to the end, checking every byte against the pattern.

    With ``allow_loss``, an ``OffsetLost`` moves the reader to ``first_available`` (and counts
    the skipped bytes); otherwise it is a failure.
    """
    try:
        seg = ringcast.Segment.open(path)
        reader = seg.reader(conv, offset, "fan")
        out.put(("attached", idx, reader.offset))
        start.wait()
        got = 0
        lost = 0
        losses = 0
        chunks = 0
        while True:
            try:
                data = reader.read(READ_CHUNK, timeout=None)
            except ringcast.OffsetLost as exc:
                if not allow_loss:
                    raise
                if exc.first_available <= exc.requested or exc.requested != reader.offset:
                    out.put(
                        (
                            "error",
                            idx,
                            f"bad OffsetLost {exc.requested=} "
                            f"{exc.first_available=} offset={reader.offset}",
                        )
                    )
                    return
                losses += 1
                lost += exc.first_available - exc.requested
                reader.close()
                reader = _attach_at_or_after(seg, conv, exc.first_available)
                lost += reader.offset - exc.first_available
                continue
            if not data:
                if reader.at_end:
                    break
                out.put(("error", idx, f"empty read without timeout at {reader.offset}"))
                return
            start_off = reader.offset - len(data)
            s = start_off % PERIOD
            if data != PATTERN_VIEW[s : s + len(data)]:
                out.put(("error", idx, f"content mismatch in [{start_off}, {reader.offset})"))
                return
            got += len(data)
            chunks += 1
        out.put(("reader", idx, offset, got, reader.offset, lost, losses, chunks))
    except BaseException:
        _report_errors(out, idx)


def _attach_at_or_after(seg: ringcast.Segment, conv: str, offset: int) -> ringcast.Reader:
    """Attach at ``offset``, or at the first available offset if that moved on meanwhile."""
    while True:
        try:
            return seg.reader(conv, offset, "fan")
        except ringcast.OffsetLost as exc:
            offset = exc.first_available


# --- concurrent replacement -----------------------------------------------------------------


def replace_racer(
    path: str, conv: str, idx: int, barrier: Any, check: Any, release: Any, out: Any
) -> None:
    try:
        seg = ringcast.Segment.open(path)
        barrier.wait()
        w = seg.create_or_replace(conv, "race")
        out.put(("created", idx, w.slot, w.generation))
        check.wait()
        out.put(("cancelled", idx, w.cancelled, w.write(b"x")))
        release.wait()
    except BaseException:
        _report_errors(out, idx)


# --- cancellation and ends ----------------------------------------------------------------


def wait_cancelled_child(path: str, conv: str, owner: str, out: Any) -> None:
    """Become producer of ``conv``, then block in ``wait_cancelled`` with no timeout."""
    try:
        seg = ringcast.Segment.open(path)
        w = seg.create_or_replace(conv, owner)
        w.write(b"data: before\n\n")
        out.put(("created", w.slot, w.generation))
        woke = w.wait_cancelled(None)
        out.put(("woke", woke, w.cancelled, w.write(b"after")))
    except BaseException:
        _report_errors(out, "waiter")


def blocked_reader_child(path: str, conv: str, owner: str, out: Any) -> None:
    """Attach at the current end and block in ``read`` until something happens."""
    try:
        seg = ringcast.Segment.open(path)
        info = seg.get(conv, owner)
        assert info is not None
        reader = seg.reader(conv, info.total_bytes, owner)
        out.put(("attached", reader.offset))
        try:
            data = reader.read(1024, timeout=None)
        except ringcast.SessionEnded as exc:
            out.put(("ended", exc.reason, reader.state()))
            return
        out.put(("data", data, reader.at_end))
    except BaseException:
        _report_errors(out, "reader")


def hold_readers_child(path: str, conv: str, owner: str, n: int, ready: Any, release: Any) -> None:
    seg = ringcast.Segment.open(path)
    readers = [seg.reader(conv, 0, owner) for _ in range(n)]
    ready.set()
    release.wait()
    for r in readers:
        r.close()


# --- kill -9 loops: each signals ``ready`` once mapped, then loops until killed ---------------


def loop_append(path: str, conv: str, ready: Any) -> None:
    seg = ringcast.Segment.open(path)
    w = seg.create_or_replace(conv, "crash")
    rng = random.Random()
    ready.set()
    while True:
        off = w.total_bytes
        n = rng.choice((1, 13, 200, 1000, 5000, 40_000))
        if not w.write(pattern_at(off, n)):
            return


def loop_create_or_replace(path: str, ready: Any) -> None:
    seg = ringcast.Segment.open(path)
    rng = random.Random()
    ready.set()
    k = 0
    while True:
        w = seg.create_or_replace(f"crash-cor-{rng.randrange(4)}", "crash")
        w.write(pattern_at(0, rng.randrange(1, 3000)))
        if k % 3 == 0:
            w.finalize()
        k += 1


def loop_evict(path: str, ready: Any) -> None:
    seg = ringcast.Segment.open(path)
    rng = random.Random()
    ready.set()
    k = 0
    while True:
        conv = f"crash-ev-{rng.randrange(4)}"
        w = seg.create_or_replace(conv, "crash")
        w.write(pattern_at(0, rng.randrange(1, 3000)))
        mode = k % 3
        if mode == 0:
            seg.evict(conv, "crash")
        elif mode == 1:
            seg.evict_and_cancel(conv, "crash")
        else:
            seg.evict_slot(w.slot, w.generation)
        k += 1


def loop_read(path: str, conv: str, ready: Any) -> None:
    seg = ringcast.Segment.open(path)
    rng = random.Random()
    ready.set()
    while True:
        info = seg.get(conv, "crash")
        if info is None:
            return
        try:
            r = seg.reader(conv, rng.randrange(info.first_available, info.total_bytes + 1), "crash")
        except ringcast.OffsetLost:
            continue
        while True:
            try:
                data = r.read(rng.choice((1, 100, 65536)), timeout=0.002)
            except ringcast.OffsetLost:
                break
            if not data:
                break
        if rng.random() < 0.5:
            r.close()


def take_over_racer(path: str, conv: str, idx: int, barrier: Any, out: Any) -> None:
    try:
        seg = ringcast.Segment.open(path)
        barrier.wait()
        w = seg.take_over_dead(conv, "crash")
        wrote = w.write(f"<{idx}>".encode()) if w is not None else None
        out.put(("took", idx, w is not None, wrote))
        # Stay alive until the parent has looked, so the winner still counts as a live producer.
        barrier.wait()
    except BaseException:
        _report_errors(out, idx)


def record(writer: int, seq: int, size: int) -> bytes:
    """A self-checking record: writer id, sequence, length, then bytes derived from them."""
    body = bytes((writer * 31 + seq * 7 + i) & 0xFF for i in range(size))
    return bytes([writer]) + seq.to_bytes(4, "little") + size.to_bytes(4, "little") + body


def concurrent_writer(
    path: str, conv: str, writer: int, generation: int | None, n: int, barrier: Any, out: Any
) -> None:
    """Writer 0 creates the session, the others adopt it; all append ``n`` records at once."""
    try:
        seg = ringcast.Segment.open(path)
        if generation is None:
            w = seg.create_or_replace(conv, "dual")
            out.put(("created", writer, w.generation))
        else:
            w = seg.adopt(conv, "dual", generation)
        barrier.wait()
        rng = random.Random(writer)
        accepted = 0
        for seq in range(n):
            if w.write(record(writer, seq, rng.choice((0, 1, 50, 700, 5000)))):
                accepted += 1
        out.put(("wrote", writer, accepted))
        barrier.wait()
    except BaseException:
        _report_errors(out, writer)


def loop_aread(path: str, conv: str, ready: Any) -> None:
    """Subscribed through this process's notifier, awaiting bytes on a uvloop loop."""
    import asyncio

    import uvloop

    seg = ringcast.Segment.open(path)

    async def main() -> None:
        rng = random.Random()
        while True:
            info = seg.get(conv, "crash")
            if info is None:
                return
            r = seg.reader(conv, info.total_bytes, "crash")
            if not ready.is_set():
                ready.set()
            try:
                await asyncio.wait_for(r.aread(rng.choice((1, 100, 65536))), 0.005)
            except (TimeoutError, ringcast.OffsetLost):
                pass
            r.close()

    uvloop.run(main())


def open_or_create_racer(path: str, idx: int, barrier: Any, out: Any) -> None:
    try:
        barrier.wait()
        seg = ringcast.Segment.open_or_create(path, max_sessions=8, session_bytes=64 * 1024)
        out.put(("opened", idx, seg.epoch))
    except ringcast.SegmentError as exc:
        out.put(("opened", idx, f"SegmentError: {exc}"))
    except BaseException:
        _report_errors(out, idx)


def churn_sessions(path: str, ready: Any, stop: Any) -> None:
    """Create and evict sessions whose id and owner carry the same number, until told to stop."""
    seg = ringcast.Segment.open(path)
    ready.set()
    k = 0
    while not stop.is_set():
        conv, owner = f"s{k}-" + "x" * (k % 200), f"o{k}"
        w = seg.create_or_replace(conv, owner)
        w.write(b"y" * (k % 50))
        if k % 3:
            w.finalize()
        seg.evict(f"s{k - 3}-" + "x" * ((k - 3) % 200), f"o{k - 3}")
        k += 1
