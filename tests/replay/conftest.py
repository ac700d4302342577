"""Fixtures of the record / trace / replay tests (``tests/replay``): ``ringcast``
subcommands as real processes, servers that announce their URL, and the fake upstream that
serves llama-server's captured bytes (``fake_upstream.py``).
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from ringcast.http import client

REPO = Path(__file__).resolve().parents[2]
CAPTURE_NAME = "data/llama-server/llama-server-chat-streams.jsonl"


def _capture_path() -> Path | None:
    """The llama-server capture in ``shared/`` beside the repository (workspace and CI)."""
    # beside the repository (workspace, CI), or beside the worktree it is checked out in
    for cand in (REPO.parent / "shared", REPO / "shared", REPO.parent.parent / "shared"):
        if (cand / CAPTURE_NAME).is_file():
            return cand / CAPTURE_NAME
    return None


def _load_capture(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _ringcast(
    *args: str, timeout: float = 120, check: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run ``ringcast ARGS`` (as ``python -m ringcast.cli``) and capture its output."""
    res = subprocess.run(
        [sys.executable, "-m", "ringcast.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if check and res.returncode != 0:
        raise AssertionError(f"ringcast {' '.join(args)} failed ({res.returncode}):\n{res.stderr}")
    return res


@contextlib.contextmanager
def _spawn_listening(
    cmd: list[str], timeout: float = 60
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Start a server that prints ``listening on http://HOST:PORT``; yield it and its URL."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    drain = None
    try:
        assert proc.stdout is not None
        seen: list[str] = []
        url = None
        for _ in range(200):  # bounded: a server prints a few lines before it listens
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            m = re.search(r"listening on (http://[\w.\-:]+)", line)
            if m:
                url = m.group(1)
                break
        if url is None:
            raise AssertionError(f"server did not start: {''.join(seen)[-2000:]}")
        # Keep draining its output so a chatty server never blocks on a full pipe.
        drain = threading.Thread(target=proc.stdout.read, daemon=True)
        drain.start()
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if drain is not None:
            drain.join(10)
        if proc.stdout is not None:
            proc.stdout.close()


def _fake_upstream(
    capture: Path,
) -> contextlib.AbstractContextManager[tuple[subprocess.Popen[str], str]]:
    script = Path(__file__).with_name("fake_upstream.py")
    return _spawn_listening([sys.executable, str(script), str(capture)])


def _http_request(
    port: int, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One blocking HTTP/1.1 exchange on loopback: status, headers, whole (de-chunked) body."""
    data = json.dumps(body).encode() if body is not None else None
    target = client.parse_url(f"http://127.0.0.1:{port}")
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    parser = client.ResponseParser()
    out = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(client.build_request(method, target, path, hdrs, data))
        while not parser.done:
            chunk = sock.recv(65536)
            if not chunk:
                parser.eof()
                break
            for piece in parser.feed(chunk):
                out += piece
    return parser.status, {k.lower(): v for k, v in parser.headers}, bytes(out)


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture
def capture() -> Path:
    """llama-server's captured chat streams in ``shared/`` beside the repository (the
    workspace layout and CI's); the test is skipped without them."""
    path = _capture_path()
    if path is None:
        pytest.skip("shared/ capture not beside the repo")
    return path


@pytest.fixture(scope="session")
def load_capture() -> Callable[[Path], list[dict[str, Any]]]:
    return _load_capture


@pytest.fixture(scope="session")
def sample_trace() -> Path:
    """The small trace shipped in ``bench/``."""
    return REPO / "bench" / "sample-trace.jsonl"


@pytest.fixture(scope="session")
def ringcast_cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    """``ringcast_cli(*args, timeout=120, check=False)``: run ``ringcast ARGS``."""
    return _ringcast


@pytest.fixture(scope="session")
def spawn_listening() -> Callable[..., Any]:
    """``with spawn_listening(cmd) as (proc, url)``: a server that prints its URL."""
    return _spawn_listening


@pytest.fixture(scope="session")
def fake_upstream() -> Callable[[Path], Any]:
    """``with fake_upstream(capture) as (proc, url)``: the captured streams, served."""
    return _fake_upstream


@pytest.fixture(scope="session")
def http_request() -> Callable[..., tuple[int, dict[str, str], bytes]]:
    """``http_request(port, method, path, body=None, headers=None)``: status, headers, body."""
    return _http_request
