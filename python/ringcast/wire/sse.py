"""SSE framing: part of the wire contract.

Every event a producer appends to a ring is ``id: <offset just after this event>\\n``
followed by the event text, so ``Last-Event-ID`` and a client's own byte count name the same
resume point.

>>> frame_event(0, b"data: x\\n\\n")
b'id: 15\\ndata: x\\n\\n'
>>> len(frame_event(0, b"data: x\\n\\n"))
15
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from ringcast.wire.openai import error_json


def error_event(code: int, message: str, type_: str, first_available: int | None = None) -> bytes:
    """An unframed SSE error event: ``data: {"error": ...}\\n\\n``.

    The ``openai`` SDK raises ``APIError`` on it, and browsers' ``EventSource`` deliver it as a
    normal message, so every client sees why a stream stopped.
    """
    return b"data: " + error_json(code, message, type_, first_available) + b"\n\n"


DONE_EVENT = b"data: [DONE]\n\n"


def frame_event(total_before: int, event: bytes) -> bytes:
    """Prefix ``event`` with ``id: N\\n`` where N is the ring offset just after the framed
    event, given ``total_before`` = the writer's ``total_bytes`` before the append.

    The id line's own digits count towards N, so N is found by fixed point: at most one
    correction, when adding the digits carries N into one more digit.
    """
    base = total_before + len(event) + 5  # "id: " + "\n"
    digits = len(str(base))
    n = base + digits
    if len(str(n)) != digits:
        n += 1
    return b"id: %d\n%b" % (n, event)


_ID_LINE = re.compile(rb"^id:[^\n]*\n", re.MULTILINE)


def strip_id_lines(event: bytes) -> bytes:
    """Remove ``id:`` lines from an upstream event before ringcast frames it with its own."""
    if b"id:" not in event:
        return event
    return _ID_LINE.sub(b"", event)


def iter_sse_data(body: bytes) -> list[bytes]:
    """The ``data:`` payloads of each complete event in ``body`` (multi-line data joined by
    ``\n``; one space after the colon removed, as the SSE spec says)."""
    out: list[bytes] = []
    for raw in body.split(b"\n\n"):
        data = []
        for ln in raw.split(b"\n"):
            if ln.startswith(b"data:"):
                value = ln[5:]
                data.append(value[1:] if value.startswith(b" ") else value)
        if data:
            out.append(b"\n".join(data))
    return out


def split_events(buf: bytearray) -> Iterator[bytes]:
    """Pop every complete SSE event (ending in a blank line, ``\\n\\n`` or ``\\r\\n\\r\\n``)
    from the front of ``buf``."""
    while True:
        a = buf.find(b"\n\n")
        b = buf.find(b"\r\n\r\n")
        if a < 0 and b < 0:
            return
        end = a + 2 if b < 0 or (0 <= a < b) else b + 4
        event = bytes(buf[:end])
        del buf[:end]
        yield event
