"""Fixtures of the server tests (``tests/server``): real ``ringcast serve`` process trees on
free ports, raw HTTP clients that see every byte, SSE helpers.

Nothing here sleeps for a fixed time to "let things happen": waits poll a condition and are
bounded by the test's timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import pytest
from ringcast.http.client import HTTPError, ResponseParser
from ringcast.server.store import Quota
from ringcast.wire.sse import frame_event

REPO = Path(__file__).resolve().parents[2]


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
    """A response read incrementally from a raw socket (by ``ringcast.http.client``'s parser);
    the body is de-chunked. ``buf`` is what arrived after it (a pipelined next response)."""

    def __init__(self, sock: socket.socket, buf: bytes = b"") -> None:
        self.sock = sock
        self.parser = ResponseParser()
        self.pending: list[bytes] = self._feed(buf) if buf else []
        while not self.parser.head_done:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError(f"connection closed before the response head: {buf!r}")
            self.pending += self._feed(data)
        self.status = self.parser.status
        self.headers = {k.lower(): v for k, v in self.parser.headers}

    def _feed(self, data: bytes) -> list[bytes]:
        try:
            return self.parser.feed(data)
        except HTTPError as e:
            raise ConnectionError(str(e)) from None

    @property
    def buf(self) -> bytes:
        return self.parser.rest

    def read_some(self) -> bytes:
        """Next body bytes (b"" at the end of the body)."""
        while not self.pending and not self.parser.done:
            data = self.sock.recv(65536)
            if not data:
                try:
                    self.parser.eof()
                except HTTPError as e:
                    raise ConnectionError(str(e)) from None
                break
            self.pending += self._feed(data)
        if not self.pending:
            return b""
        data, self.pending = b"".join(self.pending), []
        return data

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


class Client:
    """Raw HTTP/1.1 to a server on a local port: what a test needs to see every byte."""

    def __init__(self, port: int) -> None:
        self.port = port

    def open_request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        version: str = "HTTP/1.1",
        raw: bytes | None = None,
    ) -> Response:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=60)
        try:
            sock.sendall(raw if raw is not None else _head(method, path, body, headers, version))
            return Response(sock)
        except BaseException:
            sock.close()
            raise

    def request(
        self,
        method: str,
        path: str,
        body: bytes | dict[str, Any] | list[Any] | None = None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """One request on its own connection: status, headers, the whole (de-chunked) body."""
        if isinstance(body, dict | list):
            body = json.dumps(body).encode()
        r = self.open_request(
            method, path, body, {"Connection": "close", **(headers or {})}, raw=raw
        )
        try:
            return r.status, r.headers, r.read_all()
        finally:
            r.close()

    def post_chat(
        self,
        conv: str | None,
        max_tokens: int = 16,
        headers: dict[str, str] | None = None,
        prompt: str = "hello",
    ) -> Response:
        hs = dict(headers or {})
        if conv is not None:
            hs["X-Conversation-Id"] = conv
        return self.open_request(
            "POST", "/v1/chat/completions", _chat_body(max_tokens, prompt=prompt), hs
        )

    def metric(self, name: str) -> float:
        """Sum of the samples of ``ringcast_<name>``; ``name`` may carry labels
        (``'worker_jobs_total{worker="0"}'``), which a sample must have, in any order."""
        want_name, want_labels = _sample_key("ringcast_" + name)
        _, _, body = self.request("GET", "/metrics")
        total = 0.0
        for line in body.decode().splitlines():
            if line.startswith("#") or not line:
                continue
            key, value = line.rsplit(" ", 1)
            got_name, got_labels = _sample_key(key)
            if got_name == want_name and want_labels <= got_labels:
                total += float(value)
        return total


def _die_with_parent() -> None:
    """In the child between fork and exec: SIGKILL when the process that started it ends
    (``prctl(PR_SET_PDEATHSIG)``; kept across exec)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


def _sample_key(text: str) -> tuple[str, set[str]]:
    """``name{a="1",b="2"}`` as its name and the set of its ``label="value"`` pairs."""
    name, _, labels = text.partition("{")
    return name, set(re.findall(r'[a-zA-Z_]+="[^"]*"', labels))


class Server(Client):
    """A ``ringcast serve`` process tree on a free port."""

    def __init__(
        self,
        tmp: Path,
        *args: str,
        http_procs: int | str | None = 2,
        workers: int | None = None,
        segment: Path | None = None,
        env: dict[str, str] | None = None,
        log: Path | None = None,
        prefix: list[str] | None = None,
        new_session: bool = False,
    ) -> None:
        """``log``: a file that gets the server's stderr (its log), instead of the test's;
        ``prefix``: a command that runs the server (e.g. ``prlimit --nofile=256``);
        ``new_session``: the tree gets its own process group (a test kills it whole, and
        :meth:`stop` kills the group if the manager does not stop, or if the stop is cut
        short by a timeout or Ctrl-C). Outside the terminal's process group it would not get
        a Ctrl-C's SIGINT, so its manager also dies with the test process
        (``PR_SET_PDEATHSIG``), however the test process ends (its children die with the
        manager); ``http_procs=None``, ``workers=None`` (the latter's default): no
        ``--http-procs`` or ``--workers``, ringcast's defaults (jobs run in the HTTP
        processes; tests of worker processes give ``workers``)."""
        self.segment = segment or tmp / "seg"
        cmd = [
            *(prefix or []),
            sys.executable,
            "-m",
            "ringcast.cli",
            "serve",
            "--port",
            "0",
            *(["--http-procs", str(http_procs)] if http_procs is not None else []),
            *(["--workers", str(workers)] if workers is not None else []),
            "--segment",
            str(self.segment),
            "--log-level",
            "WARNING",
            *args,
        ]
        self.log = open(log, "w") if log is not None else None
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            cwd=str(tmp),
            env={**os.environ, **(env or {})},
            start_new_session=new_session,
            preexec_fn=_die_with_parent if new_session else None,
        )
        self.new_session = new_session
        assert self.proc.stdout is not None
        try:
            line = self.proc.stdout.readline()
        except BaseException:  # the test's timeout or a Ctrl-C while it starts
            self.kill()
            raise
        m = re.search(r"listening on http://([^:]+):(\d+)", line)
        if not m:
            self.kill()
            raise RuntimeError(f"ringcast serve did not start: {line!r}")
        self.host = m.group(1)
        self.banner = line  # the "listening on" line
        super().__init__(int(m.group(2)))
        self.url = f"http://{self.host}:{self.port}"

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Ask the manager to stop (``sig``) and wait for it; killed (its whole group with
        ``new_session``) if it has not stopped within 30 s or the wait is interrupted."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            return self.kill()
        except BaseException:
            self.kill()
            raise
        finally:
            self._close_files()

    def kill(self) -> int:
        """SIGKILL the manager, and with ``new_session`` every process of its group; never
        raises for a tree that is already gone. Safe to call again."""
        if self.new_session:
            # While any process of the group lives, the kernel keeps its id for the group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
        rc = self.proc.wait()
        self._close_files()
        return rc

    def _close_files(self) -> None:
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if self.log is not None and not self.log.closed:
            self.log.close()

    def children(self, role: str) -> list[int]:
        """Pids of the live ``http`` or ``worker`` children."""
        import psutil

        module = "ringcast.server.http_process" if role == "http" else "ringcast.server.worker"
        out = []
        with contextlib.suppress(psutil.NoSuchProcess):
            for c in psutil.Process(self.proc.pid).children():
                with contextlib.suppress(psutil.NoSuchProcess):
                    if module in c.cmdline() and c.status() != psutil.STATUS_ZOMBIE:
                        out.append(c.pid)
        return out


def _wait_for(
    cond: Callable[[], Any],
    what: str,
    timeout: float = 30.0,
    explain: Callable[[], str] | None = None,
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.02)
    # ``explain``: what the test can still see of the state it waited on, for the report.
    raise AssertionError(f"timed out waiting for {what}" + (f"; {explain()}" if explain else ""))


def _chat_body(max_tokens: int = 16, stream: bool = True, prompt: str = "hello") -> bytes:
    return json.dumps(
        {
            "model": "m",
            "stream": stream,
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": prompt}],
        }
    ).encode()


def _sse_events(body: bytes) -> list[bytes]:
    return [e + b"\n\n" for e in body.split(b"\n\n") if e]


def _data_of(event: bytes) -> bytes:
    return b"\n".join(ln[6:] for ln in event.split(b"\n") if ln.startswith(b"data: "))


def _check_ids(body: bytes, start: int = 0) -> None:
    """Every ``id:`` names the absolute offset just after its event."""
    pos = start
    for ev in _sse_events(body):
        pos += len(ev)
        if ev.startswith(b"id: "):
            assert int(ev[4 : ev.index(b"\n")]) == pos, ev[:80]


def _error_of(event: bytes) -> dict[str, Any]:
    obj: dict[str, Any] = json.loads(_data_of(event))["error"]
    return obj


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------------------------
# Fixtures


class Serve:
    """The ``serve`` fixture: ``with serve(*args, http_procs=.., workers=.., env=..) as s``
    runs ``ringcast serve ARGS`` for the block; ``serve.start(...)`` leaves stopping to the
    test (for kill and restart tests)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp

    def at(self, tmp: Path) -> Serve:
        """The same, with its segment and working directory in ``tmp``."""
        return Serve(tmp)

    def start(self, *args: str, **kw: Any) -> Server:
        return Server(self.tmp, *args, **kw)

    @contextlib.contextmanager
    def __call__(self, *args: str, **kw: Any) -> Iterator[Server]:
        s = Server(self.tmp, *args, **kw)
        try:
            yield s
        finally:
            s.stop()


@pytest.fixture
def serve(tmp_path: Path) -> Serve:
    return Serve(tmp_path)


@pytest.fixture(scope="module")
def serve_module(tmp_path_factory: pytest.TempPathFactory) -> Serve:
    """``serve`` for module-scoped servers."""
    return Serve(tmp_path_factory.mktemp("srv"))


@pytest.fixture(scope="session")
def raw_client() -> Callable[[int], Client]:
    """``raw_client(port)``: raw HTTP to any local port."""
    return Client


@pytest.fixture(scope="session")
def wait_for() -> Callable[..., Any]:
    """``wait_for(cond, what, timeout=30, explain=None)``: poll ``cond`` until it is true (its
    value); on a timeout, the error carries ``explain()``."""
    return _wait_for


@pytest.fixture(scope="session")
def kill() -> Callable[[int], None]:
    """``kill(pid)``: SIGKILL, fine if it is gone."""
    return _kill


@pytest.fixture(scope="session")
def chat_body() -> Callable[..., bytes]:
    return _chat_body


@pytest.fixture(scope="session")
def sse_events() -> Callable[[bytes], list[bytes]]:
    """The events of an SSE body, each with its blank line."""
    return _sse_events


@pytest.fixture(scope="session")
def data_of() -> Callable[[bytes], bytes]:
    """The ``data:`` payload of one event."""
    return _data_of


@pytest.fixture(scope="session")
def error_of() -> Callable[[bytes], dict[str, Any]]:
    """The ``error`` object of an SSE error event."""
    return _error_of


@pytest.fixture(scope="session")
def check_ids() -> Callable[..., None]:
    """``check_ids(body, start=0)``: every ``id:`` names the offset just after its event."""
    return _check_ids


@pytest.fixture(scope="session")
def response() -> type[Response]:
    """``response(sock, buf=b"")``: the next response on an open connection."""
    return Response


# --------------------------------------------------------------------------------------------
# A second stream store: in-process, in memory


class _MemSession:
    """One incarnation of a stream in :class:`MemoryStore`."""

    def __init__(self, conv: str, owner: str, slot: int, generation: int) -> None:
        self.conversation_id = conv
        self.owner = owner
        self.slot = slot
        self.generation = generation
        self.buf = bytearray()
        self.state = "running"
        self.ended: str | None = None  # cancelled / replaced / evicted
        self.producer = 0  # token of the writer handle that may write
        self.started_at = time.time()
        self.completed_at = 0.0
        self.last_write_at = self.started_at
        self.readers = 0
        self.waiters: list[asyncio.Future[None]] = []

    @property
    def is_done(self) -> bool:
        return self.state != "running"

    @property
    def total_bytes(self) -> int:
        return len(self.buf)

    first_available = 0  # nothing is ever dropped

    def wake(self) -> None:
        waiters, self.waiters = self.waiters, []
        for f in waiters:
            if not f.done():
                f.set_result(None)


class _MemWriter:
    def __init__(self, s: _MemSession, token: int, deferred: set[_MemSession]) -> None:
        self.s = s
        self.token = token
        self.deferred = deferred
        s.producer = token

    @property
    def generation(self) -> int:
        return self.s.generation

    @property
    def total_bytes(self) -> int:
        return len(self.s.buf)

    @property
    def cancelled(self) -> bool:
        return self.s.ended is not None

    def _mine(self) -> bool:
        s = self.s
        return s.ended is None and s.state == "running" and s.producer == self.token

    def write(self, data: bytes, progress: bool = True, defer_wake: bool = False) -> bool:
        if not self._mine():
            return False
        self.s.buf += data
        if progress:
            self.s.last_write_at = time.time()
        if defer_wake:
            # As the segment does: waiting readers hear of it at the store's flush_wakes().
            self.deferred.add(self.s)
        else:
            self.s.wake()
        return True

    def write_event(self, event: bytes, defer_wake: bool = False) -> bool:
        return self.write(frame_event(len(self.s.buf), event), defer_wake=defer_wake)

    def finalize(self, state: str = "done", defer_wake: bool = False) -> bool:
        if not self._mine():
            return False
        self.s.state = state
        self.s.completed_at = time.time()
        if defer_wake:
            self.deferred.add(self.s)
        else:
            self.s.wake()
        return True


class _MemReader:
    def __init__(self, store: MemoryStore, s: _MemSession, offset: int, counted: bool) -> None:
        self.store = store
        self.s = s
        self.offset = offset
        self.counted = counted
        if counted:
            s.readers += 1

    @property
    def conversation_id(self) -> str:
        return self.s.conversation_id

    @property
    def slot(self) -> int:
        return self.s.slot

    @property
    def generation(self) -> int:
        return self.s.generation

    @property
    def epoch(self) -> int:
        return self.store.epoch

    def read_nowait(self, max_bytes: int = 1 << 20) -> bytes | None:
        s = self.s
        if s.ended is not None:
            raise _ended(s.ended)
        if self.offset < len(s.buf):
            data = bytes(s.buf[self.offset : self.offset + max_bytes])
            self.offset += len(data)
            return data
        return b"" if s.is_done else None

    async def _aread(self, max_bytes: int) -> bytes:
        while (data := self.read_nowait(max_bytes)) is None:
            f = asyncio.get_running_loop().create_future()
            self.s.waiters.append(f)
            await f
        return data

    def aread(self, max_bytes: int = 1 << 20) -> Any:
        return self._aread(max_bytes)

    def close(self) -> None:
        if self.counted:
            self.counted = False
            self.s.readers -= 1


def _ended(reason: str) -> Exception:
    from ringcast.server.store import session_ended

    return session_ended(reason)


class _MemStats:
    max_sessions = 1024
    bytes_buffered = 0
    resident_bytes = 0
    lru_evictions = 0


class MemoryStore:
    """A :class:`ringcast.server.store.StreamStore` in one process's memory: the fake second
    store the route tests run against, beside the segment. It keeps every byte (no
    ``OffsetLost``), has no capacity limit, and is reachable only from the loop of the
    in-process server that owns it."""

    epoch = 7

    def __init__(self) -> None:
        self.sessions: dict[tuple[str, str], _MemSession] = {}
        self.incarnations = 0
        self.tokens = 0
        self.deferred: set[_MemSession] = set()

    def cancelled_among(self, writers: list[Any]) -> list[int]:
        return [i for i, w in enumerate(writers) if w.cancelled]

    def silent_among(self, writers: list[Any], seconds: float) -> list[int]:
        now = time.time()
        return [
            i for i, w in enumerate(writers) if w._mine() and now - w.s.last_write_at >= seconds
        ]

    def flush_wakes(self, own: Collection[Any] = (), loop: Any = None) -> int:
        # Its readers all share the one loop: ``own`` changes nothing here.
        deferred = list(self.deferred)
        self.deferred.clear()  # the writers hold this very set
        for s in deferred:
            s.wake()
        return len(deferred)

    def _end(self, s: _MemSession, reason: str) -> None:
        s.ended = reason
        s.wake()
        if self.sessions.get((s.owner, s.conversation_id)) is s:
            del self.sessions[(s.owner, s.conversation_id)]

    def _check(self, conv: str) -> None:
        from ringcast import InvalidArgument

        if len(conv.encode()) > 256:
            raise InvalidArgument(f"conversation id longer than 256 bytes: {conv[:20]!r}...")

    def create(self, conversation_id: str, owner: str, quota: Quota | None = None) -> _MemWriter:
        from ringcast import QuotaExceeded

        self._check(conversation_id)
        old = self.sessions.get((owner, conversation_id))
        if quota is not None:

            def counted(s: _MemSession) -> bool:
                return any(
                    s.owner == o and s.conversation_id.startswith(p) for o, p in quota.counted
                )

            running = sum(not s.is_done and counted(s) for s in self.sessions.values())
            if old is not None and not old.is_done and counted(old):
                running -= 1  # replaced: makes room for its replacement
            if running >= quota.max_running:
                e = QuotaExceeded(f"the quota of {quota.max_running} is reached")
                e.max_running = quota.max_running
                raise e
        if old is not None:
            self._end(old, "replaced")
        self.incarnations += 1
        s = _MemSession(conversation_id, owner, self.incarnations, self.incarnations)
        self.sessions[(owner, conversation_id)] = s
        self.tokens += 1
        return _MemWriter(s, self.tokens, self.deferred)

    def adopt(self, conversation_id: str, owner: str, generation: int) -> _MemWriter:
        from ringcast import SessionNotFound

        s = self.sessions.get((owner, conversation_id))
        if s is None or s.generation != generation:
            raise SessionNotFound(conversation_id)
        self.tokens += 1
        return _MemWriter(s, self.tokens, self.deferred)

    async def open_reader(
        self, conversation_id: str, offset: int, owner: str, *, counted: bool = True
    ) -> _MemReader:
        from ringcast import SessionNotFound

        self._check(conversation_id)
        s = self.sessions.get((owner, conversation_id))
        if s is None:
            raise SessionNotFound(conversation_id)
        return _MemReader(self, s, offset, counted)

    async def get(self, conversation_id: str, owner: str) -> _MemSession | None:
        return self.sessions.get((owner, conversation_id))

    async def lookup_prefix(self, prefix: str, owner: str) -> list[_MemSession]:
        self._check(prefix)
        return [
            s
            for (o, c), s in self.sessions.items()
            if o == owner and (c == prefix or c.startswith(prefix + "::"))
        ]

    async def list(self, owner: str | None = None) -> list[_MemSession]:
        return [s for (o, _), s in self.sessions.items() if owner is None or o == owner]

    async def cancel(self, conversation_id: str, owner: str) -> None:
        self._check(conversation_id)
        s = self.sessions.get((owner, conversation_id))
        if s is not None:
            self._end(s, "cancelled")

    async def remove(self, conversation_id: str, owner: str) -> None:
        s = self.sessions.get((owner, conversation_id))
        if s is not None:
            self._end(s, "evicted")

    def stats(self) -> _MemStats:
        stats = _MemStats()
        stats.bytes_buffered = sum(len(s.buf) for s in self.sessions.values())
        return stats


class InProcessServer(Client):
    """The routes and one worker of ``ringcast serve ARGS`` in a thread of this process, on a
    :class:`MemoryStore` instead of the segment: the same ``App``, ``Connection`` and
    ``WorkerApp``, started with the same command line, one HTTP process and one worker."""

    def __init__(self, tmp: Path, *args: str) -> None:
        from ringcast.server.config import config_from_args, configure

        parser = argparse.ArgumentParser()
        configure(parser)
        cfg = config_from_args(parser.parse_args(list(args)))
        cfg.http_procs, cfg.workers = 1, 1
        cfg.run_dir = str(tmp)
        self.cfg = cfg
        self.store = MemoryStore()
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(30) or self._error is not None:
            raise RuntimeError(f"in-process server did not start: {self._error!r}")

    def _run(self) -> None:
        from ringcast.server.child import run_loop

        try:
            run_loop(self.cfg, self._main())
        except BaseException as e:
            self._error = e
            self._ready.set()

    async def _main(self) -> None:
        from ringcast.http.protocol import Connection
        from ringcast.server import rundir
        from ringcast.server.counters import SharedCounters, counter_rows, open_child_counters
        from ringcast.server.routes import App
        from ringcast.server.worker import WorkerApp

        cfg = self.cfg
        SharedCounters(rundir.counters_path(cfg.run_dir), counter_rows(cfg), create=True)
        loop = asyncio.get_running_loop()
        self._loop, self._stop = loop, asyncio.Event()
        app = App(cfg, 0, self.store, open_child_counters(cfg, "http", 0))
        if cfg.coalesce == "adaptive" and cfg.coalesce_ms > 0:
            app.track(loop.create_task(app.coalescing.run()))
        worker = WorkerApp(cfg, self.store, open_child_counters(cfg, "worker", 0), None)
        jobs = await asyncio.start_unix_server(worker.handle, rundir.worker_socket(cfg.run_dir, 0))
        watcher = loop.create_task(worker.watch_cancel())
        server = await loop.create_server(lambda: Connection(app), "127.0.0.1", 0)
        super().__init__(server.sockets[0].getsockname()[1])
        self._ready.set()
        await self._stop.wait()
        server.close()
        jobs.close()
        await worker.shutdown()
        watcher.cancel()
        for c in list(app.connections):
            if c.transport is not None:
                c.transport.abort()
        for t in list(app.background):
            t.cancel()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


@contextlib.contextmanager
def serve_on_store(store: str, tmp: Path, *args: str, **kw: Any) -> Iterator[Client]:
    """``ringcast serve ARGS`` on ``store``: the segment (a real process tree; ``kw`` as for
    ``serve``) or the in-memory fake (one HTTP process and one worker, in this process)."""
    s: Server | InProcessServer = (
        Server(tmp, *args, **kw) if store == "segment" else InProcessServer(tmp, *args)
    )
    try:
        yield s
    finally:
        s.stop()


STORES = ["segment", "memory"]


@pytest.fixture(scope="module", params=STORES)
def store_kind(request: pytest.FixtureRequest) -> str:
    """The stream store a module's route tests run against: each test runs once per store."""
    return str(request.param)


@pytest.fixture(scope="module")
def serve_store(
    store_kind: str, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., contextlib.AbstractContextManager[Client]]:
    """``with serve_store(*args, **kw) as s``: ``ringcast serve ARGS`` on ``store_kind``
    (the segment: a real process tree; the in-memory fake: in this process)."""
    return lambda *args, **kw: serve_on_store(
        store_kind, tmp_path_factory.mktemp(store_kind), *args, **kw
    )


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@contextlib.contextmanager
def _chromium(url: str, profile: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Headless Chromium showing ``url`` for the length of the block (its own profile in
    ``profile``); the test skips where Chromium is not installed (ci/setup.sh installs it)."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium)")
    browser = subprocess.Popen(
        [
            CHROMIUM,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-dev-shm-usage",
            "--disable-extensions",
            f"--user-data-dir={profile}",
            url,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield browser
    finally:
        browser.terminate()
        try:
            browser.wait(10)
        except subprocess.TimeoutExpired:
            browser.kill()
            browser.wait()


@pytest.fixture
def chromium(tmp_path: Path) -> Callable[[str], contextlib.AbstractContextManager[Any]]:
    """``with chromium(url):`` a headless browser on the page at ``url``."""
    return lambda url: _chromium(url, tmp_path / "chromium-profile")


@pytest.fixture
def serve_in_memory(tmp_path: Path) -> Iterator[Callable[..., InProcessServer]]:
    """``serve_in_memory(*args)``: ``ringcast serve ARGS`` in this process on the in-memory
    store (``.store`` is the :class:`MemoryStore`, for a test to watch), stopped after."""
    started: list[InProcessServer] = []

    def start(*args: str) -> InProcessServer:
        s = InProcessServer(tmp_path, *args)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


@pytest.fixture(scope="session")
def bench_module() -> Callable[[str], Any]:
    """``bench_module("kill_campaign")``: a script of ``bench/`` as a module, for a test that
    runs a benchmark's campaign at CI size (``bench/`` goes on ``sys.path`` for the modules
    the script imports)."""
    import importlib

    def load(name: str) -> Any:
        if str(REPO / "bench") not in sys.path:
            sys.path.insert(0, str(REPO / "bench"))
        return importlib.import_module(name)

    return load
