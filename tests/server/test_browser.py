"""A real browser's ``EventSource`` loses its connection and resumes by ``Last-Event-ID``.

Headless Chromium loads a page from a small test server that also relays ``/v1/stream``
to ``ringcast serve`` — and cuts the first stream connection after a few events, as a flaky
network would. The browser reconnects on its own, sending ``Last-Event-ID``; the page must end
up with every event exactly once.
"""

from __future__ import annotations

import json
import socket
import socketserver
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pages import PageServer, serving

pytestmark = pytest.mark.timeout(120)

PAGE = b"""<!doctype html><meta charset="utf-8"><title>ringcast</title><script>
const events = [], ids = [];
let errors = 0;
const es = new EventSource("/v1/stream?conv_id=browser-1&from=0");
es.onmessage = (e) => {
  events.push(e.data); ids.push(e.lastEventId);
  if (e.data === "[DONE]") {
    es.close();
    fetch("/report", {method: "POST", body: JSON.stringify({events, ids, errors})});
  }
};
es.onerror = () => { errors += 1; };
</script>"""


class Front(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, backend_port: int) -> None:
        super().__init__(("127.0.0.1", 0), FrontHandler)
        self.backend_port = backend_port
        self.stream_requests: list[dict[str, str]] = []
        self.report: dict[str, Any] | None = None
        self.reported = threading.Event()
        self.cut_after = 1500  # bytes of the first stream response before the "network" fails


class FrontHandler(socketserver.BaseRequestHandler):
    server: Front

    def handle(self) -> None:
        sock: socket.socket = self.request
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = sock.recv(65536)
            if not data:
                return
            buf += data
        head, rest = buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        path = lines[0].split(" ")[1]
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])
        }
        if path == "/":
            sock.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: %d\r\n"
                b"Connection: close\r\n\r\n%s" % (len(PAGE), PAGE)
            )
        elif path == "/report":
            need = int(headers.get("content-length", "0"))
            while len(rest) < need:
                rest += sock.recv(65536)
            self.server.report = json.loads(rest)
            sock.sendall(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
            self.server.reported.set()
        elif path.startswith("/v1/stream"):
            self.relay(sock, lines, headers)
        else:
            sock.sendall(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )

    def relay(self, sock: socket.socket, lines: list[str], headers: dict[str, str]) -> None:
        first = not self.server.stream_requests
        self.server.stream_requests.append(headers)
        kept = [ln for ln in lines if not ln.lower().startswith("connection:")]
        back = socket.create_connection(("127.0.0.1", self.server.backend_port))
        back.sendall(("\r\n".join([*kept, "Connection: close"]) + "\r\n\r\n").encode("latin-1"))
        sent = 0
        try:
            while data := back.recv(65536):
                if first and sent + len(data) > self.server.cut_after:
                    sock.sendall(data[: self.server.cut_after - sent])
                    sock.shutdown(socket.SHUT_RDWR)  # the network fails mid-stream
                    return
                sock.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            back.close()


@pytest.fixture
def srv(tmp_path: Path, serve) -> Iterator[Any]:
    with serve("--tokens-per-s", "20") as s:
        yield s


def test_eventsource_resumes_by_last_event_id(srv: Any, chromium: Any, sse_events, data_of) -> None:
    r = srv.post_chat("browser-1", max_tokens=60)
    front = Front(srv.port)
    with serving(front), chromium(f"http://127.0.0.1:{front.server_address[1]}/"):
        assert front.reported.wait(90), "the page never saw [DONE]"
    posted = r.read_all_and_close()
    _, _, whole = srv.request("GET", "/v1/stream?conv_id=browser-1")
    assert posted == whole
    report = front.report
    assert report is not None
    # Every event exactly once, in order, with the ids ringcast framed them with.
    events = sse_events(whole)
    assert report["events"] == [data_of(e).decode() for e in events]
    assert report["ids"][-1] == str(len(whole))
    assert report["errors"] >= 1  # the cut was seen
    assert len(front.stream_requests) >= 2
    resumed_from = front.stream_requests[1].get("last-event-id")
    assert resumed_from is not None and resumed_from in report["ids"]
    assert 0 < int(resumed_from) < len(whole)


# -- a browser on a finished stream, and a browser resuming with a resume token

PAGE_STOPS = b"""<!doctype html><meta charset="utf-8"><title>ringcast</title><script>
const q = new URLSearchParams(location.search);
let url = q.get("ringcast") + "/v1/stream?conv_id=" + encodeURIComponent(q.get("conv"));
if (q.get("token")) url += "&token=" + encodeURIComponent(q.get("token"));
const events = [];
let opened = 0, errors = 0;
const es = new EventSource(url);
es.onopen = () => { opened += 1; };
es.onmessage = (e) => { events.push(e.data); };
es.onerror = () => {
  errors += 1;
  // CONNECTING: it will try again; CLOSED: the server told it to stop.
  if (es.readyState === EventSource.CLOSED) {
    fetch("/report", {method: "POST", body: JSON.stringify({events, opened, errors})});
  }
};
</script>"""


@pytest.fixture
def page_server() -> Iterator[PageServer]:
    ps = PageServer(PAGE_STOPS)
    with serving(ps):
        yield ps


def _page_url(port: int, page_server: PageServer, **params: str) -> str:
    query = urllib.parse.urlencode({**params, "ringcast": f"http://127.0.0.1:{port}"})
    return f"{page_server.url}/?{query}"


def test_eventsource_stops_at_the_end_of_a_finished_stream(
    serve: Any, page_server: PageServer, chromium: Any, sse_events: Any, data_of: Any
) -> None:
    """The stream ends; EventSource reconnects with Last-Event-ID = its total; the 204 it
    gets makes it stop (CLOSED) instead of reconnecting for ever."""
    with serve("--cors-origin", page_server.url, "--tokens-per-s", "0", http_procs=1) as s:
        whole = s.post_chat("done-1", max_tokens=8).read_all_and_close()
        with chromium(_page_url(s.port, page_server, conv="done-1")):
            assert page_server.reported.wait(60), "EventSource never stopped"
        report = page_server.report
        assert report is not None
        assert report["events"] == [data_of(e).decode() for e in sse_events(whole)]
        assert report["opened"] == 1  # the reconnect got the 204: never opened again
        status, _, _ = s.request(
            "GET", "/v1/stream?conv_id=done-1", headers={"Last-Event-ID": str(len(whole))}
        )
        assert status == 204


def test_eventsource_resumes_with_a_resume_token_not_the_key(
    serve: Any, page_server: PageServer, chromium: Any, sse_events: Any, data_of: Any
) -> None:
    """With --api-key, the page gets the POST's resume token (never the key) and reads the
    stream with it."""
    with serve(
        "--cors-origin",
        page_server.url,
        "--api-key",
        "sk-browser",
        "--tokens-per-s",
        "40",
        http_procs=1,
    ) as s:
        r = s.post_chat("tok-1", max_tokens=30, headers={"Authorization": "Bearer sk-browser"})
        token = r.headers["x-ringcast-resume-token"]
        assert "sk-browser" not in token
        with chromium(_page_url(s.port, page_server, conv="tok-1", token=token)):
            assert page_server.reported.wait(60), "the page never finished"
        whole = r.read_all_and_close()
        report = page_server.report
        assert report is not None
        assert report["events"] == [data_of(e).decode() for e in sse_events(whole)]
