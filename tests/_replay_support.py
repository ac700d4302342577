"""Helpers for the record / trace / replay tests: run ``ringcast`` subcommands as real
processes, and a fake OpenAI-compatible upstream that serves llama-server's captured bytes.

The fake upstream runs in its own process (``python tests/_replay_support.py upstream
CAPTURE``): for each streaming POST it finds the captured stream whose request has the same
messages and writes its events, one HTTP chunk each, at their captured times.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CAPTURE_NAME = "data/llama-server/llama-server-chat-streams.jsonl"


def capture_path() -> Path | None:
    """The llama-server capture in ``shared/`` beside the repository (workspace and CI)."""
    for cand in (REPO.parent / "shared", REPO / "shared"):
        if (cand / CAPTURE_NAME).is_file():
            return cand / CAPTURE_NAME
    return None


def load_capture(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def ringcast(
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
def spawn_listening(
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


def fake_upstream(
    capture: Path,
) -> contextlib.AbstractContextManager[tuple[subprocess.Popen[str], str]]:
    return spawn_listening(
        [sys.executable, str(Path(__file__).resolve()), "upstream", str(capture)]
    )


def request(
    port: int, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One blocking HTTP/1.1 exchange on loopback: status, headers, whole (de-chunked) body."""
    from ringcast import _http

    data = json.dumps(body).encode() if body is not None else None
    target = _http.parse_url(f"http://127.0.0.1:{port}")
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    parser = _http.ResponseParser()
    out = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(_http.build_request(method, target, path, hdrs, data))
        while not parser.done:
            chunk = sock.recv(65536)
            if not chunk:
                parser.eof()
                break
            for piece in parser.feed(chunk):
                out += piece
    return parser.status, {k.lower(): v for k, v in parser.headers}, bytes(out)


def strip_ids(body: bytes) -> bytes:
    """Remove ringcast's ``id:`` lines: what is left is the recorded bytes."""
    return re.sub(rb"(?m)^id: \d+\n", b"", body)


# --------------------------------------------------------------------------------------------
# The fake upstream process


async def _serve_capture(capture: Path) -> None:
    streams = load_capture(capture)
    by_messages = {json.dumps(s["request"]["messages"], sort_keys=True): s for s in streams}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            t0 = asyncio.get_running_loop().time()
            length = 0
            for line in head.decode("latin-1").split("\r\n")[1:]:
                k, _, v = line.partition(":")
                if k.strip().lower() == "content-length":
                    length = int(v)
            body = json.loads(await reader.readexactly(length)) if length else {}
            s = by_messages.get(json.dumps(body.get("messages"), sort_keys=True))
            if s is None:
                msg = b'{"error":{"code":404,"message":"no such captured request"}}'
                writer.write(
                    b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(msg), msg)
                )
                return
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            )
            loop = asyncio.get_running_loop()
            for ev in s["events"]:
                delay = t0 + ev["t"] - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                data = ev["data"].encode()
                writer.write(b"%x\r\n%s\r\n" % (len(data), data))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    print(f"fake upstream listening on http://127.0.0.1:{port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if sys.argv[1:2] == ["upstream"]:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve_capture(Path(sys.argv[2])))
