"""Property tests of SSE framing (``ringcast.wire.sse``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ringcast import Segment
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


@pytest.fixture(scope="module")
def segment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Segment]:
    seg = Segment.create(
        str(tmp_path_factory.mktemp("sse") / "seg"), max_sessions=4, session_bytes=1 << 20
    )
    yield seg
    seg.close()


# Totals on both sides of every digit boundary up to 10**6, and anywhere.
_TOTALS = st.one_of(
    st.integers(0, 10**6 + 2),
    st.sampled_from([10**k + d for k in range(2, 7) for d in range(-40, 3)]),
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(_TOTALS, st.binary(max_size=300))
def test_writer_write_event_frames_as_frame_event(
    segment: Segment, total: int, payload: bytes
) -> None:
    """``Writer.write_event`` (the producers' framing, in Rust under the append lock) gives the
    very bytes of ``frame_event``, the one definition of the rule."""
    event = b"data: " + payload.replace(b"\n", b" ") + b"\n\n"
    w = segment.create_or_replace("s")
    filler = total
    while filler:  # the ring holds 1 MiB: no more than that in one write
        n = min(filler, 1 << 19)
        assert w.write(b"x" * n)
        filler -= n
    assert w.write_event(event)
    r = segment.reader("s", total)
    got = r.read_nowait(1 << 20)
    r.close()
    assert got == frame_event(total, event)
