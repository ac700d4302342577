"""Property tests of the HTTP request-head parser (``ringcast.http.parse``)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from ringcast.http.parse import HttpError, parse_head

pytestmark = pytest.mark.timeout(60)


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
        b"\x00 \x00 ",  # not a request line at all: 400, not 505 (found by the HTTP fuzzing)
        b"GET / FTP/1.1",
        b"GET / HTTP/11",
    ],
)
def test_parse_head_rejects(head: bytes) -> None:
    with pytest.raises(HttpError) as e:
        parse_head(head)
    assert e.value.status == 400


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/0.9", b"HTTP/3.0"])
def test_a_well_formed_request_in_another_version_is_505(version: bytes) -> None:
    with pytest.raises(HttpError) as e:
        parse_head(b"GET / " + version)
    assert e.value.status == 505
