"""Small threaded web servers for the browser and passthrough tests (imported by them; not a
test module): reading one request, and a page server that serves a page and takes its report;
and the chunks of a chunked response, for the tests that count the server's writes.
"""

from __future__ import annotations

import contextlib
import json
import socketserver
import threading
from collections.abc import Iterator
from typing import Any, BinaryIO

from ringcast.http.parse import HeadParser, Request


def read_request(rfile: BinaryIO) -> tuple[Request, bytes] | None:
    """The next request on ``rfile`` and its ``Content-Length`` body (None if the client hung
    up first)."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        line = rfile.readline()
        if not line:
            return None
        head += line
    parser = HeadParser()
    parser.feed(bytearray(head))
    assert parser.request is not None
    return parser.request, rfile.read(parser.request.content_length)


def reply(wfile: BinaryIO, status: str, body: bytes, ctype: str, extra: str = "") -> None:
    """One ``Connection: close`` response."""
    wfile.write(
        (
            f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            f"{extra}Connection: close\r\n\r\n"
        ).encode()
        + body
    )


class PageServer(socketserver.ThreadingTCPServer):
    """Serves ``page`` (counting the loads of ``/``) and takes the page's ``POST /report``."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, page: bytes = b"") -> None:
        super().__init__(("127.0.0.1", 0), _PageHandler)
        self.page = page
        self.loads = 0
        self.report: dict[str, Any] | None = None
        self.reported = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _PageHandler(socketserver.StreamRequestHandler):
    server: PageServer

    def handle(self) -> None:
        got = read_request(self.rfile)
        if got is None:
            return
        req, body = got
        if req.method == "POST" and req.path == "/report":
            self.server.report = json.loads(body)
            self.server.reported.set()
            reply(self.wfile, "200 OK", b"{}", "application/json")
        else:
            if req.path == "/":
                self.server.loads += 1
            reply(self.wfile, "200 OK", self.server.page, "text/html; charset=utf-8")


@contextlib.contextmanager
def serving(server: socketserver.BaseServer) -> Iterator[None]:
    """Runs ``server``'s accept loop in a thread for the length of the block."""
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


def http_chunks(raw: bytes) -> list[bytes]:
    """The body chunks of a whole chunked ``HTTP/1.1 200`` response (its head included), in
    order: each write of the server's is one chunk on the wire."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    chunks = []
    while True:
        line, _, rest = rest.partition(b"\r\n")
        size = int(line, 16)
        if size == 0:
            return chunks
        chunks.append(rest[:size])
        assert rest[size : size + 2] == b"\r\n"
        rest = rest[size + 2 :]
