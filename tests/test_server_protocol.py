"""Property tests of the wire helpers: SSE framing and the HTTP head parser."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from ringcast.protocol import frame_event, iter_sse_data, strip_id_lines
from ringcast.server import HttpError, parse_head

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


header_names = st.from_regex(r"\A[A-Za-z][A-Za-z0-9\-]{0,20}\Z")
header_values = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f"),
    max_size=40,
).map(str.strip)


@given(st.dictionaries(header_names, header_values, max_size=8))
def test_parse_head_round_trip(headers: dict[str, str]) -> None:
    lower: dict[str, str] = {}
    for k, v in headers.items():
        if k.lower() in lower or k.lower() == "content-length":
            continue
        lower[k.lower()] = v
    lines = [f"{k}: {v}" for k, v in lower.items()]
    head = ("\r\n".join(["POST /v1/stream/a%2Fb?conv_id=x&from=3 HTTP/1.1", *lines])).encode(
        "latin-1"
    )
    req = parse_head(head)
    assert (req.method, req.path, req.query) == ("POST", "/v1/stream/a%2Fb", "conv_id=x&from=3")
    assert req.headers == lower
    assert req.query_params() == {"conv_id": "x", "from": "3"}


@pytest.mark.parametrize(
    "head",
    [
        b"GET /",
        b"GET / HTTP/1.1 extra",
        b"GET nothing HTTP/1.1",
        b"G\x01T / HTTP/1.1",
        b"GET / HTTP/1.1\r\nno colon",
        b"GET / HTTP/1.1\r\nbad name: x",
        b"GET / HTTP/1.1\r\n folded: x",
        b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2",
    ],
)
def test_parse_head_rejects(head: bytes) -> None:
    with pytest.raises(HttpError) as e:
        parse_head(head)
    assert e.value.status == 400
