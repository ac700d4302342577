"""What a hostile client found in the HTTP server (issue 13), each kept fixed: bounded
non-streaming answers, bounded lookups, a per-key session quota, a per-client connection
cap, deep JSON, create/delete races, ids kept out of the log, and the small ones (line ends,
strict offsets, UTF-8 paths, ``100 Continue`` after the key, keys with spaces, auth before
routing, a generator that cannot be imported)."""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(90)

KEY_A, KEY_B = "key-a", "key-b"
TEXT = "text/plain"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def error(status: int, body: bytes) -> dict[str, Any]:
    err: dict[str, Any] = json.loads(body)["error"]
    assert err["code"] == status, err
    return err


def server_errors(s: Any) -> float:
    """The 5xx answers every HTTP process of ``s`` has counted."""
    _, _, body = s.request("GET", "/metrics")
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in body.decode().splitlines()
        if line.startswith("ringcast_http_errors_total{") and 'class="5xx"' in line
    )


def health_from(address: str, port: int) -> bytes:
    """The start of the answer to ``GET /health`` from a connection bound to ``address``."""
    with socket.create_connection(
        ("127.0.0.1", port), timeout=10, source_address=(address, 0)
    ) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return sock.recv(4096)


def deep_json(depth: int) -> bytes:
    """A body valid in every route's schema but for one field nested ``depth`` deep."""
    return b'{"messages": [], "x": ' + b"[" * depth + b"]" * depth + b"}"


@pytest.fixture(scope="module")
def srv(serve_module: Any) -> Iterator[Any]:
    """Keys, small sessions (so an oversized answer is quick to make), a fast model."""
    with serve_module(
        "--tokens-per-s",
        "0",
        "--session-bytes",
        "65536",
        "--api-key",
        KEY_A,
        "--api-key",
        KEY_B,
        http_procs=1,
    ) as s:
        yield s


# -- 1. a non-streaming answer is held up to the session's bytes, then refused


def test_non_streaming_answer_is_bounded(srv: Any) -> None:
    body = {"messages": [], "stream": False, "max_tokens": 10**12}
    for conv in (None, "big-answer"):
        hs = auth(KEY_A) | ({"X-Conversation-Id": conv} if conv else {})
        status, _, resp = srv.request("POST", "/v1/chat/completions", body, hs)
        assert status == 413
        assert "--session-bytes" in error(413, resp)["message"]
    # The process serves on, and an answer within the bound is still whole.
    status, _, resp = srv.request(
        "POST", "/v1/completions", {"prompt": "hi", "stream": False, "max_tokens": 5}, auth(KEY_A)
    )
    assert status == 200 and json.loads(resp)["object"] == "text_completion"
    srv.request("DELETE", "/v1/stream/big-answer", headers=auth(KEY_A))


# -- 2. a lookup is capped, and lists the caller's sessions once whatever its ids


def test_lookup_caps_its_ids(srv: Any) -> None:
    ids = [f"c{i}" for i in range(10_001)]
    status, _, resp = srv.request(
        "POST", "/v1/streams/lookup", {"conversation_ids": ids}, auth(KEY_A)
    )
    assert status == 413
    assert "10000" in error(413, resp)["message"]
    status, _, resp = srv.request(
        "POST", "/v1/streams/lookup", {"conversation_ids": ids[:10_000]}, auth(KEY_A)
    )
    assert (status, resp) == (200, b"[]")


def test_lookup_lists_once_per_request(serve_in_memory: Any) -> None:
    s = serve_in_memory("--tokens-per-s", "0")
    for conv in ("a", "a::m1", "a::m1::q", "ab", "b::m", "zz"):
        s.post_chat(conv, max_tokens=1).read_all_and_close()
    calls: list[str] = []
    for name in ("list", "lookup_prefix", "get"):
        real = getattr(s.store, name)

        def counted(*args: Any, _real: Any = real, _name: str = name, **kw: Any) -> Any:
            calls.append(_name)
            return _real(*args, **kw)

        setattr(s.store, name, counted)
    ids = ["a::m1", "b", "nope", *(f"x{i}" for i in range(5000))]
    status, _, resp = s.request("POST", "/v1/streams/lookup", {"conversation_ids": ids})
    assert status == 200
    found = sorted(i["conversation_id"] for i in json.loads(resp))
    assert found == ["a::m1", "a::m1::q", "b::m"]
    assert calls == ["list"]


# -- 3. one key cannot take every running session


def test_per_key_session_quota(serve: Any, wait_for: Any) -> None:
    with serve(
        "--tokens-per-s",
        "2",
        "--max-sessions",
        "16",
        "--max-sessions-per-key",
        "2",
        "--api-key",
        KEY_A,
        "--api-key",
        KEY_B,
    ) as s:
        held = [s.post_chat(f"run-{i}", 10**6, auth(KEY_A)) for i in range(2)]
        assert [r.status for r in held] == [200, 200]
        status, _, resp = s.request(
            "POST",
            "/v1/chat/completions",
            {"messages": [], "max_tokens": 10**6, "stream": True},
            auth(KEY_A) | {"X-Conversation-Id": "run-2"},
        )
        assert status == 429
        assert "--max-sessions-per-key 2" in error(429, resp)["message"]
        # An anonymous request under the same key counts too.
        status, _, _ = s.request(
            "POST",
            "/v1/chat/completions",
            {"messages": [], "max_tokens": 10**6, "stream": False},
            auth(KEY_A),
        )
        assert status == 429
        # Replacing one of its own running sessions does not grow the count.
        again = s.post_chat("run-0", 10**6, auth(KEY_A))
        assert again.status == 200
        # The other key is not affected.
        other = s.post_chat("run-0", 1, auth(KEY_B))
        assert other.status == 200
        other.read_all_and_close()
        # Once one ends, the key may start another.
        s.request("DELETE", "/v1/stream/run-1", headers=auth(KEY_A))
        r = s.post_chat("run-3", 1, auth(KEY_A))
        assert r.status == 200
        r.read_all_and_close()
        for r in (*held, again):
            r.close()


def test_per_key_quota_is_exact_across_http_processes(serve: Any) -> None:
    """Creates alternating between the two HTTP processes (one keep-alive connection to
    each): exactly the quota's number succeed. The count is taken in the create's locked step
    in the segment; a count cached per process let each admit creates the other had made
    since it last counted (here the sixth)."""
    quota = 5
    with serve("--api-key", KEY_A, "--api-key", KEY_B, "--max-sessions-per-key", str(quota)) as s:
        conns: dict[int, http.client.HTTPConnection] = {}
        for _ in range(200):
            c = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
            c.request("GET", "/health")
            process = json.loads(c.getresponse().read())["process"]
            if process in conns:
                c.close()
            else:
                conns[process] = c
            if len(conns) == 2:
                break
        assert sorted(conns) == [0, 1]
        statuses = []
        try:
            for i in range(2 * quota + 2):
                c = conns[i % 2]
                c.request("PUT", f"/ds/v1/stream/q{i}", b"", auth(KEY_A) | {"Content-Type": TEXT})
                r = c.getresponse()
                r.read()
                statuses.append(r.status)
        finally:
            for c in conns.values():
                c.close()
        assert statuses == [201] * quota + [429] * (quota + 2)
        # The other key still has its whole quota.
        for i in range(quota):
            status, _, _ = s.request(
                "PUT", f"/ds/v1/stream/q{i}", b"", auth(KEY_B) | {"Content-Type": TEXT}
            )
            assert status == 201


# -- 5. JSON nested past the decoder's limit is a 400 on every JSON route


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/streams/lookup"])
def test_deep_json_is_400(srv: Any, path: str) -> None:
    status, _, resp = srv.request("POST", path, deep_json(5000), auth(KEY_A))
    assert status == 400
    assert "nested" in error(400, resp)["message"]


@pytest.mark.parametrize("depth", [1000, 5000])
def test_deep_json_in_a_durable_stream_write_is_400(srv: Any, depth: int) -> None:
    """A JSON stream's writes (PUT with a body, POST) are checked JSON: one nested past the
    decoder's limit is a 400, as on the other routes, not a 500."""
    hs = auth(KEY_A) | {"Content-Type": "application/json"}
    deep = b"[" * depth + b"]" * depth
    assert srv.request("PUT", f"/ds/v1/stream/deep{depth}", b"[1]", hs)[0] == 201
    for method, path in (
        ("POST", f"/ds/v1/stream/deep{depth}"),
        ("PUT", f"/ds/v1/stream/deep-new{depth}"),
    ):
        status, _, resp = srv.request(method, path, deep, hs)
        assert status == 400, (method, resp[:200])
        assert "nested too deeply" in resp.decode()
    assert server_errors(srv) == 0


# -- 6. creates racing deletes across processes: never a 500, never an id in the log


def test_create_delete_races_are_never_500(serve: Any, tmp_path: Path) -> None:
    conv = "race-conv-7f3a"
    log = tmp_path / "server.log"
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    with serve("--tokens-per-s", "0", "--log-level", "INFO", http_procs=2, workers=2, log=log) as s:
        barrier = threading.Barrier(6)

        def post() -> None:
            barrier.wait()
            for _ in range(150):
                r = s.post_chat(conv, max_tokens=2)
                r.read_all_and_close()
                with lock:
                    statuses[r.status] = statuses.get(r.status, 0) + 1

        def delete() -> None:
            barrier.wait()
            for _ in range(300):
                st, _, _ = s.request("DELETE", f"/v1/stream/{conv}")
                r = s.open_request("GET", f"/v1/stream/{conv}", headers={"Connection": "close"})
                r.read_all_and_close()
                with lock:
                    statuses[st] = statuses.get(st, 0) + 1
                    statuses[r.status] = statuses.get(r.status, 0) + 1

        threads = [threading.Thread(target=post) for _ in range(4)]
        threads += [threading.Thread(target=delete) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert server_errors(s) == 0
    assert set(statuses) <= {200, 204, 404, 409, 410}, statuses
    assert statuses.get(200, 0) > 0
    text = log.read_text()
    assert conv not in text, [ln for ln in text.splitlines() if conv in ln][:3]


# -- 9. one client address cannot take every connection


def test_per_client_connection_cap(serve: Any) -> None:
    with serve("--max-conns-per-client", "8", http_procs=1) as s:
        held = [socket.create_connection(("127.0.0.1", s.port), timeout=10) for _ in range(8)]
        try:
            extra = socket.create_connection(("127.0.0.1", s.port), timeout=10)
            data = b""
            while chunk := extra.recv(4096):
                data += chunk
            extra.close()
            assert data.startswith(b"HTTP/1.1 429 ")
            assert b"--max-conns-per-client" in data
            # Another address (any 127.x is this machine) is served.
            assert health_from("127.0.0.2", s.port).startswith(b"HTTP/1.1 200 ")
        finally:
            for c in held:
                c.close()
        # Closed connections are counted out: the first address is served again.
        assert s.request("GET", "/health")[0] == 200


def test_connection_cap_follows_the_open_file_limit(serve: Any) -> None:
    """By default a client address may hold a quarter of a process's descriptors: under a
    limit of 256, 300 idle sockets from one address leave room for everyone else."""
    with serve(http_procs=1, prefix=["prlimit", "--nofile=256:256"]) as s:
        held: list[socket.socket] = []
        try:
            for _ in range(300):
                held.append(socket.create_connection(("127.0.0.1", s.port), timeout=10))
            assert health_from("127.0.0.3", s.port).startswith(b"HTTP/1.1 200 ")
        finally:
            for c in held:
                c.close()


# -- 10. the smaller ones


@pytest.mark.parametrize(
    "head",
    [b"GET /health HTTP/1.1\nHost: x\n\n", b"GET /health HTTP/1.1\rHost: x\r\r"],
    ids=["bare-LF", "bare-CR"],
)
def test_bare_line_ends_are_400_at_once(srv: Any, head: bytes) -> None:
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    sock.sendall(head)
    data = sock.recv(4096)  # the 75 s idle close would time this out
    sock.close()
    assert data.startswith(b"HTTP/1.1 400 ")
    assert b"CRLF" in data


@pytest.mark.parametrize("value", ["5%0A", "5%0D", "%205", "5%00"])
def test_from_is_a_strict_integer(srv: Any, value: str) -> None:
    srv.post_chat("strict", 2, auth(KEY_A)).read_all_and_close()
    status, _, resp = srv.request(
        "GET", f"/v1/stream?conv_id=strict&from={value}", None, auth(KEY_A)
    )
    assert status == 400
    error(400, resp)


def test_raw_utf8_path_is_utf8(srv: Any) -> None:
    srv.post_chat("café", 2, auth(KEY_A)).read_all_and_close()
    head = "GET /v1/stream/café HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    raw = (head + f"Authorization: Bearer {KEY_A}\r\n\r\n").encode("utf-8")
    status, _, body = srv.request("GET", "", raw=raw)
    assert status == 200 and body.endswith(b"data: [DONE]\n\n")
    bad = b"GET /v1/stream/caf\xe9 HTTP/1.1\r\nHost: x\r\n\r\n"
    assert srv.request("GET", "", raw=bad)[0] == 400


def test_100_continue_only_after_the_key(srv: Any, response: Any) -> None:
    for headers, expected in (("", 401), (f"Authorization: Bearer {KEY_A}\r\n", 100)):
        sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        sock.sendall(
            (
                "POST /v1/streams/lookup HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                f"Expect: 100-continue\r\n{headers}\r\n"
            ).encode()
        )
        r = response(sock)
        assert r.status == expected
        if expected == 100:
            sock.sendall(b"{}")
            final = response(sock, r.buf)
            assert (final.status, final.read_all()) == (200, b"[]")
        sock.close()


def test_100_continue_is_not_sent_to_an_http_1_0_client(srv: Any, response: Any) -> None:
    """RFC 9110 §10.1.1: a server ignores ``Expect: 100-continue`` from HTTP/1.0, whose
    clients cannot read an interim response; it waits for the body."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        sock.sendall(
            (
                "POST /v1/streams/lookup HTTP/1.0\r\nHost: x\r\nContent-Length: 2\r\n"
                f"Expect: 100-continue\r\nAuthorization: Bearer {KEY_A}\r\n\r\n"
            ).encode()
        )
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            sock.recv(1)  # nothing, not "HTTP/1.1 100 Continue"
        sock.settimeout(10)
        sock.sendall(b"{}")
        final = response(sock)
        assert (final.status, final.read_all()) == (200, b"[]")


def test_unknown_path_without_key_is_401(srv: Any) -> None:
    for path in ("/nope", "/v1/nothing", "/admin"):
        status, _, resp = srv.request("GET", path)
        assert status == 401
        error(401, resp)
    assert srv.request("GET", "/nope", headers=auth(KEY_A))[0] == 404
    assert srv.request("GET", "/health")[0] == 200  # keyless routes stay keyless


@pytest.mark.parametrize("key", [" lead", "trail ", "\ttab"])
def test_key_with_spaces_is_refused_at_start(tmp_path: Path, key: str) -> None:
    for args, env in ((["--api-key", key], {}), ([], {"RINGCAST_API_KEY": key})):
        p = subprocess.run(
            [sys.executable, "-m", "ringcast.cli", "serve", "--port", "0", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **env},
            cwd=tmp_path,
        )
        assert p.returncode == 2
        assert "white space" in p.stderr and len(p.stderr.splitlines()) == 1


def test_generator_that_cannot_load(tmp_path: Path) -> None:
    (tmp_path / "broken_gen.py").write_text("raise RuntimeError('no model here')\n")
    (tmp_path / "empty_gen.py").write_text("x = 1\n")
    cases = {
        "no_such_module_xyz:gen": "no module named 'no_such_module_xyz'",
        "broken_gen:gen": "RuntimeError: no model here",
        "empty_gen:gen": "AttributeError",
    }
    for spec, said in cases.items():
        p = subprocess.run(
            [
                sys.executable,
                "-m",
                "ringcast.cli",
                "serve",
                "--port",
                "0",
                "--segment",
                str(tmp_path / "seg"),
                "--generator",
                spec,
                # A table whose full rings fit the filesystem: no start-up warning about
                # that on stderr beside the one line this test is about.
                "--max-sessions",
                "64",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(tmp_path)},
            cwd=tmp_path,
        )
        assert p.returncode == 2, p.stderr
        (line,) = p.stderr.splitlines()  # one line: what is wrong, not a traceback
        assert line.startswith("ringcast serve: ") and said in line, p.stderr
        assert not re.search(r"listening on", p.stdout)


def test_loop_errors_are_logged_without_their_message(caplog: pytest.LogCaptureFixture) -> None:
    """What the event loop reports of an unhandled exception (its message, the task with its
    arguments) stays out of ERROR: it may hold a conversation id."""
    import asyncio

    from ringcast._core import SessionNotFound
    from ringcast.server.child import log_loop_error

    try:
        raise SessionNotFound("no live session with conversation id 'secret-conv-9'")
    except SessionNotFound as e:
        exc = e
    loop = asyncio.new_event_loop()
    try:
        with caplog.at_level("DEBUG", logger="ringcast.loop"):
            log_loop_error(loop, {"message": "Task 'secret-conv-9' failed", "exception": exc})
            log_loop_error(loop, {"message": "callback f('secret-conv-9') failed"})
    finally:
        loop.close()
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 2
    assert "SessionNotFound at test_hardening.py:" in errors[0].getMessage()
    assert all("secret-conv-9" not in r.getMessage() and r.exc_info is None for r in errors)
    debug = [r for r in caplog.records if r.levelname == "DEBUG"]
    assert any("secret-conv-9" in r.getMessage() for r in debug)


# -- a client that pipelines small requests as fast as it can, reading every answer


def test_pipelined_flood_keeps_the_request_buffer_bounded(serve: Any) -> None:
    """Each request handled from a full buffer used to let one more read into it (reading
    resumed at every answer), so a client pipelining ``GET /health`` while reading the
    answers grew the process by ~200 MiB a second: it now stays paused until the buffer
    is parsed down."""
    import psutil

    with serve(http_procs=1) as s:
        proc = psutil.Process(s.children("http")[0])
        before = proc.memory_info().rss
        burst = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" * 2000
        sent = answered = 0
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
            sock.setblocking(False)
            deadline = time.monotonic() + 4
            left = memoryview(burst)
            while time.monotonic() < deadline:
                try:
                    n = sock.send(left)  # whole requests: a short send goes on where it ended
                    sent += n
                    left = left[n:] or memoryview(burst)
                except BlockingIOError:
                    pass
                try:
                    while chunk := sock.recv(1 << 20):
                        answered += chunk.count(b"HTTP/1.1 200 OK")
                except BlockingIOError:
                    pass
            grown = proc.memory_info().rss - before
        assert answered > 1000, answered  # it was served all along
        assert grown < 64 << 20, (grown >> 20, sent >> 20)
        assert s.request("GET", "/health")[0] == 200


def test_pipelined_requests_wait_while_their_answers_go_unread(serve: Any) -> None:
    """A client that pipelines requests and reads none of the answers: the next request is
    parsed only once the answers before it drain, so the process holds a write buffer's
    worth, not every answer (it grew by ~80 MiB a second with ``/metrics``)."""
    import psutil

    with serve(http_procs=1) as s:
        proc = psutil.Process(s.children("http")[0])
        before = proc.memory_info().rss
        burst = memoryview(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 500)
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
            sock.setblocking(False)
            deadline = time.monotonic() + 4
            left = burst
            while time.monotonic() < deadline:
                try:
                    left = left[sock.send(left) :] or burst  # whole requests, never read
                except BlockingIOError:
                    time.sleep(0.01)
            grown = proc.memory_info().rss - before
            assert grown < 64 << 20, grown >> 20
            # Reading now, the answers come, in order and whole.
            sock.setblocking(True)
            got = sock.recv(65536)
            assert got.startswith(b"HTTP/1.1 200 OK"), got[:100]
        assert s.request("GET", "/health")[0] == 200
