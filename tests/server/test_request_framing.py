"""Request framing at the socket, since llhttp parses requests (issue 11): chunked request
bodies on the routes that take a body, keep-alive and pipelining across them, ``100
Continue`` still only after the key, and the request line ringcast keeps its own rules for
(any token is a method, a raw UTF-8 target is a path, an attack target is a 400)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(90)

KEY = "frame-key"
AUTH = f"Authorization: Bearer {KEY}\r\n".encode()


def chunked(body: bytes, size: int) -> bytes:
    """``body`` as a chunked body of ``size``-byte chunks (the last may be shorter)."""
    pieces = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def chunked_head(method: str, path: str, extra: bytes = b"") -> bytes:
    return (
        f"{method} {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n".encode()
        + AUTH
        + extra
        + b"\r\n"
    )


@pytest.fixture(scope="module")
def srv(serve_module: Any) -> Iterator[Any]:
    # (A small table: its full rings fit the filesystem, so no start-up warning.)
    with serve_module(
        "--tokens-per-s",
        "0",
        "--max-body",
        "4096",
        "--max-sessions",
        "64",
        "--api-key",
        KEY,
        http_procs=1,
    ) as s:
        yield s


def connect(srv: Any) -> socket.socket:
    return socket.create_connection(("127.0.0.1", srv.port), timeout=30)


def test_chunked_request_then_pipelined_requests_on_one_connection(srv: Any, response) -> None:
    """A chunked chat request (its CRLF CRLF inside the JSON and its end split across two
    sends), then two pipelined requests: three answers in order on one connection."""
    body = json.dumps(
        {"messages": [{"role": "user", "content": "a\r\n\r\nb"}], "max_tokens": 2}
    ).encode()
    framed = chunked_head("POST", "/v1/chat/completions") + chunked(body, 7)
    pipelined = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" + (
        b"POST /v1/streams/lookup HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n" + AUTH + b"\r\n{}"
    )
    sock = connect(srv)
    try:
        sock.sendall(framed[:-3])
        sock.sendall(framed[-3:] + pipelined)
        first = response(sock)
        answer = first.read_all()
        assert first.status == 200, answer
        assert json.loads(answer)["object"] == "chat.completion"
        assert first.headers["connection"] == "keep-alive"
        second = response(sock, first.buf)
        assert second.status == 200
        assert json.loads(second.read_all())["status"] == "ok"
        third = response(sock, second.buf)
        assert (third.status, third.read_all()) == (200, b"[]")
    finally:
        sock.close()


def test_a_chunked_body_waits_for_its_100_continue_until_the_key(srv: Any, response) -> None:
    body = b'{"conversation_ids": ["nope"]}'
    for auth, expected in ((b"", 401), (AUTH, 100)):
        sock = connect(srv)
        try:
            sock.sendall(
                b"POST /v1/streams/lookup HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                b"Expect: 100-continue\r\n" + auth + b"\r\n"
            )
            r = response(sock)
            assert r.status == expected
            if expected == 100:
                sock.sendall(chunked(body, 5))
                final = response(sock, r.buf)
                assert (final.status, final.read_all()) == (200, b"[]")
        finally:
            sock.close()


def test_a_durable_streams_append_may_be_chunked(srv: Any) -> None:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "text/plain"}
    path = "/ds/v1/stream/chunky"
    assert srv.request("PUT", path, b"first;", headers)[0] == 201
    raw = chunked_head("POST", path, b"Content-Type: text/plain\r\nConnection: close\r\n")
    status, _, _ = srv.request("POST", "", raw=raw + chunked(b"second and third", 6))
    assert status == 204
    assert srv.request("GET", path, headers=headers)[2] == b"first;second and third"


@pytest.mark.parametrize("method", ["FROB", "CONNECT", "x-custom~1"])
def test_any_token_is_a_method_that_routes_answer(srv: Any, method: str) -> None:
    """A method llhttp does not know (or takes as a tunnel) gets what ringcast's routes
    answer: 401 without the key, then 405."""
    assert srv.request(method, "/v1/stream/x")[0] == 401
    headers = {"Authorization": f"Bearer {KEY}"}
    status, _, body = srv.request(method, "/v1/stream/x", headers=headers)
    assert status == 405
    assert f"method {method} not allowed" in json.loads(body)["error"]["message"]


def test_raw_utf8_and_attack_targets(srv: Any) -> None:
    srv.post_chat("naïve/日本", 2, {"Authorization": f"Bearer {KEY}"}).read_all_and_close()
    for target in ("/v1/stream/naïve/日本", "/v1/stream/na%C3%AFve/%E6%97%A5%E6%9C%AC"):
        raw = f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".encode() + AUTH
        status, _, body = srv.request("GET", "", raw=raw + b"\r\n")
        assert status == 200 and body.endswith(b"data: [DONE]\n\n"), target
    attacks = [
        b"/v1/stream/\xc0\xaf",  # an overlong "/"
        b"/v1/stream/x\xff",
        b"/v1/stream/a%0d%0aSet-Cookie:%20x=1",  # escaped CRLF: an id with control characters
    ]
    for target in attacks:
        raw = b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n%s\r\n" % (target, AUTH)
        status, headers, _ = srv.request("GET", "", raw=raw)
        assert status == 400, target
        assert "set-cookie" not in headers
    assert srv.request("GET", "/health")[0] == 200
