"""``--pass-readers`` (``ringcast.server.passing``): a ``GET /v1/stream`` of a running stream
lands in any HTTP process and is served by the one producing it, its socket passed there
before a byte is written; with real processes, real sockets and ``kill -9``."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(120)


def _readers_by_process(s: Any) -> list[float]:
    return [s.metric(f'http_readers_active{{process="{i}"}}') for i in range(2)]


def test_readers_of_a_running_stream_are_served_by_its_producer(serve: Any, wait_for) -> None:
    with serve("--tokens-per-s", "20", http_procs=2) as s:
        r = s.post_chat("passed", max_tokens=80)
        producer = r.headers["x-ringcast-process"]
        head = r.read_at_least(300)
        # 24 connections: each lands on the other process with odds 1/2, so all on the
        # producer with odds 2^-24.
        gets = [s.open_request("GET", "/v1/stream?conv_id=passed&from=0") for _ in range(24)]
        assert {g.headers["x-ringcast-process"] for g in gets} == {producer}
        readers = _readers_by_process(s)
        assert readers[int(producer)] == 25 and readers[1 - int(producer)] == 0, readers
        assert s.metric("http_connections_passed_total") >= 1
        whole = head + r.read_all_and_close()
        assert whole.endswith(b"data: [DONE]\n\n")
        for g in gets:
            assert g.read_all_and_close() == whole
        # Each request counted once, in the process that read it first: the POST, the 24
        # GETs and four reads of /metrics (two for the readers, one above, this one).
        assert s.metric("http_requests_total") == 1 + 24 + 4


def _read_until(sock: socket.socket, marker: bytes, got: bytes = b"") -> bytes:
    while marker not in got:
        data = sock.recv(65536)
        assert data, got[-300:]
        got += data
    return got


def test_a_passed_connection_serves_its_pipelined_and_later_requests(serve: Any) -> None:
    with serve("--tokens-per-s", "20", http_procs=2) as s:
        r = s.post_chat("pipe", max_tokens=2000)
        producer = r.headers["x-ringcast-process"].encode()
        r.read_at_least(200)
        for _ in range(40):  # until one lands on the other process and is passed (2^-40)
            before = s.metric("http_connections_passed_total")
            sock = socket.create_connection(("127.0.0.1", s.port), timeout=30)
            # A stream request with the next one right behind it, in one write.
            sock.sendall(
                b"GET /v1/stream?conv_id=pipe&from=0 HTTP/1.1\r\nHost: x\r\n\r\n"
                b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
            )
            got = _read_until(sock, b"\r\n\r\n")
            assert b"X-Ringcast-Process: " + producer + b"\r\n" in got
            if s.metric("http_connections_passed_total") > before:
                break
            sock.close()
        else:
            raise AssertionError("no connection was passed")
        # The stream ends (cancelled); then the pipelined request is answered, by the
        # producer too, and one sent after it on the same connection.
        status, _, _ = s.request("DELETE", "/v1/stream?conv_id=pipe")
        assert status == 204
        got = _read_until(sock, b'"status"', got)
        assert b"cancelled" in got and got.count(b"X-Ringcast-Process: " + producer) == 2
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        more = _read_until(sock, b'"status"')
        assert more.startswith(b"HTTP/1.1 200 OK") and b"X-Ringcast-Process: " + producer in more
        sock.close()
        r.close()


def test_finished_streams_and_other_routes_are_not_passed(serve: Any) -> None:
    with serve("--tokens-per-s", "0", http_procs=2) as s:
        body = s.post_chat("done-already", max_tokens=5).read_all_and_close()
        seen = set()
        for _ in range(24):
            status, headers, got = s.request("GET", "/v1/stream?conv_id=done-already&from=0")
            assert status == 200 and got == body
            seen.add(headers["x-ringcast-process"])
        assert seen == {"0", "1"}  # served where they landed (odds 2^-23 of one)
        assert s.metric("http_connections_passed_total") == 0


def test_without_pass_readers_readers_stay_where_they_land(serve: Any) -> None:
    with serve("--tokens-per-s", "20", "--no-pass-readers", http_procs=2) as s:
        r = s.post_chat("stays", max_tokens=60)
        r.read_at_least(300)
        gets = [s.open_request("GET", "/v1/stream?conv_id=stays&from=0") for _ in range(24)]
        assert {g.headers["x-ringcast-process"] for g in gets} == {"0", "1"}
        assert s.metric("http_connections_passed_total") == 0
        for g in gets:
            g.close()
        r.close()


def test_a_dead_producer_leaves_the_reader_where_it_landed(
    serve: Any, wait_for, kill, sse_events, error_of
) -> None:
    with serve("--tokens-per-s", "20", http_procs=2) as s:
        r = s.post_chat("orphan", max_tokens=1000)
        producer = r.headers["x-ringcast-process"]
        r.read_at_least(300)

        def pid_of(index: str) -> int | None:
            _, headers, body = s.request("GET", "/health")
            return int(json.loads(body)["pid"]) if headers["x-ringcast-process"] == index else None

        pid = wait_for(lambda: pid_of(producer), "the producing process's pid")
        kill(pid)
        r.close()
        # Its socket file may still be there, with nobody reading: the GET is served where
        # it landed, with the stream's end.
        deadline = time.monotonic() + 30
        while True:
            try:
                g = s.open_request("GET", "/v1/stream?conv_id=orphan&from=0")
                body = g.read_all_and_close()
                break
            except ConnectionError:  # raced with the dying process's listener
                assert time.monotonic() < deadline
        assert error_of(sse_events(body)[-1])["type"] == "producer_died"
