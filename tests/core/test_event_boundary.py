"""``ringcast.reader_at_event``: after ``OffsetLost``, resume at the next event boundary
instead of in the middle of an event."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import ringcast

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def seg(tmp_path: Path) -> Iterator[ringcast.Segment]:
    s = ringcast.Segment.create(str(tmp_path / "seg"), max_sessions=4, session_bytes=4096)
    yield s
    s.unlink()


def events(n: int, size: int = 90) -> list[bytes]:
    """SSE events of varied lengths, framed as the server frames them."""
    out, total = [], 0
    for i in range(n):
        data = b"data: " + b"x" * (size + (i * 7) % 40) + b"\n\n"
        ev = b"id: %d\n" % (total + len(data) + 20) + data
        out.append(ev)
        total += len(ev)
    return out


def test_an_available_offset_is_served_as_it_is(seg: ringcast.Segment) -> None:
    w = seg.create_or_replace("c")
    w.write(b"data: a\n\ndata: b\n\n")
    w.finalize()
    assert ringcast.reader_at_event(seg, "c", 2).read() == b"ta: a\n\ndata: b\n\n"


def test_after_offset_lost_it_starts_at_the_next_boundary(seg: ringcast.Segment) -> None:
    w = seg.create_or_replace("c")
    evs = events(200)
    stream = b"".join(evs)
    for ev in evs:
        w.write(ev)
    w.finalize()
    with pytest.raises(ringcast.OffsetLost) as lost:
        seg.reader("c", offset=0)
    front = lost.value.first_available
    r = ringcast.reader_at_event(seg, "c", 0)
    start = r.offset
    # The first boundary at or after the front: just after a "\n\n", none in between.
    assert front <= start and stream[start - 2 : start] == b"\n\n"
    assert b"\n\n" not in stream[front : start - 1]
    rest = b""
    while data := r.read(timeout=1.0):
        rest += data
    assert rest == stream[start:] and rest.startswith(b"id: ")


def test_a_stream_that_ended_without_a_boundary_gives_a_reader_at_its_end(
    seg: ringcast.Segment,
) -> None:
    w = seg.create_or_replace("c")
    w.write(b"data: " + b"y" * 9000)  # one event, longer than the ring, never ended
    w.finalize()
    r = ringcast.reader_at_event(seg, "c", 0)
    assert r.offset == 9006 and r.read(timeout=1.0) == b""


def test_it_waits_for_a_boundary_that_is_still_being_written(seg: ringcast.Segment) -> None:
    w = seg.create_or_replace("c")
    w.write(b"data: " + b"z" * 5000)  # the front is mid-event, no boundary yet
    with pytest.raises(TimeoutError):
        ringcast.reader_at_event(seg, "c", 0, timeout=0.05)
    later = threading.Timer(0.1, lambda: w.write(b"\n\ndata: next\n\n"))
    later.start()
    r = ringcast.reader_at_event(seg, "c", 0, timeout=30)
    later.join()
    assert r.read(timeout=1.0) == b"data: next\n\n"
    w.finalize()


def test_unknown_sessions_raise_as_reader_does(seg: ringcast.Segment) -> None:
    with pytest.raises(ringcast.SessionNotFound):
        ringcast.reader_at_event(seg, "nope", 0)
