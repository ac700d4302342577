"""Property tests of SSE framing (``ringcast.wire.sse``)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from ringcast.wire.sse import frame_event, iter_sse_data, strip_id_lines

pytestmark = pytest.mark.timeout(60)


@given(st.integers(0, 10**15), st.binary(max_size=2000))
def test_frame_event_id_is_the_offset_after_the_event(total: int, payload: bytes) -> None:
    event = b"data: " + payload.replace(b"\n", b" ") + b"\n\n"
    framed = frame_event(total, event)
    assert framed.endswith(event)
    first_line, _, rest = framed.partition(b"\n")
    assert rest == event
    assert first_line == b"id: %d" % (total + len(framed))


@given(st.lists(st.binary(max_size=50).map(lambda b: b.replace(b"\n", b"")), max_size=20))
def test_iter_sse_data_returns_each_event(payloads: list[bytes]) -> None:
    body = b"".join(frame_event(0, b"data: " + p + b"\n\n") for p in payloads)
    assert iter_sse_data(body) == payloads


def test_strip_id_lines() -> None:
    assert strip_id_lines(b"id: 7\ndata: x\n\n") == b"data: x\n\n"
    assert strip_id_lines(b"data: id: 7\n\n") == b"data: id: 7\n\n"
