"""The default ``--workers 0``: each HTTP process runs the jobs it takes (docs/SERVER.md,
"Where jobs run"). Real server trees; readers in the producing process are woken by its own
flush, readers in another HTTP process by the segment's notifier as before."""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
from pathlib import Path
from typing import Any

import pytest
import ringcast
from pages import http_chunks
from ringcast import _aio
from ringcast.server.counters import SharedCounters
from ringcast.server.emitter import Emitter, TurnBatch
from ringcast.server.segment_store import SegmentStore

pytestmark = pytest.mark.timeout(90)


def state(srv: Any, conv: str) -> str:
    _, _, body = srv.request("POST", "/v1/streams/lookup", {"conversation_ids": [conv]})
    found = json.loads(body)
    return str(found[0]["state"]) if found else "gone"


def open_on_other_process(srv: Any, index: str, path: str, wait_for: Any) -> Any:
    """A GET of ``path`` answered by an HTTP process other than ``index`` (connections are
    spread by the kernel: retry until one lands there)."""

    def attempt() -> Any:
        r = srv.open_request("GET", path)
        if r.headers["x-ringcast-process"] != index:
            return r
        r.close()
        return None

    return wait_for(attempt, "a connection to the other HTTP process")


def test_the_default_runs_jobs_in_the_http_processes(serve: Any, wait_for: Any) -> None:
    """No worker process; a stream produced in one HTTP process reaches a live reader in the
    other byte for byte, and the POST's own client (in the producing process) the same.
    (Readers stay where they land: passed to the producer, there would be no other.)"""
    with serve("--tokens-per-s", "40", "--no-pass-readers", http_procs=2, workers=None) as s:
        assert "(2 HTTP processes, jobs run in them, " in s.banner
        assert s.children("worker") == []
        r = s.post_chat("shared", max_tokens=60)
        producer = r.headers["x-ringcast-process"]
        first = r.read_at_least(300)
        other = open_on_other_process(s, producer, "/v1/stream?conv_id=shared&from=0", wait_for)
        mine = first + r.read_all_and_close()
        theirs = other.read_all_and_close()
        assert mine == theirs
        assert mine.endswith(b"data: [DONE]\n\n")
        assert mine.count(b"\n\n") == 63  # role chunk, 60 tokens, the final chunk, [DONE]
        assert s.metric(f'worker_jobs_total{{worker="{producer}",outcome="done"}}') == 1
        assert s.metric('worker_jobs_total{outcome="started"}') == 1
        assert s.metric('event_loop_info{role="http"}') == 2
        assert s.metric('event_loop_info{role="worker"}') == 0


def test_delete_from_the_other_process_cancels_the_job(serve: Any, wait_for: Any) -> None:
    with serve("--tokens-per-s", "20", http_procs=2, workers=None) as s:
        r = s.post_chat("doomed", max_tokens=1000)
        producer = r.headers["x-ringcast-process"]
        r.read_at_least(300)

        def delete_elsewhere() -> bool:
            _, headers, _ = s.request("DELETE", "/v1/stream?conv_id=doomed")
            return headers["x-ringcast-process"] != producer

        wait_for(delete_elsewhere, "a DELETE answered by the other HTTP process")
        tail = r.read_all_and_close()
        assert b'"type":"cancelled"' in tail or b"cancelled" in tail
        wait_for(
            lambda: s.metric(f'worker_jobs_total{{worker="{producer}",outcome="cancelled"}}') == 1,
            "the job to stop",
        )


def test_kill_9_of_the_producing_http_process_ends_its_streams_in_band(
    serve: Any, wait_for: Any, kill: Any, sse_events: Any, error_of: Any
) -> None:
    """With the jobs in the HTTP processes, a dead HTTP process is a dead producer: a reader
    in the other process gets every byte that was written, then the in-band
    ``producer_died`` event; the manager restarts the process and new requests work.
    (Readers stay where they land: passed to the producer, it would take them along.)"""
    with serve("--tokens-per-s", "20", "--no-pass-readers", http_procs=2, workers=None) as s:
        r = s.post_chat("orphaned", max_tokens=1000)
        producer = r.headers["x-ringcast-process"]
        r.read_at_least(300)
        other = open_on_other_process(s, producer, "/v1/stream?conv_id=orphaned", wait_for)
        seen = other.read_at_least(300)

        def pid_of(index: str) -> int | None:
            _, headers, body = s.request("GET", "/health")
            return int(json.loads(body)["pid"]) if headers["x-ringcast-process"] == index else None

        pid = wait_for(lambda: pid_of(producer), "the producing process's pid")
        kill(pid)
        r.close()  # its process is gone: its client gets a reset
        seen += other.read_all_and_close()
        last = sse_events(seen)[-1]
        assert error_of(last)["type"] == "producer_died"
        assert last.startswith(f"id: {len(seen)}\n".encode())  # in the ring
        _, _, whole = s.request("GET", "/v1/stream?conv_id=orphaned")
        assert whole == seen
        assert state(s, "orphaned") == "failed"
        wait_for(lambda: len(s.children("http")) == 2, "the HTTP process to be restarted")
        body = wait_for(
            lambda: s.post_chat("after", max_tokens=3).read_all_and_close(), "a new stream"
        )
        assert body.endswith(b"data: [DONE]\n\n")


def test_sigterm_ends_running_jobs_with_server_shutdown(
    serve: Any, sse_events: Any, error_of: Any
) -> None:
    s = serve.start("--tokens-per-s", "20", http_procs=1, workers=None)
    try:
        r = s.post_chat("cut", max_tokens=1000)
        r.read_at_least(300)
        s.proc.send_signal(signal.SIGTERM)
        events = sse_events(r.read_all_and_close())
        assert error_of(events[-1])["type"] == "server_shutdown"
        assert s.proc.wait(30) == 0
    finally:
        s.stop()


def test_a_flush_wakes_its_own_loops_readers_without_a_datagram(tmp_path: Path) -> None:
    """The producer's turn ends with ``Segment.flush_wakes(skip_own=True)`` and a direct call
    into its own loop's hub: a watch of the session in the same loop gets its call, and the
    process's notifier socket gets nothing (no datagram to itself, no extra wake-up)."""
    path = str(tmp_path / "own.seg")
    seg = ringcast.Segment.create(path, max_sessions=8, session_bytes=1 << 16)
    try:

        async def main() -> tuple[list[bytes], list[Any]]:
            store = SegmentStore(seg)
            writer = store.create("c", "")
            reader = seg.reader("c", 0, "", counted=False)
            got: list[bytes] = []

            class Consumer:
                def on_ready(self) -> None:
                    while (data := reader.read_nowait(1 << 16)) is not None and data:
                        got.append(data)

                def on_error(self, exc: BaseException) -> None:
                    raise AssertionError(exc)

            watch = _aio.watch(reader, Consumer())
            counters = SharedCounters(str(tmp_path / "counters"), 1, create=True)
            counters.bind_row(0)
            batch = TurnBatch(store, counters, own_loop=True)
            emitter = Emitter(writer, "chat", "m", counters, batch=batch)
            emitter.text("hello")
            assert got == []  # told at the end of the turn, not at each append
            await asyncio.sleep(0)
            poller = select.poll()
            poller.register(reader.notifier().fileno(), select.POLLIN)
            watch.cancel()
            return got, poller.poll(0)

        got, readable = asyncio.run(main())
        events = b"".join(got)
        assert events.count(b"\n\n") == 2  # the role chunk and the token
        assert b'"content":"hello"' in events
        assert readable == []
    finally:
        seg.close()
        os.unlink(path)


def test_anonymous_streams_of_a_killed_http_process_are_removed(
    serve: Any, wait_for: Any, kill: Any
) -> None:
    """Requests without a conversation id die with their HTTP process (their producer now):
    the manager fails them and then removes them (nobody can read them: their ids were never
    given out), instead of holding their bytes until --ttl."""
    with serve("--tokens-per-s", "20", http_procs=1, workers=None) as s:
        clients = [s.post_chat(None, max_tokens=1000) for _ in range(5)]
        for r in clients:
            r.read_at_least(300)
        assert s.metric('sessions{state="running"}') == 5
        _, _, health = s.request("GET", "/health")
        kill(int(json.loads(health)["pid"]))
        for r in clients:
            r.close()

        def sessions_left() -> float | None:
            try:  # the HTTP process is being restarted meanwhile
                return s.metric("sessions")
            except OSError:
                return None

        wait_for(lambda: sessions_left() == 0, "the orphans' removal", timeout=15)
        assert s.metric("dead_producers_total") == 5


def test_a_job_cancelled_before_its_first_token_stops_in_an_idle_process(
    serve: Any, wait_for: Any
) -> None:
    """Cancellation of a job that appends nothing (a long prefill) is seen only by the
    process's poll, which sleeps while no job runs: the first job must wake it."""
    with serve("--tokens-per-s", "20", "--prefill-s", "600", http_procs=1, workers=None) as s:
        r = s.post_chat("thinking", max_tokens=10)
        assert r.status == 200
        status, _, _ = s.request("DELETE", "/v1/stream?conv_id=thinking")
        assert status == 204
        wait_for(
            lambda: s.metric('worker_jobs_total{outcome="cancelled"}') == 1,
            "the job to stop without appending",
        )
        assert s.metric('worker_jobs_active{worker="0"}') == 0
        assert b"cancelled" in r.read_all_and_close()


def test_the_role_chunk_leaves_with_the_first_token_and_the_final_chunk_with_done(
    serve: Any,
) -> None:
    """Events that always come in pairs go out in one write: the role chunk with the first
    token, the final chunk with ``[DONE]`` (each write is one HTTP chunk on the wire)."""
    import socket

    body = json.dumps(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "max_tokens": 3,
        }
    ).encode()
    with serve("--tokens-per-s", "10", "--prefill-s", "0.3", http_procs=1) as s:
        with socket.create_connection(("127.0.0.1", s.port), timeout=60) as sock:
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                b"X-Conversation-Id: pairs\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            raw = bytearray()
            while data := sock.recv(65536):
                raw += data
    chunks = http_chunks(bytes(raw))
    # Tokens 0.1 s apart are written one by one (a process that lingers, on a loaded
    # machine, may merge more: never fewer per write).
    first, last = chunks[0], chunks[-1]
    assert first.count(b"\n\n") >= 2 and b'"role":"assistant"' in first, chunks
    assert b'"content":"' in first.split(b"\n\n")[1], chunks
    assert last.endswith(b"data: [DONE]\n\n") and b'"finish_reason":"length"' in last, chunks
    assert b"".join(chunks).count(b"\n\n") == 6  # role, 3 tokens, final chunk, [DONE]


BURST_PLUGIN = """
async def burst(ctx):
    import asyncio
    await asyncio.sleep(1.0)  # the readers attach meanwhile
    for i in range(40000):  # then every token in one turn of the loop
        yield "token %d " % i
"""


def test_a_reader_that_stops_reading_holds_up_nobody_in_a_burst(
    serve: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A producer writing through its pump, a burst of appends in one turn, and a client
    whose socket fills in the middle of it: the pass that could not go to that client is
    left to the pump, and so are the appends after it in that turn. Every other reader must
    still get the whole stream (it once got no further: the pump handled the kept pass and
    stopped, and no wake-up came for the rest)."""
    import socket
    import threading

    (tmp_path / "burst_plugin.py").write_text(BURST_PLUGIN)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    with serve(
        "--generator",
        "burst_plugin:burst",
        "--session-bytes",
        "32M",
        "--max-sessions",
        "64",
        http_procs=1,
    ) as s:
        post = s.post_chat("burst", max_tokens=40000)
        assert post.status == 200
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as stuck:
            stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
            stuck.connect(("127.0.0.1", s.port))
            stuck.sendall(b"GET /v1/stream?conv_id=burst&from=0 HTTP/1.1\r\nHost: x\r\n\r\n")
            got: dict[str, bytes] = {}

            def read_get(name: str) -> None:
                status, _, body = s.request("GET", "/v1/stream?conv_id=burst&from=0")
                got[name] = body if status == 200 else b""

            readers = [threading.Thread(target=read_get, args=(f"get{i}",)) for i in range(2)]
            for t in readers:
                t.start()
            whole_post = post.read_all_and_close()
            for t in readers:
                t.join(60)
        assert whole_post.endswith(b"data: [DONE]\n\n"), whole_post[-200:]
        status, _, replay = s.request("GET", "/v1/stream?conv_id=burst&from=0")
        assert status == 200 and replay.endswith(b"data: [DONE]\n\n")
        assert got == {"get0": replay, "get1": replay}


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_connections_on_the_port_get_tcp_nodelay_on_either_event_loop(loop_kind: str) -> None:
    """The HTTP processes leave TCP_NODELAY to the event loop: uvloop sets it on every TCP
    connection, asyncio only on those whose socket says it is TCP, which the listening
    socket (and so every accepted one) must then say."""
    import socket

    import uvloop
    from ringcast.server.config import ServeConfig
    from ringcast.server.http_process import _bound_socket

    cfg = ServeConfig(host="127.0.0.1", port=0)
    seen: list[int] = []

    class Probe(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            sock = transport.get_extra_info("socket")
            seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Probe, sock=_bound_socket(cfg))
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.01)
        writer.close()
        server.close()

    (uvloop.run if loop_kind == "uvloop" else asyncio.run)(main())
    assert seen and seen[0] != 0


def test_bytes_sent_are_counted_exactly_when_the_producer_writes_through(
    serve: Any, wait_for: Any
) -> None:
    """Passes written through are counted in Rust (no Python step per event): the metric
    still equals the body bytes the clients got, no more."""
    import time

    with serve("--tokens-per-s", "40", "--prefill-s", "0.5", http_procs=1) as s:
        post = s.post_chat("counted", max_tokens=30)
        live = s.open_request("GET", "/v1/stream?conv_id=counted&from=0")
        whole = post.read_all_and_close()
        assert whole.endswith(b"data: [DONE]\n\n")
        assert live.read_all_and_close() == whole
        wait_for(lambda: s.metric("http_bytes_sent_total") == 2 * len(whole), "the count")
        time.sleep(0.3)  # a few of the counter's flushes: nothing more comes
        assert s.metric("http_bytes_sent_total") == 2 * len(whole)
