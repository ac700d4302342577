"""Helpers for the ``ringcast serve`` tests: start a real server, talk raw HTTP to it.

Nothing here sleeps for a fixed time to "let things happen": waits poll a condition and are
bounded by the test's timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path | None:
    """``shared/`` beside the repository (the workspace layout and CI's)."""
    for cand in (REPO.parent / "shared", REPO / "shared"):
        if (cand / "data" / "llama-server").is_dir():
            return cand
    return None


class Server:
    """A ``ringcast serve`` process tree on a free port."""

    def __init__(
        self,
        tmp: Path,
        *args: str,
        http_procs: int = 2,
        workers: int = 1,
        segment: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.segment = segment or tmp / "seg"
        cmd = [
            sys.executable,
            "-m",
            "ringcast.cli",
            "serve",
            "--port",
            "0",
            "--http-procs",
            str(http_procs),
            "--workers",
            str(workers),
            "--segment",
            str(self.segment),
            "--log-level",
            "WARNING",
            *args,
        ]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, text=True, cwd=str(tmp), env={**os.environ, **(env or {})}
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        m = re.search(r"listening on http://([^:]+):(\d+)", line)
        if not m:
            self.proc.kill()
            self.proc.wait()
            self.proc.stdout.close()
            raise RuntimeError(f"ringcast serve did not start: {line!r}")
        self.host, self.port = m.group(1), int(m.group(2))
        self.url = f"http://{self.host}:{self.port}"

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            if self.proc.stdout is not None:
                self.proc.stdout.close()

    def children(self, role: str) -> list[int]:
        """Pids of the live ``http`` or ``worker`` children."""
        import psutil

        module = "ringcast.server" if role == "http" else "ringcast.worker"
        out = []
        with contextlib.suppress(psutil.NoSuchProcess):
            for c in psutil.Process(self.proc.pid).children():
                with contextlib.suppress(psutil.NoSuchProcess):
                    if module in c.cmdline() and c.status() != psutil.STATUS_ZOMBIE:
                        out.append(c.pid)
        return out

    def metric(self, name: str) -> float:
        """Sum of every sample of ``ringcast_<name>`` (any labels)."""
        _, _, body = request(self.port, "GET", "/metrics")
        total = 0.0
        for line in body.decode().splitlines():
            if line.startswith(f"ringcast_{name}{{") or line.startswith(f"ringcast_{name} "):
                total += float(line.rsplit(" ", 1)[1])
        return total


def wait_for(cond: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


# --------------------------------------------------------------------------------------------
# Raw HTTP


def _head(
    method: str,
    path: str,
    body: bytes | None,
    headers: dict[str, str] | None,
    version: str = "HTTP/1.1",
) -> bytes:
    hs = {"Host": "127.0.0.1", **(headers or {})}
    if body is not None:
        hs.setdefault("Content-Type", "application/json")
        hs.setdefault("Content-Length", str(len(body)))
    lines = [f"{method} {path} {version}", *(f"{k}: {v}" for k, v in hs.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + (body or b"")


class Response:
    """A response read incrementally from a raw socket; the body is de-chunked."""

    def __init__(self, sock: socket.socket, buf: bytes = b"") -> None:
        self.sock = sock
        self.buf = buf
        while b"\r\n\r\n" not in self.buf:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError(f"connection closed before the response head: {self.buf!r}")
            self.buf += data
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split(" ")[1])
        self.headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        self.chunked = "chunked" in self.headers.get("transfer-encoding", "")
        self.left = int(self.headers.get("content-length", "-1"))
        self.chunk_left = 0
        self.done = self.left == 0 or self.status in (204, 304)

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        self.buf += data
        return True

    def read_some(self) -> bytes:
        """Next body bytes (b"" at the end of the body)."""
        while not self.done:
            if not self.chunked:
                if not self.buf and not self._fill():
                    self.done = True
                    return b""
                data = self.buf if self.left < 0 else self.buf[: self.left]
                self.buf = self.buf[len(data) :]
                if self.left >= 0:
                    self.left -= len(data)
                    self.done = self.left == 0
                return data
            if self.chunk_left == 0:
                while b"\r\n" not in self.buf:
                    if not self._fill():
                        raise ConnectionError("connection closed inside a chunk header")
                line, self.buf = self.buf.split(b"\r\n", 1)
                size = int(line.split(b";")[0], 16)
                if size == 0:
                    while b"\r\n" not in self.buf:
                        if not self._fill():
                            break
                    self.done = True
                    return b""
                self.chunk_left = size + 2  # data plus its CRLF
            if not self.buf and not self._fill():
                raise ConnectionError("connection closed inside a chunk")
            before = self.chunk_left
            take = self.buf[:before]
            self.buf = self.buf[len(take) :]
            self.chunk_left -= len(take)
            data = take[: max(0, before - 2)]  # the chunk's trailing CRLF is not body
            if data:
                return data
        return b""

    def read_all(self) -> bytes:
        out = bytearray()
        while data := self.read_some():
            out += data
        return bytes(out)

    def read_at_least(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            data = self.read_some()
            if not data:
                break
            out += data
        return bytes(out)

    def close(self) -> None:
        self.sock.close()

    def read_all_and_close(self) -> bytes:
        try:
            return self.read_all()
        finally:
            self.close()


def open_request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    version: str = "HTTP/1.1",
    raw: bytes | None = None,
) -> Response:
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    try:
        sock.sendall(raw if raw is not None else _head(method, path, body, headers, version))
        return Response(sock)
    except BaseException:
        sock.close()
        raise


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | dict[str, Any] | list[Any] | None = None,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
) -> tuple[int, dict[str, str], bytes]:
    if isinstance(body, dict | list):
        body = json.dumps(body).encode()
    r = open_request(port, method, path, body, {"Connection": "close", **(headers or {})}, raw=raw)
    try:
        return r.status, r.headers, r.read_all()
    finally:
        r.close()


def chat_body(max_tokens: int = 16, stream: bool = True, prompt: str = "hello") -> bytes:
    return json.dumps(
        {
            "model": "m",
            "stream": stream,
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": prompt}],
        }
    ).encode()


def post_chat(
    port: int,
    conv: str | None,
    max_tokens: int = 16,
    headers: dict[str, str] | None = None,
    prompt: str = "hello",
) -> Response:
    hs = dict(headers or {})
    if conv is not None:
        hs["X-Conversation-Id"] = conv
    return open_request(
        port, "POST", "/v1/chat/completions", chat_body(max_tokens, prompt=prompt), hs
    )


def sse_events(body: bytes) -> list[bytes]:
    return [e + b"\n\n" for e in body.split(b"\n\n") if e]


def data_of(event: bytes) -> bytes:
    return b"\n".join(ln[6:] for ln in event.split(b"\n") if ln.startswith(b"data: "))


def check_ids(body: bytes, start: int = 0) -> None:
    """Every ``id:`` names the absolute offset just after its event."""
    pos = start
    for ev in sse_events(body):
        pos += len(ev)
        if ev.startswith(b"id: "):
            assert int(ev[4 : ev.index(b"\n")]) == pos, ev[:80]


def error_of(event: bytes) -> dict[str, Any]:
    obj: dict[str, Any] = json.loads(data_of(event))["error"]
    return obj


@contextlib.contextmanager
def server(tmp: Path, *args: str, **kw: Any) -> Iterator[Server]:
    s = Server(tmp, *args, **kw)
    try:
        yield s
    finally:
        s.stop()


def kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
