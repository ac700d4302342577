"""The streaming HTTP response parser used by ``record`` and ``replay``: any split of the
socket bytes gives the same body, for chunked, sized and read-to-close responses."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ringcast.http.client import HTTPError, ResponseParser

pytestmark = pytest.mark.timeout(60)


def _chunked(pieces: list[bytes]) -> bytes:
    body = b"".join(b"%x;ext=1\r\n%b\r\n" % (len(p), p) for p in pieces if p)
    return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body + b"0\r\nX: y\r\n\r\n"


def _feed(raw: bytes, cuts: list[int]) -> tuple[ResponseParser, bytes]:
    p = ResponseParser()
    out = bytearray()
    points = sorted({c % (len(raw) + 1) for c in cuts} | {0, len(raw)})
    for a, b in itertools.pairwise(points):
        for piece in p.feed(raw[a:b]):
            out += piece
    return p, bytes(out)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=8), st.lists(st.integers(0, 10_000)))
def test_chunked_any_split(pieces: list[bytes], cuts: list[int]) -> None:
    p, body = _feed(_chunked(pieces), cuts)
    assert p.done and p.status == 200 and body == b"".join(pieces)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=500), st.lists(st.integers(0, 10_000)), st.booleans())
def test_sized_and_close_delimited(body: bytes, cuts: list[int], sized: bool) -> None:
    head = b"HTTP/1.1 404 Not Found\r\n"
    head += b"Content-Length: %d\r\n\r\n" % len(body) if sized else b"Connection: close\r\n\r\n"
    p, got = _feed(head + body + (b"trailing junk" if sized else b""), cuts)
    if not sized:
        p.eof()
    assert p.done and p.status == 404 and got == body


def test_errors() -> None:
    with pytest.raises(HTTPError, match="status line"):
        ResponseParser().feed(b"SSH-2.0-OpenSSH\r\n\r\n")
    p = ResponseParser()
    p.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab")
    with pytest.raises(HTTPError, match="middle of the response body"):
        p.eof()
    with pytest.raises(HTTPError, match="chunk size"):
        ResponseParser().feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")


@pytest.mark.parametrize(
    "first",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\n",
    ],
)
def test_bytes_after_a_response_are_kept_for_the_next(first: bytes) -> None:
    """A pipelined (or interim 1xx) response is followed by the next one on the same
    connection: its bytes are the parser's ``rest``, never part of this body."""
    following = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    p = ResponseParser()
    body = b"".join(p.feed(first + following))
    assert p.done and body == (b"abc" if b"abc" in first else b"")
    assert p.rest == following
    nxt = ResponseParser()
    assert b"".join(nxt.feed(p.rest)) == b"ok" and nxt.done
