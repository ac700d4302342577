"""Resuming a reader after ``OffsetLost`` at the next event boundary.

When a reader's offset was dropped from the front of the ring, the first byte still held
(``OffsetLost.first_available``) is usually in the middle of an SSE event, and a client fed
from there would see half an event. :func:`reader_at_event` attaches at the first event
boundary the ring still holds instead: the byte after the first blank line (``\\n\\n``) at or
after ``first_available``.
"""

from __future__ import annotations

import time

from ringcast._core import OffsetLost, Reader, Segment

EVENT_END = b"\n\n"


def reader_at_event(
    segment: Segment,
    conversation_id: str,
    offset: int = 0,
    owner: str = "",
    *,
    timeout: float | None = None,
) -> Reader:
    """A reader at ``offset`` if the ring still holds it; else at the first event boundary
    after the first byte it holds.

    The event that starts at ``first_available`` may be whole, but nothing tells its start
    from a middle, so it is skipped too: the reader starts after the first ``\\n\\n`` found
    (the ringcast server frames every event so, ``id:`` line first). If the front moves on
    while looking, it looks again from the new front. Waits up to ``timeout`` seconds
    (``None``: no limit) for a boundary when the ring holds only part of an event;
    ``TimeoutError`` then. A stream that ended without a boundary after ``first_available``
    gives a reader at its end. ``SessionNotFound`` and ``SessionEnded`` as
    :meth:`Segment.reader` and :meth:`Reader.read` raise them.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            return segment.reader(conversation_id, offset=offset, owner=owner)
        except OffsetLost as lost:
            front = lost.first_available
        try:
            offset = _next_boundary(segment, conversation_id, owner, front, deadline)
        except OffsetLost:
            offset = 0  # the front moved on while scanning: start over from the new one


def _next_boundary(
    segment: Segment, conversation_id: str, owner: str, start: int, deadline: float | None
) -> int:
    """The offset just after the first ``\\n\\n`` at or after ``start`` (the end of the
    stream if it ended without one)."""
    probe = segment.reader(conversation_id, offset=start, owner=owner, counted=False)
    try:
        pos, tail = start, b""
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            data = probe.read(timeout=wait)
            if not data:
                if probe.at_end:
                    return probe.offset
                raise TimeoutError(
                    f"no event boundary arrived after offset {start} of {conversation_id!r} "
                    "within the timeout"
                )
            window = tail + data
            found = window.find(EVENT_END)
            if found >= 0:
                return pos - len(tail) + found + len(EVENT_END)
            pos += len(data)
            tail = data[-1:]
    finally:
        probe.close()
