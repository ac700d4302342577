"""``--pass-readers`` (``ringcast.server.passing``): a ``GET /v1/stream`` of a running stream
lands in any HTTP process and is served by the one producing it, its socket passed there
before a byte is written; with real processes, real sockets and ``kill -9``."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(120)


def _readers_by_process(s: Any) -> list[float]:
    return [s.metric(f'http_readers_active{{process="{i}"}}') for i in range(2)]


def _open_passed(s: Any, conv: str, n: int) -> list[Any]:
    """``n`` GETs of ``conv`` that were passed (a GET that landed on the producer is closed
    and another opened: each lands on the other process with odds 1/2)."""
    passed: list[Any] = []
    for _ in range(40 * n):
        before = s.metric("http_connections_passed_total")
        g = s.open_request("GET", f"/v1/stream?conv_id={conv}&from=0")
        if s.metric("http_connections_passed_total") > before:
            passed.append(g)
            if len(passed) == n:
                return passed
        else:
            g.close()
    raise AssertionError(f"{len(passed)} of {n} GETs passed")


def test_readers_of_a_running_stream_are_served_by_its_producer(
    serve: Any, wait_for, sse_events, error_of
) -> None:
    with serve("--tokens-per-s", "20", http_procs=2) as s:
        r = s.post_chat("passed", max_tokens=5000)
        producer = r.headers["x-ringcast-process"]
        head = r.read_at_least(300)
        gets = _open_passed(s, "passed", 5)
        assert {g.headers["x-ringcast-process"] for g in gets} == {producer}
        wait_for(lambda: _readers_by_process(s)[int(producer)] == 6, "six readers there")
        assert _readers_by_process(s)[1 - int(producer)] == 0
        requests = s.metric("http_requests_total")
        status, _, _ = s.request("DELETE", "/v1/stream?conv_id=passed")
        assert status == 204
        whole = head + r.read_all_and_close()
        assert error_of(sse_events(whole)[-1])["type"] == "cancelled"
        for g in gets:
            assert g.read_all_and_close() == whole
        # Each request counted once, in the process that read it first (here: the DELETE
        # and this read of /metrics since).
        assert s.metric("http_requests_total") == requests + 1 + 1


def test_a_stream_with_many_readers_keeps_them_where_they_land(serve: Any, wait_for) -> None:
    from ringcast.server.passing import MAX_READERS

    with serve("--tokens-per-s", "20", http_procs=2) as s:
        r = s.post_chat("crowd", max_tokens=5000)
        producer = int(r.headers["x-ringcast-process"])
        r.read_at_least(300)
        gets = _open_passed(s, "crowd", MAX_READERS - 1)
        # Now at MAX_READERS: 24 more each land where the kernel puts them (all on the
        # producer with odds 2^-24).
        passed = s.metric("http_connections_passed_total")
        gets += [s.open_request("GET", "/v1/stream?conv_id=crowd&from=0") for _ in range(24)]
        assert s.metric("http_connections_passed_total") == passed
        wait_for(lambda: sum(_readers_by_process(s)) == MAX_READERS + 24, "every reader")
        assert _readers_by_process(s)[1 - producer] > 0
        for g in gets:
            g.close()
        r.close()


def test_a_pipelined_burst_is_not_passed_and_not_read_without_bound(serve: Any) -> None:
    with serve("--tokens-per-s", "20", http_procs=2) as s:
        r = s.post_chat("burst", max_tokens=5000)
        r.read_at_least(300)
        for _ in range(16):
            sock = socket.create_connection(("127.0.0.1", s.port), timeout=30)
            # More than a pass may carry, pipelined behind the stream request.
            sock.sendall(
                b"GET /v1/stream?conv_id=burst&from=0 HTTP/1.1\r\nHost: x\r\n\r\n"
                + b"X" * (80 * 1024)
            )
            head = _read_until(sock, b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK")
            assert s.metric("http_connections_passed_total") == 0
            if b"X-Ringcast-Process: " + r.headers["x-ringcast-process"].encode() not in head:
                break  # served where it landed, not by the producer: the case at issue
            sock.close()
        else:
            raise AssertionError("every connection landed on the producer")
        # The process reads no more of it while the stream runs: the client's writes stall
        # once the socket buffers are full (the server would take them all if it read on).
        sock.settimeout(3)
        sent = 0
        with pytest.raises(TimeoutError):
            while sent < 256 * 1024 * 1024:
                sent += sock.send(b"Y" * 65536)
        assert sent < 64 * 1024 * 1024, sent
        sock.close()
        r.close()


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


def _pid_of(s: Any, index: str) -> int | None:
    _, headers, body = s.request("GET", "/health")
    return int(json.loads(body)["pid"]) if headers["x-ringcast-process"] == index else None


def test_kill_9_of_the_producer_cuts_its_passed_readers_who_resume_from_the_ring(
    serve: Any, wait_for, kill, sse_events, error_of
) -> None:
    """What passing costs: readers served by the producer go down with it (as its POST's
    client does); each resumes from the bytes it has and reads the stream's end in-band."""
    with serve("--tokens-per-s", "20", http_procs=2) as s:
        r = s.post_chat("orphan", max_tokens=5000)
        producer = r.headers["x-ringcast-process"]
        r.read_at_least(300)
        gets = _open_passed(s, "orphan", 3)
        seen = [g.read_at_least(300) for g in gets]
        kill(wait_for(lambda: _pid_of(s, producer), "the producing process's pid"))
        for i, g in enumerate(gets):
            with contextlib.suppress(ConnectionError, OSError):
                while data := g.read_some():
                    seen[i] += data
            g.close()
        r.close()

        def resumed(got: bytes) -> bytes | None:
            try:
                return s.open_request(
                    "GET", f"/v1/stream?conv_id=orphan&from={len(got)}"
                ).read_all_and_close()
            except ConnectionError:  # raced with the dying process's listener
                return None

        for got in seen:
            whole = got + wait_for(lambda got=got: resumed(got), "a resumed read")
            assert error_of(sse_events(whole)[-1])["type"] == "producer_died"
            assert whole == s.request("GET", "/v1/stream?conv_id=orphan")[2]


def test_a_full_inbox_leaves_readers_where_they_land_and_a_stopped_one_adopts_later(
    serve: Any, wait_for
) -> None:
    """A producer that does not take its passes (stopped here; busy, in life) fills its
    inbox (``net.unix.max_dgram_qlen`` datagrams); the GETs after are served where they
    landed, counted as failed passes; once it runs again it adopts the queued ones."""
    qlen = int(Path("/proc/sys/net/unix/max_dgram_qlen").read_text())
    if qlen > 64:
        pytest.skip(f"net.unix.max_dgram_qlen is {qlen}: too many connections to fill it")
    with serve("--tokens-per-s", "50", http_procs=2) as s:
        r = s.post_chat("stalled", max_tokens=100)
        producer = r.headers["x-ringcast-process"]
        head = r.read_at_least(300)
        pid = wait_for(lambda: _pid_of(s, producer), "the producing process's pid")
        socks: list[socket.socket] = []
        os.kill(pid, signal.SIGSTOP)
        try:
            # Each lands on the other process with odds 1/2: that one passes the first
            # qlen + 1 and serves the rest (those on the stopped one wait in its backlog).
            for _ in range(4 * (qlen + 1) + 40):
                sock = socket.create_connection(("127.0.0.1", s.port), timeout=60)
                sock.sendall(b"GET /v1/stream?conv_id=stalled&from=0 HTTP/1.1\r\nHost: x\r\n\r\n")
                socks.append(sock)
            wait_for(
                lambda: _metric_from_the_running_one(s, "http_connection_passes_failed_total"),
                "a failed pass",
            )
        finally:
            os.kill(pid, signal.SIGCONT)
            try:
                whole = head + r.read_all_and_close()
                assert whole.endswith(b"data: [DONE]\n\n")
                assert s.metric("http_connections_passed_total") >= qlen
                for sock in socks:
                    got = _read_until(sock, b"\r\n0\r\n\r\n")
                    assert _dechunk(got.split(b"\r\n\r\n", 1)[1]) == whole
            finally:
                for sock in socks:
                    sock.close()


def _metric_from_the_running_one(s: Any, name: str) -> float:
    """``s.metric(name)`` from whichever HTTP process answers within a second (a request
    that lands on a stopped one waits in its backlog: given up here, answered later)."""
    sock = socket.create_connection(("127.0.0.1", s.port), timeout=1)
    try:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        body = b""
        while data := sock.recv(65536):
            body += data
    except TimeoutError:
        return 0.0
    finally:
        sock.close()
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith("ringcast_" + name):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _dechunk(body: bytes) -> bytes:
    out = bytearray()
    while True:
        size_line, _, body = body.partition(b"\r\n")
        n = int(size_line, 16)
        if not n:
            return bytes(out)
        out += body[:n]
        body = body[n + 2 :]
