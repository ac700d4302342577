"""Tests of the HTTP request parser (``ringcast.http.parse``): the request line ringcast
reads itself, the header fields and chunked bodies llhttp reads for it."""

from __future__ import annotations

import tracemalloc
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ringcast.http.parse import (
    MAX_CHUNK_FRAMING,
    MAX_HEAD,
    ChunkedBody,
    HeadParser,
    HttpError,
    Request,
    RequestBody,
)

pytestmark = pytest.mark.timeout(60)


def parse_head(head: bytes) -> Request:
    """The request of a whole head (given without its final empty line), fed at once."""
    parser = HeadParser()
    buf = bytearray(head + b"\r\n\r\n")
    assert parser.feed(buf) == len(buf)
    assert parser.request is not None
    return parser.request


def fed_bytewise(data: bytes) -> tuple[HeadParser, int]:
    """A parser given ``data`` one more byte at a time, as a slow client sends it: (the
    parser, the head length it returned, 0 if none)."""
    parser = HeadParser()
    buf = bytearray()
    for b in data:
        buf.append(b)
        used = parser.feed(buf)
        if used:
            return parser, used
    return parser, 0


header_names = st.from_regex(r"\A[A-Za-z][A-Za-z0-9\-]{0,20}\Z")
header_values = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f"),
    max_size=40,
).map(str.strip)


@given(st.dictionaries(header_names, header_values, max_size=8))
def test_parse_head_round_trip(headers: dict[str, str]) -> None:
    lower: dict[str, str] = {}
    for k, v in headers.items():
        if k.lower() in lower or k.lower() in ("content-length", "transfer-encoding"):
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
    # The same head arriving a byte at a time parses the same.
    parser, used = fed_bytewise(head + b"\r\n\r\n")
    assert used == len(head) + 4
    assert parser.request is not None and parser.request.headers == lower


@pytest.mark.parametrize(
    "head",
    [
        b"GET /",  # HTTP/0.9's request line: no version
        b"GET / HTTP/1.1 extra",
        b"GET nothing HTTP/1.1",
        b"G\x01T / HTTP/1.1",
        b"GET / HTTP/1.1\r\nno colon",
        b"GET / HTTP/1.1\r\nbad name: x",
        b"GET / HTTP/1.1\r\n folded: x",
        b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2",
        b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1",
        b"GET / HTTP/1.1\r\nContent-Length: 1x",
        b"GET / HTTP/1.1\r\nContent-Length: 99999999999999999999999",
        b"GET / HTTP/1.1\r\nX: a\x0bb",
        b"GET / HTTP/1.1\r\nX: a\x7fb",
        b"\x00 \x00 ",  # not a request line at all: 400, not 505 (found by the HTTP fuzzing)
        b"GET / FTP/1.1",
        b"GET / HTTP/11",
        b"GET /caf\xe9 HTTP/1.1",  # Latin-1, not UTF-8
        b"GET /a\tb HTTP/1.1",
        # Request smuggling: a body framed two ways, or chunked where it cannot be.
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3",
        b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
        b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked",
        # A field that names one thing, given twice: its values were joined ("a1, a2").
        b"POST / HTTP/1.1\r\nX-Conversation-Id: a1\r\nX-Conversation-Id: a2",
        b"GET / HTTP/1.1\r\nHost: a\r\nhost: b",
        b"GET / HTTP/1.1\r\nLast-Event-ID: 1\r\nLast-Event-Id: 2",
        b"GET / HTTP/1.1\r\nAuthorization: Bearer a\r\nAuthorization: Bearer b",
    ],
)
def test_parse_head_rejects(head: bytes) -> None:
    with pytest.raises(HttpError) as e:
        parse_head(head)
    assert e.value.status == 400
    assert e.value.close


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/0.9", b"HTTP/3.0"])
def test_a_well_formed_request_in_another_version_is_505(version: bytes) -> None:
    with pytest.raises(HttpError) as e:
        parse_head(b"GET / " + version)
    assert e.value.status == 505


def test_a_transfer_coding_other_than_chunked_is_501() -> None:
    with pytest.raises(HttpError) as e:
        parse_head(b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked")
    assert e.value.status == 501


@pytest.mark.parametrize("method", ["GET", "FROB", "CONNECT", "PRI", "x-custom~1"])
def test_any_token_is_a_method(method: str) -> None:
    """llhttp knows a fixed table of methods (and takes CONNECT as a tunnel); ringcast
    routes any token, answering 405 where a route does not take it."""
    req = parse_head(f"{method} /v1/x HTTP/1.1\r\nContent-Length: 2".encode())
    assert (req.method, req.path, req.content_length) == (method, "/v1/x", 2)


def test_raw_utf8_target_is_the_same_as_its_escapes() -> None:
    """A raw UTF-8 target reaches llhttp percent-escaped; the request keeps the client's
    bytes, decoded as UTF-8 like the escapes are decoded later."""
    raw = parse_head("GET /v1/stream/café?x=日本 HTTP/1.1".encode())
    assert (raw.path, raw.query) == ("/v1/stream/café", "x=日本")
    assert raw.target == "/v1/stream/café?x=日本".encode()
    escaped = parse_head(b"GET /v1/stream/caf%C3%A9?x=%E6%97%A5%E6%9C%AC HTTP/1.1")
    assert raw.query_params() == escaped.query_params() == {"x": "日本"}


@pytest.mark.parametrize(
    "target",
    [
        b"/v1/stream/\xc0\xaf",  # an overlong "/"
        b"/v1/stream/\xed\xa0\x80",  # a UTF-16 surrogate
        b"/v1/stream/a\xff",
        b"/v1/stream/%0d%0aX:%20y\r\nX: y",  # a header smuggled through the target
        b"/v1/stream/\xe2\x80\xa8\x85",  # U+2028 and a bare NEL byte
    ],
)
def test_attack_targets_are_400(target: bytes) -> None:
    with pytest.raises(HttpError) as e:
        parse_head(b"GET " + target + b" HTTP/1.1\r\nHost: x")
    assert e.value.status == 400


def test_escaped_bytes_stay_escapes() -> None:
    """What the client escaped is not decoded here (the routes decode once): an escaped
    "?" or "/" is part of the path, not a query or a segment."""
    req = parse_head(b"GET /v1/stream/a%3Fb%2Fc?d=%26 HTTP/1.1")
    assert (req.path, req.query) == ("/v1/stream/a%3Fb%2Fc", "d=%26")


@pytest.mark.parametrize(
    "data",
    [
        b"GET /health HTTP/1.1\nHost: x\n\n",
        b"GET /health HTTP/1.1\rHost",
        b"GET / HTTP/1.1\r\nA: b\rc",
    ],
)
def test_bare_line_ends_are_refused_before_the_head_ends(data: bytes) -> None:
    with pytest.raises(HttpError) as e:
        fed_bytewise(data)
    assert e.value.status == 400 and "CRLF" in e.value.message


def test_size_limits() -> None:
    with pytest.raises(HttpError) as e:
        fed_bytewise(b"GET /" + b"a" * MAX_HEAD + b" HTTP/1.1\r\n")
    assert e.value.status == 414
    with pytest.raises(HttpError) as e:
        HeadParser().feed(bytearray(b"GET / HTTP/1.1\r\nX: " + b"p" * MAX_HEAD + b"\r\n\r\n"))
    assert e.value.status == 431
    # Just under the limit is served.
    pad = MAX_HEAD - len(b"GET / HTTP/1.1\r\nX: ")
    parse_head(b"GET / HTTP/1.1\r\nX: " + b"p" * pad)


def test_upgrade_is_ignored() -> None:
    """curl --http2 asks for h2c on a POST with its body: the body is read as HTTP/1.1."""
    head = (
        b"POST /v1/x HTTP/1.1\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\nContent-Length: 2\r\n\r\n"
    )
    parser = HeadParser()
    buf = bytearray(head + b"hi")
    assert parser.feed(buf) == len(head)
    assert parser.request is not None and parser.request.content_length == 2
    assert parser.request.headers["upgrade"] == "h2c"


def decode(body: bytes, *, step: int = 0) -> tuple[bytes, int]:
    """(The decoded body, the bytes it took) for ``body`` fed whole or ``step`` at a time."""
    out: list[bytes] = []
    dec = ChunkedBody(out.append)
    buf = bytearray()
    used = 0
    for i in range(0, len(body), step or len(body) or 1):
        buf += body[i : i + (step or len(body))]
        n = dec.feed(buf)
        del buf[:n]
        used += n
        if dec.done:
            break
    assert dec.done
    return b"".join(out), used


CHUNKED = b"5;ext=1\r\nhel\r\n\r\n4\r\n\r\n\r\n\r\n0\r\nTrailer: x\r\n\r\n"
"""A body of "hel\\r\\n" "\\r\\n\\r\\n" ("hel" then two CRLF CRLF inside the data), with a chunk
extension and a trailer field."""


@pytest.mark.parametrize("step", [0, 1, 2, 3, 5, 7])
def test_chunked_body_stops_at_its_end(step: int) -> None:
    following = b"GET /next HTTP/1.1\r\n\r\n"
    body, used = decode(CHUNKED + following, step=step)
    assert body == b"hel\r\n\r\n\r\n"
    assert used == len(CHUNKED)  # the pipelined request after it is left alone


@given(st.lists(st.binary(min_size=1, max_size=20), max_size=6), st.integers(1, 9))
def test_chunked_round_trip(pieces: list[bytes], step: int) -> None:
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    assert decode(body + b"\r\n\r\nX", step=step) == (b"".join(pieces), len(body))


@pytest.mark.parametrize(
    "body", [b"zz\r\n", b"5\r\nabc\r\n0\r\n\r\n", b"1\nx\r\n", b"-1\r\n", b"1\r\nxy"]
)
def test_malformed_chunked_body_is_400(body: bytes) -> None:
    with pytest.raises(HttpError) as e:
        ChunkedBody(lambda data: None).feed(bytearray(body))
    assert e.value.status == 400


def test_request_body_limits() -> None:
    held = RequestBody(3, False, 10)
    buf = bytearray(b"ab")
    assert held.feed(buf) == 0 and not held.done  # a Content-Length body is taken whole
    buf += b"cGET"
    assert held.feed(buf) == 3 and held.done and held.take() == b"abc"
    # A chunked body is refused once its decoded bytes pass the limit...
    with pytest.raises(HttpError) as e:
        RequestBody(0, True, 10).feed(bytearray(b"b\r\n" + b"x" * 11 + b"\r\n"))
    assert e.value.status == 413
    # ...or its framing alone grows past twice the limit and MAX_CHUNK_FRAMING.
    framing = b"1;" + b"e" * (20 + MAX_CHUNK_FRAMING)
    with pytest.raises(HttpError) as e:
        RequestBody(0, True, 10).feed(bytearray(framing))
    assert e.value.status == 413
    # Streamed (no limit): handed over as it comes.
    got: list[bytes] = []
    streamed = RequestBody(0, True, None, got.append)
    assert streamed.feed(bytearray(b"3\r\nabc\r\n")) == 8 and got == [b"abc"]
    assert streamed.feed(bytearray(b"0\r\n\r\n")) == 5 and streamed.done


def test_a_held_chunked_body_of_crlfs_costs_its_size_in_memory() -> None:
    # Data dense in CRLF CRLF reaches the sink in two-byte pieces (each such run is a llhttp
    # call of its own): held as a bytes object each, a 1 MB body took ~28 MB, 256 such
    # connections of one client some 7 GB. Held in one buffer now.
    data = b"\r\n" * 500_000
    body = RequestBody(0, True, len(data))
    buf = bytearray(b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data))
    tracemalloc.start()
    try:
        assert body.feed(buf) == len(buf) and body.done
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert body.take() == data
    assert peak < 4 * len(data), peak


@pytest.mark.parametrize("step", [1, 2, 3, 4, 7])
def test_chunked_body_with_leading_zeros_and_a_trailer_fed_in_steps(step: int) -> None:
    body = b"00a;x=y\r\n" + b"\r\n" * 5 + b"\r\n00000\r\nT: 1\r\n\r\n"
    assert decode(body + b"\r\n\r\nGET / HTTP/1.1\r\n\r\n", step=step) == (b"\r\n" * 5, len(body))


@given(
    st.lists(
        st.tuples(
            st.binary(min_size=1, max_size=12).map(lambda b: b.replace(b"Z", b"\r\n\r\n")),
            st.sampled_from([b"", b";a", b';a=b;c="d"', b"00"]),
        ),
        max_size=5,
    ),
    st.sampled_from([b"", b"T: 1\r\n", b"A: b\r\nC: d\r\n"]),
    st.integers(1, 9),
)
def test_chunked_round_trip_with_extensions_and_trailers(
    pieces: list[tuple[bytes, bytes]], trailer: bytes, step: int
) -> None:
    # (b"00": the size with leading zeros, no extension.)
    body = b"".join(
        b"00%x\r\n%s\r\n" % (len(p), p) if ext == b"00" else b"%x%s\r\n%s\r\n" % (len(p), ext, p)
        for p, ext in pieces
    )
    body += b"0\r\n" + trailer + b"\r\n"
    following = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    assert decode(body + following, step=step) == (b"".join(p for p, _ in pieces), len(body))


class _Counted:
    """A decoder's llhttp parser, counting the calls it is given."""

    def __init__(self, parser: Any) -> None:
        self.parser, self.calls = parser, 0

    def feed_data(self, data: Any) -> None:
        self.calls += 1
        self.parser.feed_data(data)


def _outcome(body: bytes, step: int, walk: bool) -> tuple[Any, ...]:
    """What a decoder makes of ``body`` fed ``step`` bytes at a time: the status it refused it
    with, else (done, bytes taken, bytes decoded). ``walk=False``: the decoder as it was
    before it walked the chunks (every byte given to llhttp in runs ending at CRLF CRLF)."""
    out: list[bytes] = []
    dec = ChunkedBody(out.append)
    dec._walking = walk
    buf = bytearray()
    used = 0
    try:
        for i in range(0, len(body), step):
            buf += body[i : i + step]
            n = dec.feed(buf)
            del buf[:n]
            used += n
            if dec.done:
                break
    except HttpError as e:
        return ("refused", e.status)
    return (dec.done, used, b"".join(out))


_PIECES = st.one_of(
    st.builds(
        lambda size, ext, fill: b"%s%s\r\n%s\r\n" % (size, ext, (fill * 40)[: int(size, 16)]),
        st.sampled_from([b"1", b"2", b"f", b"F", b"10", b"11", b"011", b"1b", b"0", b"00"]),
        st.sampled_from([b"", b";a", b';a="b"', b" ;x", b"\t"]),
        st.sampled_from([b"\r\n", b"\r\n\r\n0\r\n", b"x", b"0\r\nT: 1\r\n\r\n", b"\n\r", b"1\r\n"]),
    ),
    st.sampled_from([b"0\r\n", b"\r\n", b"T: 1\r\n", b"\r", b"\n", b"zz", b"1\r\nxy\r\n"]),
    st.binary(max_size=6),
)


@settings(max_examples=400)
@given(st.lists(_PIECES, max_size=8), st.integers(1, 40))
def test_walking_the_chunks_ends_and_refuses_a_body_exactly_where_runs_did(
    pieces: list[bytes], step: int
) -> None:
    # Well-formed and malformed chunk sequences, chunk data holding CRLF CRLF and whole
    # chunk bodies, fed in every size: the walk takes the same bytes (never one past the
    # end: a pipelined request after it stays) and refuses the same bodies.
    body = b"".join(pieces) + b"0\r\n\r\nGET / HTTP/1.1\r\n\r\n"
    assert _outcome(body, step, walk=True) == _outcome(body, step, walk=False)


@pytest.mark.parametrize("chunk", [1 << 20, 8192, 16])
def test_a_body_of_only_crlf_crlf_is_taken_as_before_in_few_llhttp_calls(chunk: int) -> None:
    # Given to llhttp in runs ending at each CRLF CRLF, a 1 MiB body of them was a llhttp
    # call per two bytes (~0.45 us of CPU per byte); the walk gives each feed's chunks in
    # one call, and their bytes reach the sink in as many pieces.
    data = b"\r\n\r\n" * (1 << 18)
    raw = b"".join(
        b"%x\r\n%s\r\n" % (len(data[i : i + chunk]), data[i : i + chunk])
        for i in range(0, len(data), chunk)
    )
    raw += b"0\r\n\r\n"
    following = b"GET /next HTTP/1.1\r\n\r\n"
    for limit, taken in ((len(data), True), (len(data) - 1, False)):
        body = RequestBody(0, True, limit)
        counted = _Counted(body._chunks._llhttp)  # type: ignore[union-attr]
        body._chunks._llhttp = counted  # type: ignore[union-attr,assignment]
        buf = bytearray(raw + following)
        feeds, used = 0, 0
        tracemalloc.start()
        try:
            while not body.done:
                piece = bytearray(buf[used : used + 65536])
                feeds += 1
                used += body.feed(piece)
            peak = tracemalloc.get_traced_memory()[1]
        except HttpError as e:
            assert not taken and e.status == 413
            continue
        finally:
            tracemalloc.stop()
        assert taken and used == len(raw) and body.take() == data
        assert peak < 4 * len(data), peak
        assert counted.calls <= 2 * feeds + 2, (counted.calls, feeds)


@pytest.mark.parametrize("blank", [b"\r\n", b"\r\n\r\n"])
def test_empty_lines_before_the_request_line_are_skipped(blank: bytes) -> None:
    """RFC 9112 §2.2 (a client may send a CRLF after a body); the head's length counts
    them, so the connection drops them with it."""
    parser = HeadParser()
    buf = bytearray(blank + b"GET /health?x=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert parser.feed(buf) == len(buf)
    assert parser.request is not None
    assert (parser.request.path, parser.request.query) == ("/health", "x=1")


def test_a_head_of_empty_lines_only_is_400() -> None:
    with pytest.raises(HttpError) as e:
        HeadParser().feed(bytearray(b"\r\n" * (MAX_HEAD // 2 + 1)))
    assert e.value.status == 400


@pytest.mark.parametrize(
    ("target", "path", "query"),
    [
        (b"http://127.0.0.1:8080/v1/stream?conv_id=a", "/v1/stream", "conv_id=a"),
        (b"HTTPS://example.com/health", "/health", ""),
        (b"http://example.com", "/", ""),
        (b"http://u@h/v1/stream/a%2Fb", "/v1/stream/a%2Fb", ""),
        # The authority ends at "/" or "?" (RFC 3986 3.2): these are not paths.
        (b"http://x?/health", "/", "/health"),
        (b"http://x?y=1", "/", "y=1"),
    ],
)
def test_the_absolute_form_is_its_path_and_query(target: bytes, path: str, query: str) -> None:
    """RFC 9112 §3.2.2: a server accepts the absolute form; its authority is not checked."""
    req = parse_head(b"GET " + target + b" HTTP/1.1\r\nHost: x")
    assert (req.path, req.query) == (path, query)
    assert req.target == (path + ("?" + query if query else "")).encode()


def test_a_target_in_another_scheme_is_400() -> None:
    with pytest.raises(HttpError) as e:
        parse_head(b"GET ftp://example.com/x HTTP/1.1")
    assert e.value.status == 400


def test_a_target_with_a_fragment_is_400() -> None:
    with pytest.raises(HttpError) as e:
        parse_head(b"GET http://x#/health HTTP/1.1")
    assert e.value.status == 400


def test_empty_lines_do_not_count_toward_the_head_limit_and_are_scanned_once() -> None:
    """10 KiB of empty lines and a 7 KiB head: within the 16 KiB head limit, which is the
    head's; a head that arrives a byte at a time after them is scanned from where the last
    read left off (each read rescanned them: ~60x the CPU of a read)."""
    blank = b"\r\n" * (10 * 1024 // 2)
    head = b"GET /health HTTP/1.1\r\nX-Pad: " + b"a" * (7 * 1024) + b"\r\n\r\n"
    parser = HeadParser()
    buf = bytearray(blank)
    assert parser.feed(buf) == 0
    assert parser._skip == len(blank)
    for b in head[:-1]:
        buf.append(b)
        assert parser.feed(buf) == 0
    buf.append(head[-1])
    assert parser.feed(buf) == len(buf)
    assert parser.request is not None and parser.request.path == "/health"
