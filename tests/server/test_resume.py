"""Byte-exact resume over raw sockets: disconnect mid-stream, resume from the byte count."""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ringcast.wire.sse import error_event

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module", params=["uvloop", "asyncio"])
def srv(request: pytest.FixtureRequest, serve_store: Any) -> Iterator[Any]:
    """Per event loop and per stream store (the segment with two HTTP processes, or the
    in-memory fake)."""
    with serve_store(
        "--tokens-per-s", "200", "--http-procs", "2", "--event-loop", request.param
    ) as s:
        yield s


def test_disconnect_and_resume_is_byte_identical(srv: Any, sse_events, data_of, check_ids) -> None:
    r = srv.post_chat("resume-1", max_tokens=120)
    assert r.status == 200
    assert r.headers["content-type"] == "text/event-stream"
    first = r.read_at_least(700)
    r.close()  # the client goes away mid-stream; the generation goes on
    assert not first.endswith(b"data: [DONE]\n\n")
    g = srv.open_request("GET", f"/v1/stream?conv_id=resume-1&from={len(first)}")
    assert g.status == 200
    assert g.headers["x-ringcast-offset"] == str(len(first))
    assert g.headers["x-ringcast-first-available"] == "0"
    rest = g.read_all_and_close()
    status, headers, whole = srv.request("GET", "/v1/stream/resume-1?from=0")
    assert status == 200
    assert headers["x-ringcast-epoch"] == g.headers["x-ringcast-epoch"]
    assert first + rest == whole
    assert whole.endswith(b"data: [DONE]\n\n")
    check_ids(whole)
    chunks = [json.loads(data_of(e)) for e in sse_events(whole)[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["usage"]["completion_tokens"] == 120


def test_a_resume_that_names_its_generation_is_refused_once_the_id_was_replaced(
    srv: Any,
) -> None:
    """Without ``generation`` a resume after a replace splices the new stream's bytes from
    that offset onto the old one's (the offsets are per stream); with the value the old
    stream's responses gave, it is a 409 instead."""
    r = srv.post_chat("gen-1", max_tokens=200)
    old = r.headers["x-ringcast-generation"]
    first = r.read_at_least(700)
    r.close()
    # The same generation is given by every read of that stream, on any process.
    g = srv.open_request("GET", f"/v1/stream?conv_id=gen-1&from={len(first)}&generation={old}")
    assert (g.status, g.headers["x-ringcast-generation"]) == (200, old)
    g.close()
    srv.post_chat("gen-1", max_tokens=5, prompt="another").read_all_and_close()
    status, _, body = srv.request(
        "GET", f"/v1/stream?conv_id=gen-1&from={len(first)}&generation={old}"
    )
    assert status == 409, body
    assert json.loads(body)["error"]["type"] == "replaced"
    # The new stream, read from 0 under its own generation, is whole.
    new = srv.request("GET", "/v1/stream?conv_id=gen-1&from=0")[1]["x-ringcast-generation"]
    assert new != old
    status, _, whole = srv.request("GET", f"/v1/stream?conv_id=gen-1&from=0&generation={new}")
    assert status == 200 and whole.endswith(b"data: [DONE]\n\n")
    # A value of another epoch (a segment made before this one) names another stream too.
    other = "1" + new
    status, _, body = srv.request("GET", f"/v1/stream?conv_id=gen-1&generation={other}")
    assert status == 409, body
    for bad in ("1", "a.b.c", "1.2.3.4", "-1.2.3", "1.2.3&generation=1.2.3"):
        status, _, body = srv.request("GET", f"/v1/stream?conv_id=gen-1&generation={bad}")
        assert status == 400, bad


def test_resume_mid_event_joins_exactly(srv: Any) -> None:
    srv.post_chat("resume-2", max_tokens=10).read_all_and_close()
    _, _, whole = srv.request("GET", "/v1/stream?conv_id=resume-2")
    for cut in (1, 7, len(whole) // 2, len(whole) - 1, len(whole)):
        _, _, tail = srv.request("GET", f"/v1/stream?conv_id=resume-2&from={cut}")
        assert whole[:cut] + tail == whole


def test_last_event_id_resumes_like_from(srv: Any, sse_events) -> None:
    body = srv.post_chat("resume-3", max_tokens=10).read_all_and_close()
    events = sse_events(body)
    third = int(events[2][4 : events[2].index(b"\n")])
    _, _, tail = srv.request(
        "GET", "/v1/stream?conv_id=resume-3&from=0", headers={"Last-Event-ID": str(third)}
    )
    assert body[third:] == tail
    assert tail.startswith(events[3])


def test_resume_through_another_http_process(srv: Any, store_kind: str, wait_for) -> None:
    if store_kind == "memory":
        pytest.skip("the in-process store serves from one HTTP process")
    r = srv.post_chat("resume-4", max_tokens=150)
    post_proc = r.headers["x-ringcast-process"]
    first = r.read_at_least(500)
    r.close()

    def other_process() -> tuple[str, bytes] | None:
        g = srv.open_request("GET", f"/v1/stream?conv_id=resume-4&from={len(first)}")
        if g.headers["x-ringcast-process"] == post_proc:
            g.close()
            return None
        return g.headers["x-ringcast-process"], g.read_all_and_close()

    proc, rest = wait_for(other_process, "a connection landing on the other HTTP process")
    assert proc != post_proc
    _, _, whole = srv.request("GET", "/v1/stream?conv_id=resume-4")
    assert first + rest == whole
    assert whole.endswith(b"data: [DONE]\n\n")


def test_many_readers_get_the_same_bytes(srv: Any) -> None:
    r = srv.post_chat("fan-1", max_tokens=60)
    readers = [srv.open_request("GET", "/v1/stream?conv_id=fan-1") for _ in range(8)]
    own = r.read_all_and_close()
    assert all(g.read_all_and_close() == own for g in readers)


def test_from_at_or_beyond_the_end(srv: Any) -> None:
    body = srv.post_chat("end-1", max_tokens=3).read_all_and_close()
    total = len(body)
    # At the end of a finished stream: the client has everything; nothing more, no error.
    status, _, tail = srv.request("GET", f"/v1/stream?conv_id=end-1&from={total}")
    assert (status, tail) == (200, b"")
    # A browser's EventSource reconnecting there (Last-Event-ID) is told to stop: 204.
    for last in (total, total + 1):
        status, _, tail = srv.request(
            "GET", "/v1/stream?conv_id=end-1", headers={"Last-Event-ID": str(last)}
        )
        assert (status, tail) == (204, b"")
    # Beyond it: the client's byte count is wrong, and it is told so, with the real total.
    for what, offset, path, sent in (
        ("'from'", total + 1, f"/v1/stream?conv_id=end-1&from={total + 1}", {}),
        ("'from'", 10**18, f"/v1/stream/end-1?from={10**18}", {}),
    ):
        status, headers, err = srv.request("GET", path, headers=sent)
        assert status == 416, path
        assert headers["content-type"] == "application/json"
        assert json.loads(err)["error"] == {
            "code": 416,
            "message": f"{what} {offset} is beyond the end of the stream, which finished with "
            f"{total} bytes; resume from an offset of at most {total}",
            "type": "invalid_request_error",
        }
    # The stream itself is untouched.
    assert srv.request("GET", "/v1/stream?conv_id=end-1")[2] == body
    # Beyond the end of a running stream: held until the stream gets there.
    r = srv.post_chat("end-2", max_tokens=80)
    head = r.read_at_least(100)
    g = srv.open_request("GET", f"/v1/stream?conv_id=end-2&from={len(head) + 2000}")
    assert g.status == 200
    tail = g.read_all_and_close()
    whole = head + r.read_all_and_close()
    assert whole[len(head) + 2000 :] == tail


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_stream_that_ends_short_of_a_held_offset_says_so(
    tmp_path: Path, loop: str, serve, wait_for
) -> None:
    """A read held beyond the end of a running stream gets an in-band 416 event, not a silent
    empty end, when the stream finishes before reaching its offset."""
    # --prefill-s: the reads below attach while the stream is running and still empty.
    with serve("--event-loop", loop, "--tokens-per-s", "0", "--prefill-s", "1", http_procs=1) as s:
        s.post_chat("short", max_tokens=5).close()
        # The POST's reader is gone, so the first held read makes the process's pump for the
        # session at its offset and the second joins it; the third waits on its own reader.
        wait_for(lambda: s.metric("http_readers_active") == 0, "the POST's reader to go")
        far = 10**6
        held = [
            s.open_request("GET", f"/v1/stream?conv_id=short&from={far}"),
            s.open_request("GET", "/v1/stream?conv_id=short", headers={"Last-Event-ID": str(far)}),
            s.open_request("GET", f"/v1/stream/short?from={far + 1}"),
        ]
        assert [g.status for g in held] == [200, 200, 200]  # attached while it was running
        bodies = [g.read_all_and_close() for g in held]
        _, _, whole = s.request("GET", "/v1/stream?conv_id=short")
        assert whole.endswith(b"data: [DONE]\n\n")  # it finished normally...
        total = len(whole)
        assert total < far  # ...short of every held offset
        for body, start in zip(bodies, (far, far, far + 1), strict=True):
            assert body == error_event(
                416,
                f"the stream finished with {total} bytes, short of offset {start} that this "
                f"read asked for; resume from an offset of at most {total}",
                "invalid_request_error",
            )
        # Asked again now that it has finished: a 416 at once.
        assert s.request("GET", f"/v1/stream?conv_id=short&from={far}")[0] == 416


def test_keep_alive_and_pipelining(srv: Any, response) -> None:
    r = srv.open_request("GET", "/health")
    assert r.status == 200
    assert json.loads(r.read_all())["status"] == "ok"
    r.sock.sendall(
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    r2 = response(r.sock, r.buf)
    assert r2.status == 200
    assert json.loads(r2.read_all())["object"] == "list"
    r3 = response(r.sock, r2.buf)
    assert r3.headers["connection"] == "close"
    assert json.loads(r3.read_all())["status"] == "ok"
    assert r.sock.recv(1) == b""  # closed as asked
    r.close()


def lookup(srv: Any, conv: str) -> dict[str, object]:
    _, _, info = srv.request("POST", "/v1/streams/lookup", {"conversation_ids": [conv]})
    found: list[dict[str, object]] = json.loads(info)
    return found[0] if found else {}


def test_offset_lost_is_410_and_in_band(
    tmp_path: Path, serve, wait_for, sse_events, error_of, response
) -> None:
    # --prefill-s: the slow reader below attaches during the simulated prompt processing.
    with serve(
        "--tokens-per-s",
        "0",
        "--session-bytes",
        "8192",
        "--http-procs",
        "1",
        "--prefill-s",
        "1",
    ) as s:
        s.post_chat("small", max_tokens=400).close()
        wait_for(lambda: lookup(s, "small").get("is_done"), "the stream to finish")
        status, _, err = s.request("GET", "/v1/stream?conv_id=small&from=0")
        assert status == 410
        detail = json.loads(err)["error"]
        first = detail["first_available"]
        assert detail["type"] == "offset_lost"
        assert first == lookup(s, "small")["first_available"]
        assert first > 0
        _, _, tail = s.request("GET", f"/v1/stream?conv_id=small&from={first}")
        assert len(tail) == lookup(s, "small")["total_bytes"] - first
        assert tail.endswith(b"data: [DONE]\n\n")
        # A reader that stops reading never slows the producer; when it reads again it is
        # told in-band that it fell behind, with the first available offset.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", s.port))
        s.post_chat("small-2", max_tokens=30000).close()
        sock.sendall(b"GET /v1/stream?conv_id=small-2 HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_for(lambda: lookup(s, "small-2").get("is_done"), "the stream to finish", 60)
        tail = response(sock).read_all_and_close()
        last = sse_events(tail)[-1]
        assert error_of(last)["type"] == "offset_lost"
        assert error_of(last)["first_available"] > 0


def test_ids_and_error_framing_helpers() -> None:
    from ringcast.wire.sse import frame_event

    total = 0
    for n in (0, 1, 80, 90, 94, 95, 96, 990, 9990):
        ev = frame_event(total, b"data: " + b"x" * n + b"\n\n")
        total += len(ev)
        assert int(ev[4 : ev.index(b"\n")]) == total


def test_a_stalled_reader_holds_up_nobody_and_loses_nothing(
    tmp_path: Path, serve, response
) -> None:
    # One HTTP process, so every reader shares that process's pump for the session.
    # 40,000 tokens (~8 MB) outgrow the kernel's socket buffers (tcp_wmem max is 4 MiB), so the
    # stalled connection's transport buffer fills; a 32 MiB ring keeps every byte.
    with serve(
        "--tokens-per-s",
        "0",
        "--http-procs",
        "1",
        "--prefill-s",
        "1",
        "--session-bytes",
        str(32 << 20),
    ) as s:
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(("127.0.0.1", s.port))
        r = s.post_chat("stall", max_tokens=40000)
        stalled.sendall(b"GET /v1/stream?conv_id=stall HTTP/1.1\r\nHost: x\r\n\r\n")
        fast = [s.open_request("GET", "/v1/stream?conv_id=stall") for _ in range(4)]
        whole = r.read_all_and_close()
        assert whole.endswith(b"data: [DONE]\n\n")
        assert all(f.read_all_and_close() == whole for f in fast)
        # The stalled reader was detached from the pump and resumes where it stopped.
        assert response(stalled).read_all_and_close() == whole
        assert s.metric("slow_readers_detached_total") >= 1


def test_a_detached_reader_of_a_replaced_stream_gets_its_end_not_the_new_one(
    tmp_path: Path, serve, response, wait_for, sse_events, error_of
) -> None:
    """A reader detached from the pump (its socket stalled) goes on alone from its offset by
    opening a new reader; if a newer request took the conversation id meanwhile, that reader
    must not be one of the new stream: the client gets its own stream's bytes, then the
    ``replaced`` event (it once got the new stream's bytes spliced on at its offset)."""
    # The prefill lets the stalled reader join the pump at offset 0 before the first token,
    # as in the test above (a reader that arrives behind reads alone and is never detached).
    with serve(
        "--tokens-per-s", "0", "--prefill-s", "1", "--http-procs", "1",
        "--session-bytes", str(32 << 20),
    ) as s, socket.socket() as stalled:  # fmt: skip
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(("127.0.0.1", s.port))
        first = s.post_chat("swap", max_tokens=40000, prompt="the first")
        stalled.sendall(b"GET /v1/stream?conv_id=swap HTTP/1.1\r\nHost: x\r\n\r\n")
        old = first.read_all_and_close()
        assert old.endswith(b"data: [DONE]\n\n")
        wait_for(
            lambda: s.metric("slow_readers_detached_total") >= 1, "the stalled reader's detach"
        )
        new = s.post_chat("swap", max_tokens=40000, prompt="a second one").read_all_and_close()
        got = response(stalled).read_all_and_close()
        events = sse_events(got)
        assert error_of(events[-1])["type"] == "replaced"
        body = got[: len(got) - len(events[-1])]
        assert body and old.startswith(body), "bytes that are not the first stream's"
        assert body.endswith(b"\n\n"), "the end event follows a whole event"
        new_id = json.loads(sse_events(new)[0].split(b"data: ", 1)[1])["id"]
        assert new_id.encode() not in got


def _listen_drops() -> int:
    """The kernel's count of connections dropped because a listener's queue was full (this
    network namespace, all listeners)."""
    with open("/proc/net/netstat") as f:
        rows = [line.split() for line in f if line.startswith("TcpExt:")]
    names, values = rows[0], rows[1]
    return int(values[names.index("ListenDrops")])


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_burst_of_reconnects_is_queued_not_dropped(
    tmp_path: Path, loop: str, serve, response
) -> None:
    """After a network blip every client of a stream reconnects at once. An HTTP process that
    is busy (here: stopped) must find them all queued when it gets to them: a listen queue of
    100 (asyncio's default) drops the SYNs past the hundredth, and each of those clients waits
    1 s, then 3 s, for its retransmission."""
    with open("/proc/sys/net/core/somaxconn") as f:
        somaxconn = int(f.read())
    n = min(400, somaxconn)
    if n < 300:
        pytest.skip(f"net.core.somaxconn is {somaxconn}: too small to queue a burst of 300")
    with serve("--event-loop", loop, http_procs=1) as s:
        (pid,) = s.children("http")
        socks: list[socket.socket] = []
        os.kill(pid, signal.SIGSTOP)
        try:
            drops0 = _listen_drops()
            for _ in range(n):
                c = socket.socket()
                c.setblocking(False)
                socks.append(c)
                assert c.connect_ex(("127.0.0.1", s.port)) in (0, errno.EINPROGRESS)
            # Every handshake completes while the process is stopped: the kernel holds them.
            poller = select.poll()
            for c in socks:
                poller.register(c, select.POLLOUT)
            pending = {c.fileno() for c in socks}
            deadline = time.monotonic() + 5.0
            while pending and time.monotonic() < deadline:
                for fd, _ in poller.poll(100):
                    pending.discard(fd)
                    poller.unregister(fd)
            assert _listen_drops() == drops0, "the listen queue overflowed"
            assert not pending, f"{len(pending)} of {n} connections never completed"
        finally:
            os.kill(pid, signal.SIGCONT)
        try:
            for c in socks:
                c.setblocking(True)
                c.settimeout(60)
                c.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            statuses = [response(c).status for c in socks]
            assert statuses == [200] * n
        finally:
            for c in socks:
                c.close()
