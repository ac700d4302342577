"""``ringcast serve --upstream`` against a fake upstream that replays real llama-server bytes."""

from __future__ import annotations

import contextlib
import json
import socket
import socketserver
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from pages import read_request
from ringcast.server.upstream_link import UPSTREAM_READ_TIMEOUT, upstream_read_timeout
from ringcast.wire.sse import strip_id_lines

pytestmark = pytest.mark.timeout(90)

REPO = Path(__file__).resolve().parents[2]
# shared/ beside the repository (the workspace layout and CI's): llama-server's captured streams.
SHARED = next(
    (
        c
        for c in (REPO.parent / "shared", REPO / "shared", REPO.parent.parent / "shared")
        if (c / "data" / "llama-server").is_dir()
    ),
    None,
)
if SHARED is None:
    pytest.skip("shared/data/llama-server not found beside the repository", allow_module_level=True)
RECORDINGS: list[dict[str, Any]] = [
    json.loads(line)
    for line in (SHARED / "data" / "llama-server" / "llama-server-chat-streams.jsonl")
    .read_text()
    .splitlines()
    if line.strip()
]


def recorded_body(rec: dict[str, Any]) -> bytes:
    return "".join(e["data"] for e in rec["events"]).encode()


class FakeUpstream(socketserver.ThreadingTCPServer):
    """Answers a chat request with the recording whose messages match, at recorded pace."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.pace = 0.0  # multiplier of the recorded timing; 0 = no waits
        self.requests: list[dict[str, Any]] = []
        self.aborted = 0
        self.completed = 0
        self.status = 200


def read_json_request(rfile: BinaryIO) -> dict[str, Any] | None:
    """The JSON body of the request on ``rfile`` (None if the client hung up first)."""
    got = read_request(rfile)
    if got is None:
        return None
    body: dict[str, Any] = json.loads(got[1])
    return body


class Handler(socketserver.StreamRequestHandler):
    server: FakeUpstream

    def handle(self) -> None:
        body = read_json_request(self.rfile)
        if body is None:
            return
        self.server.requests.append(body)
        if self.server.status != 200:
            err = b'{"error":{"code":500,"message":"model exploded","type":"server_error"}}'
            self.wfile.write(
                b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: "
                b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(err), err)
            )
            return
        rec = next(r for r in RECORDINGS if r["request"]["messages"] == body["messages"])
        self.wfile.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        start = time.monotonic()
        try:
            for ev in rec["events"]:
                delay = start + ev["t"] * self.server.pace - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                data = ev["data"].encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
            self.server.completed += 1
        except (BrokenPipeError, ConnectionResetError):
            self.server.aborted += 1


@contextlib.contextmanager
def serving(up: socketserver.BaseServer) -> Iterator[None]:
    """Runs a fake upstream's accept loop in a thread for the length of the block."""
    t = threading.Thread(target=up.serve_forever, daemon=True)
    t.start()
    try:
        yield
    finally:
        up.shutdown()
        up.server_close()


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    up = FakeUpstream()
    with serving(up):
        yield up


@pytest.fixture(scope="module")
def srv(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream, serve_module
) -> Iterator[Any]:
    url = f"http://127.0.0.1:{upstream.server_address[1]}"
    with serve_module("--upstream", url) as s:
        yield s


@pytest.mark.parametrize("line", range(len(RECORDINGS)))
def test_proxied_bytes_are_the_upstream_bytes(
    srv: Any, upstream: FakeUpstream, line: int, check_ids
) -> None:
    upstream.pace = 0.0
    rec = RECORDINGS[line]
    body = json.dumps(rec["request"]).encode()
    r = srv.open_request(
        "POST", "/v1/chat/completions", body, {"X-Conversation-Id": f"proxy-{line}"}
    )
    got = r.read_all_and_close()
    check_ids(got)
    # Byte for byte what llama-server sent, plus ringcast's id line on every event.
    assert strip_id_lines(got) == recorded_body(rec)
    assert upstream.requests[-1]["stream"] is True
    _, _, replay = srv.request("GET", f"/v1/stream?conv_id=proxy-{line}")
    assert replay == got


def test_non_streaming_through_the_proxy(srv: Any, upstream: FakeUpstream) -> None:
    upstream.pace = 0.0
    rec = RECORDINGS[3]  # asks for include_usage
    req = dict(rec["request"], stream=False)
    status, _, body = srv.request("POST", "/v1/chat/completions", req)
    assert status == 200
    out = json.loads(body)
    text = ""
    for ev in rec["events"]:
        data = ev["data"][6:].strip()
        if data != "[DONE]":
            for ch in json.loads(data)["choices"]:
                text += ch["delta"].get("content") or ""
    assert out["choices"][0]["message"]["content"] == text
    assert out["usage"]["completion_tokens"] == rec["request"]["max_tokens"]


def test_delete_closes_the_upstream_request(
    srv: Any, upstream: FakeUpstream, wait_for, sse_events, error_of
) -> None:
    upstream.pace = 1.0
    rec = max(RECORDINGS, key=lambda r: r["events"][-1]["t"])
    aborted = upstream.aborted
    r = srv.open_request(
        "POST",
        "/v1/chat/completions",
        json.dumps(rec["request"]).encode(),
        {"X-Conversation-Id": "proxy-cancel"},
    )
    r.read_at_least(1000)
    assert srv.request("DELETE", "/v1/stream?conv_id=proxy-cancel")[0] == 204
    assert error_of(sse_events(r.read_all_and_close())[-1])["type"] == "cancelled"
    wait_for(lambda: upstream.aborted > aborted, "the upstream to see the disconnect")


def test_upstream_failure_modes(
    tmp_path: Path, upstream: FakeUpstream, serve, sse_events, error_of
) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()
    with serve("--upstream", f"http://127.0.0.1:{dead_port}") as s:
        body = s.post_chat("no-upstream").read_all_and_close()
        err = error_of(sse_events(body)[-1])
        assert (err["code"], err["type"]) == (502, "upstream_error")
        status, _, _out = s.request(
            "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}
        )
        assert status == 502
    upstream.status = 500
    try:
        url = f"http://127.0.0.1:{upstream.server_address[1]}"
        (tmp_path / "b").mkdir()
        with serve.at(tmp_path / "b")("--upstream", url) as s:
            body = s.post_chat("bad-upstream").read_all_and_close()
            err = error_of(sse_events(body)[-1])
            assert err["code"] == 500
            assert "model exploded" in str(err["message"])
            _, _, info = s.request(
                "POST", "/v1/streams/lookup", {"conversation_ids": ["bad-upstream"]}
            )
            assert json.loads(info)[0]["state"] == "failed"
    finally:
        upstream.status = 200


class TlsUpstream(FakeUpstream):
    """The fake upstream behind TLS, with a certificate of its own (self-signed)."""

    def __init__(self, cert: Path, key: Path) -> None:
        super().__init__()
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.tls.load_cert_chain(cert, key)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        # The handshake happens on the handler's first read, in its own thread.
        return self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr


@pytest.fixture(scope="module")
def tls_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TlsUpstream, Path]]:
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=ringcast test upstream", "-keyout", str(key), "-out", str(cert)),
            *("-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
        ],
        check=True,
        capture_output=True,
    )
    up = TlsUpstream(cert, key)
    with serving(up):
        yield up, cert


def test_https_upstream_with_its_ca(
    tmp_path: Path, tls_upstream: tuple[TlsUpstream, Path], serve, check_ids
) -> None:
    """Through TLS the proxied bytes are the upstream's bytes; the request went over TLS (the
    fake upstream speaks nothing else) with the Host header a server expects."""
    up, cert = tls_upstream
    up.pace = 0.0
    rec = RECORDINGS[0]
    url = f"https://127.0.0.1:{up.server_address[1]}"
    with serve("--upstream", url, "--upstream-ca-file", str(cert)) as s:
        r = s.open_request(
            "POST",
            "/v1/chat/completions",
            json.dumps(rec["request"]).encode(),
            {"X-Conversation-Id": "over-tls"},
        )
        got = r.read_all_and_close()
    check_ids(got)
    assert strip_id_lines(got) == recorded_body(rec)
    assert up.requests[-1]["stream"] is True


def test_https_upstream_with_an_untrusted_certificate(
    tmp_path: Path, tls_upstream: tuple[TlsUpstream, Path], serve, sse_events, error_of
) -> None:
    """Checked against the system's CAs, a self-signed upstream is refused with an error event
    that says why and what to do, and the session ends failed."""
    up, _cert = tls_upstream
    url = f"https://127.0.0.1:{up.server_address[1]}"
    served = len(up.requests)
    with serve("--upstream", url) as s:
        body = s.post_chat("untrusted").read_all_and_close()
        err = error_of(sse_events(body)[-1])
        assert (err["code"], err["type"]) == (502, "upstream_error")
        assert "certificate not trusted" in str(err["message"])
        assert "--upstream-ca-file" in str(err["message"])
        _, _, info = s.request("POST", "/v1/streams/lookup", {"conversation_ids": ["untrusted"]})
        assert json.loads(info)[0]["state"] == "failed"
    assert len(up.requests) == served, "no request reached the upstream"


def lookup_state(srv: Any, conv: str) -> str:
    _, _, info = srv.request("POST", "/v1/streams/lookup", {"conversation_ids": [conv]})
    state: str = json.loads(info)[0]["state"]
    return state


class ScriptedUpstream(socketserver.ThreadingTCPServer):
    """Reads a request, writes the pieces of ``response`` one by one, then either closes the
    connection or stalls: says nothing more until the other side hangs up."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), ScriptedHandler)
        self.response: list[bytes] = []
        self.stall = False
        self.reset = False
        self.hung_up = 0  # stalled connections the client closed

    @property
    def name(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"

    def script(self, *response: bytes, stall: bool = False, reset: bool = False) -> None:
        """``stall``: say nothing more until hung up; ``reset``: end with a TCP reset."""
        self.response, self.stall, self.reset = list(response), stall, reset


class ScriptedHandler(socketserver.StreamRequestHandler):
    server: ScriptedUpstream

    def handle(self) -> None:
        if read_json_request(self.rfile) is None:
            return
        for piece in self.server.response:
            self.wfile.write(piece)
            self.wfile.flush()
        if self.server.reset:
            time.sleep(0.2)  # let the pieces arrive first
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return  # closing with SO_LINGER 0 sends an RST
        if self.server.stall:
            try:
                while self.rfile.read(1):
                    pass
            except ConnectionResetError:
                pass
            self.server.hung_up += 1


SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
HEAD_CHUNKED = SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
HEAD_UNTIL_CLOSE = SSE_HEAD + b"Connection: close\r\n\r\n"  # neither length nor chunks


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


@pytest.fixture(scope="module")
def scripted() -> Iterator[ScriptedUpstream]:
    up = ScriptedUpstream()
    with serving(up):
        yield up


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_silent_upstream_fails_the_job(
    tmp_path: Path,
    scripted: ScriptedUpstream,
    loop: str,
    serve,
    wait_for,
    sse_events,
    error_of,
    response,
) -> None:
    """An upstream that stops sending, before its answer or mid-stream, fails the job after
    $RINGCAST_UPSTREAM_READ_TIMEOUT seconds with an error that names it and the wait."""
    first = RECORDINGS[0]["events"][0]["data"].encode()
    url = f"http://{scripted.name}"
    env = {"RINGCAST_UPSTREAM_READ_TIMEOUT": "1"}
    with serve("--upstream", url, "--event-loop", loop, env=env) as s:
        for conv, response, relayed in (
            ("silent", [], b""),  # reads the request, then not even a status line
            ("stalled", [HEAD_CHUNKED, chunk(first)], first),  # one event, then nothing
        ):
            scripted.script(*response, stall=True)
            hung_up = scripted.hung_up
            events = sse_events(s.post_chat(conv).read_all_and_close())
            assert strip_id_lines(b"".join(events[:-1])) == relayed
            err = error_of(events[-1])
            assert (err["code"], err["type"]) == (504, "upstream_error")
            assert scripted.name in err["message"]
            assert "nothing for 1 s" in err["message"]
            assert lookup_state(s, conv) == "failed"
            wait_for(lambda n=hung_up: scripted.hung_up > n, "the upstream connection to close")


def test_an_upstream_stream_without_done_fails_the_job(
    tmp_path: Path, scripted: ScriptedUpstream, serve, sse_events, error_of, check_ids, response
) -> None:
    """A stream that ends before `data: [DONE]` was cut short: the client must not take it for
    a whole answer. Every recording ends with [DONE]; a whole stream still ends done."""
    events = [e["data"].encode() for e in RECORDINGS[0]["events"]]
    assert all(r["events"][-1]["data"] == "data: [DONE]\n\n" for r in RECORDINGS)
    url = f"http://{scripted.name}"
    with serve("--upstream", url) as s:
        for conv, response in (
            ("cut-at-close", (HEAD_UNTIL_CLOSE, *events[:2])),
            ("cut-at-last-chunk", (HEAD_CHUNKED, *map(chunk, events[:2]), b"0\r\n\r\n")),
        ):
            scripted.script(*response)
            got = sse_events(s.post_chat(conv).read_all_and_close())
            check_ids(b"".join(got))
            assert strip_id_lines(b"".join(got[:-1])) == b"".join(events[:2])
            err = error_of(got[-1])
            assert (err["code"], err["type"]) == (502, "upstream_error")
            assert scripted.name in err["message"]
            assert "before `data: [DONE]`" in err["message"]
            assert lookup_state(s, conv) == "failed"
        scripted.script(HEAD_UNTIL_CLOSE, *events)
        got_whole = s.post_chat("whole").read_all_and_close()
        assert strip_id_lines(got_whole) == b"".join(events)
        assert lookup_state(s, "whole") == "done"


def test_an_upstream_that_resets_or_lingers(
    tmp_path: Path, scripted: ScriptedUpstream, serve, wait_for, sse_events, error_of
) -> None:
    """A reset mid-stream is the upstream's failure (502 upstream_error, not a 500 of ours);
    an upstream that keeps the connection open after `data: [DONE]` does not hold the
    answer back: it ends done at once."""
    events = [e["data"].encode() for e in RECORDINGS[0]["events"]]
    with serve("--upstream", f"http://{scripted.name}") as s:
        scripted.script(HEAD_CHUNKED, *map(chunk, events[:2]), reset=True)
        got = sse_events(s.post_chat("reset").read_all_and_close())
        assert strip_id_lines(b"".join(got[:-1])) == b"".join(events[:2])
        err = error_of(got[-1])
        assert (err["code"], err["type"]) == (502, "upstream_error"), err
        # As the reset lands: mid-read (lost) or at a read's end (closed).
        assert "connection was lost" in err["message"] or "mid-response" in err["message"], err
        assert lookup_state(s, "reset") == "failed"
        hung_up = scripted.hung_up
        scripted.script(HEAD_CHUNKED, *map(chunk, events), stall=True)
        t0 = time.monotonic()
        got_whole = s.post_chat("lingers").read_all_and_close()
        assert time.monotonic() - t0 < 30
        assert strip_id_lines(got_whole) == b"".join(events)
        assert lookup_state(s, "lingers") == "done"
        wait_for(lambda: scripted.hung_up == hung_up + 1, "ringcast to close the connection")


@pytest.mark.parametrize(
    ("value", "seconds", "warned"),
    [
        (None, UPSTREAM_READ_TIMEOUT, False),
        ("", UPSTREAM_READ_TIMEOUT, False),
        ("2.5", 2.5, False),
        ("0", UPSTREAM_READ_TIMEOUT, True),
        ("-3", UPSTREAM_READ_TIMEOUT, True),
        ("soon", UPSTREAM_READ_TIMEOUT, True),
        ("nan", UPSTREAM_READ_TIMEOUT, True),
        ("inf", UPSTREAM_READ_TIMEOUT, True),
    ],
)
def test_read_timeout_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    value: str | None,
    seconds: float,
    warned: bool,
) -> None:
    if value is None:
        monkeypatch.delenv("RINGCAST_UPSTREAM_READ_TIMEOUT", raising=False)
    else:
        monkeypatch.setenv("RINGCAST_UPSTREAM_READ_TIMEOUT", value)
    with caplog.at_level("WARNING", logger="ringcast.worker"):
        assert upstream_read_timeout() == seconds
    assert any("RINGCAST_UPSTREAM_READ_TIMEOUT" in r.message for r in caplog.records) == warned
