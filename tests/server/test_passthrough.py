"""``ringcast serve --upstream``: every route ringcast does not own is passed through to the
upstream unchanged, so ringcast on llama-server's port serves all of llama-server.

The fake llama-server answers its routes with an echo of what reached it (method, path,
query, headers, body), its WebUI with an HTML page, ``/v1/models`` and the streaming
``/chat/completions`` with llama-server's recorded bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pages import read_request, reply, serving
from ringcast.http.parse import ChunkedBody

pytestmark = pytest.mark.timeout(90)

REPO = Path(__file__).resolve().parents[2]
# shared/ beside the repository (the workspace layout and CI's), or beside its worktree.
SHARED = next(
    (
        c / "data" / "llama-server"
        for c in (REPO.parent / "shared", REPO / "shared", REPO.parent.parent / "shared")
        if (c / "data" / "llama-server").is_dir()
    ),
    None,
)
if SHARED is None:
    pytest.skip("shared/data/llama-server not found beside the repository", allow_module_level=True)


def _jsonl(name: str) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in (SHARED / name).read_text().splitlines() if ln.strip()]


STREAMS = _jsonl("llama-server-chat-streams.jsonl")
EXCHANGES = _jsonl("llama-server-exchanges.jsonl")
MODELS = next(e["response"] for e in EXCHANGES if e["request"]["path"] == "/v1/models")

WEBUI = b"""<!doctype html><meta charset="utf-8"><title>llama.cpp - chat</title><script>
(async () => {
  const props = await (await fetch("/props")).json();
  const models = await (await fetch("/v1/models")).json();
  const tok = await (await fetch("/tokenize", {method: "POST",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify({content: "hi"})})).json();
  await fetch("/report", {method: "POST", body: JSON.stringify({props, models, tok})});
})();
</script>"""

LLAMA_ROUTES = [
    ("GET", "/props"),
    ("GET", "/slots"),
    ("POST", "/completion"),
    ("POST", "/infill"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("POST", "/v1/embeddings"),
    ("POST", "/v1/responses"),
    ("POST", "/v1/messages"),
    ("POST", "/chat/completions"),
    ("POST", "/completions"),
    ("DELETE", "/slots/0"),
    ("PUT", "/lora-adapters"),
]


class FakeLlamaServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), FakeHandler)
        self.seen: list[dict[str, Any]] = []
        self.report: dict[str, Any] | None = None
        self.reported = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class FakeHandler(socketserver.StreamRequestHandler):
    server: FakeLlamaServer

    def reply(
        self, status: str, body: bytes, ctype: str = "application/json", extra: str = ""
    ) -> None:
        reply(self.wfile, status, body, ctype, "Server: llama.cpp\r\n" + extra)

    def handle(self) -> None:
        got = read_request(self.rfile)
        if got is None:
            return
        req, body = got
        self.server.seen.append({"method": req.method, "path": req.path, "headers": req.headers})
        if req.path == "/":
            self.reply("200 OK", WEBUI, "text/html; charset=utf-8")
        elif req.path == "/report":
            self.server.report = json.loads(body)
            self.server.reported.set()
            self.reply("200 OK", b"{}")
        elif req.path == "/v1/models":
            self.wfile.write(
                (MODELS["status"] + "\r\n" + "\r\n".join(MODELS["headers"]) + "\r\n\r\n").encode()
                + MODELS["body"].encode()
            )
        elif req.path in ("/chat/completions", "/v1/chat/completions") and json.loads(body).get(
            "stream"
        ):
            self.stream(json.loads(body))
        elif req.path == "/upload":
            digest = hashlib.sha256(body).hexdigest()
            self.reply("200 OK", json.dumps({"bytes": len(body), "sha256": digest}).encode())
        else:
            echo = {
                "method": req.method,
                "path": req.path,
                "query": req.query,
                "headers": req.headers,
                "body": body.decode(),
            }
            status = "201 Created" if req.method == "PUT" else "200 OK"
            self.reply(status, json.dumps(echo).encode(), extra="X-Llama: yes\r\n")

    def stream(self, body: dict[str, Any]) -> None:
        rec = next(s for s in STREAMS if s["request"]["messages"] == body["messages"])
        self.wfile.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        start = time.monotonic()
        for ev in rec["events"]:
            if (delay := start + ev["t"] / 4 - time.monotonic()) > 0:
                time.sleep(delay)
            data = ev["data"].encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")


@pytest.fixture(scope="module")
def llama() -> Iterator[FakeLlamaServer]:
    up = FakeLlamaServer()
    with serving(up):
        yield up


@pytest.fixture(scope="module")
def srv(llama: FakeLlamaServer, serve_module: Any) -> Iterator[Any]:
    with serve_module("--upstream", llama.url, "--http-procs", "1") as s:
        yield s


def test_every_llama_server_route_passes_through_unchanged(
    srv: Any, llama: FakeLlamaServer
) -> None:
    for method, path in LLAMA_ROUTES:
        body = json.dumps({"route": path, "text": "héllo"}).encode()
        status, headers, got = srv.request(
            method,
            path + "?a=1&b=x%2Fy",
            body,
            headers={
                "Authorization": "Bearer llama-key",
                "X-Custom": "kept",
                "Connection": "close, X-Hop",
                "X-Hop": "dropped",
                "Keep-Alive": "timeout=5",
            },
        )
        assert status == (201 if method == "PUT" else 200), (path, got)
        assert headers["x-llama"] == "yes" and headers["server"] == "llama.cpp"
        assert headers["content-type"] == "application/json"
        echo = json.loads(got)
        assert (echo["method"], echo["path"], echo["query"]) == (method, path, "a=1&b=x%2Fy")
        assert echo["body"] == body.decode()
        up = echo["headers"]
        # The upstream's own key goes up as the caller sent it (ringcast has no keys here).
        assert up["authorization"] == "Bearer llama-key"
        assert up["x-custom"] == "kept"
        assert up["host"] == llama.url.removeprefix("http://")
        assert up["content-length"] == str(len(body))
        # Hop-by-hop headers, and those Connection names, stop at ringcast.
        assert "x-hop" not in up and "keep-alive" not in up
        assert up["connection"] == "close"


def _key_at_upstream(s: Any, llama: FakeLlamaServer, path: str, key: str) -> str | None:
    """The ``Authorization`` the upstream got for a request to ``path`` sent with ``key``:
    ringcast's resumable ``/v1/chat/completions`` (the worker's proxy) or a passthrough."""
    before = len(llama.seen)
    body = json.dumps({**STREAMS[0]["request"], "stream": False}).encode()
    status, _, got = s.request("POST", path, body, headers={"Authorization": f"Bearer {key}"})
    assert status == 200, got
    up = next(x for x in llama.seen[before:] if x["path"] in (path, "/v1" + path))
    auth: str | None = up["headers"].get("authorization")
    return auth


def test_one_key_rule_for_the_completion_proxy_and_the_passthrough(
    srv: Any, llama: FakeLlamaServer, serve: Any
) -> None:
    # No ringcast keys: the caller's Authorization goes up as it came, on both paths.
    for path in ("/v1/chat/completions", "/chat/completions"):
        assert _key_at_upstream(srv, llama, path, "llama-key") == "Bearer llama-key", path
    # ringcast's own key is never forwarded; --upstream-api-key replaces the caller's.
    for args, key, expected in [
        (("--api-key", "rc-key"), "rc-key", None),
        (("--upstream-api-key", "up-key"), "other", "Bearer up-key"),
    ]:
        with serve("--upstream", llama.url, *args, "--http-procs", "1") as s:
            for path in ("/v1/chat/completions", "/chat/completions"):
                assert _key_at_upstream(s, llama, path, key) == expected, (args, path)


def test_models_are_the_upstreams(srv: Any) -> None:
    status, headers, body = srv.request("GET", "/v1/models")
    assert status == 200
    assert body == MODELS["body"].encode()
    assert headers["content-type"] == "application/json; charset=utf-8"


def test_a_streamed_answer_comes_back_as_llama_server_sent_it(srv: Any) -> None:
    rec = STREAMS[0]
    r = srv.open_request(
        "POST", "/chat/completions", json.dumps(rec["request"]).encode(), {"Connection": "close"}
    )
    assert r.status == 200
    assert r.headers["content-type"] == "text/event-stream"
    assert r.headers["transfer-encoding"] == "chunked"
    first = r.read_some()
    assert first and rec["events"][0]["data"].encode().startswith(first[:20])
    assert first + r.read_all_and_close() == "".join(e["data"] for e in rec["events"]).encode()


def test_a_large_body_streams_through_past_max_body(
    tmp_path: Path, llama: FakeLlamaServer, serve: Any
) -> None:
    # 3 MiB up through a server whose own routes take 64 KiB: the passthrough holds no body.
    with serve("--upstream", llama.url, "--max-body", "64K", "--http-procs", "1") as s:
        body = bytes(range(256)) * (3 * 4096)
        status, _, got = s.request(
            "POST", "/upload", body, headers={"Content-Type": "application/octet-stream"}
        )
        assert status == 200
        assert json.loads(got) == {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}
        status, _, _ = s.request("POST", "/v1/completions", body[:100_000])
        assert status == 413  # ringcast's own route keeps its limit


def test_a_streamed_body_behind_a_pipelined_request_waits_for_a_stalled_upstream(
    serve: Any,
) -> None:
    """A passed-through body is read as fast as the upstream takes it, also when its request
    was pipelined behind another: an upstream that reads nothing holds the connection at
    ~64 KiB of body, not whatever the client sends (resuming reading after the first answer
    undid the body's own pause: 54 MiB a connection)."""
    import psutil

    stalled = socket.create_server(("127.0.0.1", 0))  # accepts, never reads
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(stalled.accept()[0]), daemon=True).start()
    url = f"http://127.0.0.1:{stalled.getsockname()[1]}"
    with serve("--upstream", url, "--http-procs", "1") as s:
        proc = psutil.Process(s.children("http")[0])
        before = proc.memory_info().rss
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
            sock.sendall(
                b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
                b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Length: 1099511627776\r\n\r\n"
            )
            sock.settimeout(0.2)
            sent, deadline = 0, time.monotonic() + 3
            chunk = b"x" * 65536
            while time.monotonic() < deadline:
                try:
                    sent += sock.send(chunk)
                except TimeoutError:
                    pass  # the server reads no more: the socket buffers are full
            grown = proc.memory_info().rss - before
        assert sent < 64 << 20, sent >> 20  # it stopped taking the body
        assert grown < 16 << 20, (grown >> 20, sent >> 20)
    for c in held:
        c.close()
    stalled.close()


def test_head_and_keep_alive(srv: Any) -> None:
    """A HEAD answer has no body, and the connection serves the next request."""
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
    with contextlib.closing(sock):
        sock.sendall(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\nGET /props HTTP/1.1\r\nHost: x\r\n\r\n")
        head = srv_response_head(sock)
        assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: %d" % len(WEBUI) in head
        second = srv_response_head(sock)
        assert second.startswith(b"HTTP/1.1 200")


def srv_response_head(sock: socket.socket) -> bytes:
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(1)
        assert data, buf
        buf += data
    return buf


def test_ringcast_keeps_its_own_routes(srv: Any, llama: FakeLlamaServer) -> None:
    before = len(llama.seen)
    for method, path in [("GET", "/health"), ("GET", "/metrics"), ("GET", "/v1/streams")]:
        status, _, _ = srv.request(method, path)
        assert status == 200, path
    status, _, _ = srv.request("GET", "/v1/stream?conv_id=nope")
    assert status == 404
    assert len(llama.seen) == before


def test_without_upstream_unknown_routes_stay_404(serve: Any) -> None:
    with serve("--http-procs", "1") as s:
        for _, path in LLAMA_ROUTES[:3]:
            status, _, _ = s.request("GET", path)
            assert status == 404
        _, _, body = s.request("GET", "/v1/models")
        assert json.loads(body)["data"][0]["id"] == "ringcast-synthetic"


def test_api_key_gates_passthrough_and_stays_ringcasts(llama: FakeLlamaServer, serve: Any) -> None:
    with serve("--upstream", llama.url, "--api-key", "rc-key", "--http-procs", "1") as s:
        status, _, _ = s.request("GET", "/props")
        assert status == 401
        status, _, body = s.request("GET", "/props", headers={"Authorization": "Bearer rc-key"})
        assert status == 200
        assert "authorization" not in json.loads(body)["headers"]  # ringcast's key stays here
        status, _, page = s.request("GET", "/")  # the WebUI shell loads without a key
        assert status == 200 and page == WEBUI
        # Refused before its streamed body arrived: the connection cannot carry on.
        r = s.open_request(
            "POST",
            "/tokenize",
            raw=b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nxx",
        )
        assert (r.status, r.headers["connection"]) == (401, "close")
        r.close()
    with serve("--upstream", llama.url, "--upstream-api-key", "up-key", "--http-procs", "1") as s:
        _, _, body = s.request("GET", "/props", headers={"Authorization": "Bearer other"})
        assert json.loads(body)["headers"]["authorization"] == "Bearer up-key"


def test_an_unreachable_upstream_is_a_502(serve: Any) -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    with serve("--upstream", f"http://127.0.0.1:{port}", "--http-procs", "1") as s:
        status, _, body = s.request("GET", "/props")
        assert status == 502
        assert json.loads(body)["error"]["type"] == "upstream_error"


def test_a_browser_loads_the_webui_through_ringcast(
    srv: Any, llama: FakeLlamaServer, chromium: Any
) -> None:
    """Chromium opens ringcast's address; the page (the upstream's) calls the upstream's API
    through ringcast and reports what it got."""
    llama.reported.clear()
    with chromium(f"http://127.0.0.1:{srv.port}/"):
        assert llama.reported.wait(60), "the page never reported"
    report = llama.report
    assert report is not None
    assert report["models"] == json.loads(MODELS["body"])
    assert report["props"]["path"] == "/props"
    assert report["tok"]["method"] == "POST" and json.loads(report["tok"]["body"]) == {
        "content": "hi"
    }


class RecordingUpstream(socketserver.ThreadingTCPServer):
    """An upstream that records every byte a connection sent it, up to the connection's end,
    and answers the first request on it with ``response``."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, response: bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok") -> None:
        super().__init__(("127.0.0.1", 0), _RecordingHandler)
        self.response = response
        self.received: list[bytes] = []
        self.closed = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _RecordingHandler(socketserver.BaseRequestHandler):
    server: RecordingUpstream

    def handle(self) -> None:
        sock: socket.socket = self.request
        got = b""
        while b"\r\n\r\n" not in got and (data := sock.recv(65536)):
            got += data
        sock.sendall(self.server.response)
        with contextlib.suppress(OSError):
            while data := sock.recv(65536):
                got += data
        self.server.received.append(got)
        self.server.closed.set()


@pytest.fixture
def recorder(serve: Any) -> Iterator[tuple[RecordingUpstream, Any]]:
    """A recording upstream and a ringcast in front of it."""
    up = RecordingUpstream()
    with serving(up), serve("--upstream", up.url, "--http-procs", "1") as s:
        yield up, s


def test_connection_naming_a_framing_header_is_refused(
    recorder: tuple[RecordingUpstream, Any],
) -> None:
    """A ``Connection`` that names ``Content-Length`` would make ringcast drop it as hop-by-hop
    while forwarding the body, which the upstream would read as a second request: 400, and
    nothing reaches the upstream."""
    up, s = recorder
    smuggled = b"GET /slots HTTP/1.1\r\nHost: up\r\n\r\n"
    for named in (b"content-length", b"Transfer-Encoding", b"keep-alive, Host"):
        raw = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: %s\r\nContent-Length: %d\r\n\r\n%s" % (
            named,
            len(smuggled),
            smuggled,
        )
        status, _, body = s.request("GET", "/", raw=raw)
        assert status == 400, named
        assert b"Connection may not name" in body
    assert up.received == []


def test_forwarded_head_declares_exactly_the_body_forwarded(
    recorder: tuple[RecordingUpstream, Any],
) -> None:
    up, s = recorder
    raw = (
        b"POST /tokenize HTTP/1.1\r\nHost: x\r\nConnection: close, X-Hop\r\nX-Hop: 1\r\n"
        b"Content-Length: 005\r\n\r\nhello"
    )
    status, _, body = s.request("POST", "/tokenize", raw=raw)
    assert (status, body) == (200, b"ok")
    assert up.closed.wait(30)
    host = up.url.removeprefix("http://")
    assert up.received == [
        b"POST /tokenize HTTP/1.1\r\nHost: %s\r\nContent-Length: 5\r\nConnection: close\r\n\r\n"
        b"hello" % host.encode()
    ]


def test_a_chunked_body_goes_up_chunked(recorder: tuple[RecordingUpstream, Any]) -> None:
    """A chunked request body streams through: ringcast decodes it and sends it up chunked
    again (its own framing, as with Content-Length), trailer fields dropped."""
    up, s = recorder
    raw = (
        b"POST /tokenize HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n3;ext=1\r\nhel\r\n4\r\nlo\r\n\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    status, _, body = s.request("POST", "/tokenize", raw=raw)
    assert (status, body) == (200, b"ok")
    assert up.closed.wait(30)
    host = up.url.removeprefix("http://")
    head = (
        b"POST /tokenize HTTP/1.1\r\nHost: %s\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n" % host.encode()
    )
    (got,) = up.received
    assert got.startswith(head) and got.endswith(b"0\r\n\r\n")
    decoded: list[bytes] = []
    decoder = ChunkedBody(decoded.append)
    assert decoder.feed(bytearray(got[len(head) :])) == len(got) - len(head)
    assert decoder.done and b"".join(decoded) == b"hello\r\n"


def test_a_raw_utf8_target_goes_up_as_the_client_sent_it(
    recorder: tuple[RecordingUpstream, Any],
) -> None:
    up, s = recorder
    target = "/tokenize/café?q=日&r=%E6%97%A5".encode()
    status, _, body = s.request(
        "GET", "/", raw=b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % target
    )
    assert (status, body) == (200, b"ok")
    assert up.closed.wait(30)
    assert up.received[0].startswith(b"GET %s HTTP/1.1\r\n" % target)


BAD_UPSTREAM_HEADS = {
    "bare LF": b"HTTP/1.1 200 OK\r\nX-A: a\nSet-Cookie: s=1\r\nContent-Length: 2\r\n\r\nok",
    "bare CR": b"HTTP/1.1 200 OK\r\nX-A: a\rSet-Cookie: s=1\r\nContent-Length: 2\r\n\r\nok",
    "VT": b"HTTP/1.1 200 OK\r\nX-A: a\x0bb\r\nContent-Length: 2\r\n\r\nok",
    "superscript length": "HTTP/1.1 200 OK\r\nContent-Length: \u00b2\r\n\r\nok".encode("latin-1"),
}


def test_an_upstream_head_with_control_characters_or_a_bad_length_is_a_502(
    serve: Any, tmp_path: Path
) -> None:
    """Refused, not passed on, and logged by the upstream's name and the path's first
    segment (past it may be a conversation id)."""
    up = RecordingUpstream()
    log = tmp_path / "serve.log"
    with serving(up), serve("--upstream", up.url, "--http-procs", "1", log=log) as s:
        for what, response in BAD_UPSTREAM_HEADS.items():
            up.response = response
            status, headers, body = s.request("GET", "/props/conv-secret")
            assert status == 502, what
            assert json.loads(body)["error"]["type"] == "upstream_error"
            assert "set-cookie" not in headers and "x-a" not in headers
    text = log.read_text()
    assert text.count("sent an invalid response to GET /props, answered 502") == 4, text
    assert "conv-secret" not in text


def test_a_client_header_value_with_a_control_character_is_a_400(
    recorder: tuple[RecordingUpstream, Any],
) -> None:
    """On a passthrough route and on ringcast's own."""
    up, s = recorder
    for path in (b"/props", b"/health"):
        for value in (b"a\x0bb", b"a\x7fb", b"a\x01b"):
            raw = b"GET %s HTTP/1.1\r\nHost: x\r\nX-A: %s\r\nConnection: close\r\n\r\n" % (
                path,
                value,
            )
            status, _, _ = s.request("GET", path.decode(), raw=raw)
            assert status == 400, (path, value)
    assert up.received == []
