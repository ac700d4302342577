"""Durable Streams under ``/ds``: the ``durable-streams`` Python client (PyPI) against a real
``ringcast serve``: write, read back, live tails, resume from a saved offset across two HTTP
processes, ``kill -9`` of an HTTP process under tailing clients, per-key isolation, and a
conversation read as a Durable Stream. The protocol's details are checked by the official
conformance suite (``ci/test-conformance.sh``)."""

from __future__ import annotations

import json
import threading
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from durable_streams import DurableStream, stream

pytestmark = pytest.mark.timeout(120)

TEXT = "text/plain"


def messages(n: int) -> list[bytes]:
    """Deterministic appends of varied length, some with newlines (SSE must keep them)."""
    return [
        (f"msg {i:04d} " + "x" * (i % 37) + ("\nline two" if i % 5 == 0 else "")).encode()
        for i in range(n)
    ]


def sse_payload(event: bytes) -> bytes:
    """The data of one SSE event as a parser sees it (one space after ``data:`` is not data)."""
    lines = [ln[5:] for ln in event.split(b"\n") if ln.startswith(b"data:")]
    return b"\n".join(ln[1:] if ln.startswith(b" ") else ln for ln in lines)


def append_raw(srv: Any, path: str, data: bytes, producer: tuple[str, int, int]) -> int:
    """One idempotent append on a new connection (so the kernel spreads appends over the HTTP
    processes); retried on a dropped connection: the producer sequence makes a retry of an
    append that did land a 204 duplicate, never a second copy. Returns the answering process."""
    pid, epoch, seq = producer
    headers = {
        "Content-Type": TEXT,
        "Producer-Id": pid,
        "Producer-Epoch": str(epoch),
        "Producer-Seq": str(seq),
    }
    for _ in range(50):
        try:
            status, hs, _ = srv.request("POST", path, data, headers)
        except OSError:
            continue
        assert status in (200, 204), (status, hs)
        return int(hs["x-ringcast-process"])
    raise AssertionError("append kept failing")


def test_client_writes_reads_tails_and_resumes_across_two_http_processes(serve) -> None:
    # Every use of the client gets a pool that is closed at the end: the client leaves the
    # sockets of its own pools to the garbage collector.
    with serve(http_procs=2) as s, httpx.Client() as http, httpx.Client() as tail_http:
        url = f"{s.url}/ds/v1/stream/chat-log"
        handle = DurableStream.create(url, content_type=TEXT, client=http)
        first = messages(10)
        for m in first:
            handle.append(m)
        with stream(url, live=False, client=http) as res:
            assert res.read_bytes() == b"".join(first)
            saved = res.offset

        # A live tail (long-poll) started now sees what is appended after it, appended through
        # both HTTP processes.
        later = messages(60)[10:]
        got = bytearray()
        tail_offset: list[str] = []

        def tail() -> None:
            with stream(url, offset=saved, live="long-poll", client=tail_http) as res:
                for ev in res.iter_events(mode="bytes"):
                    got.extend(ev.data)
                    tail_offset.append(ev.next_offset)
                    if len(got) >= sum(map(len, later)):
                        return

        t = threading.Thread(target=tail)
        t.start()
        processes = {
            append_raw(s, "/ds/v1/stream/chat-log", m, ("w", 0, i)) for i, m in enumerate(later)
        }
        t.join(60)
        assert not t.is_alive()
        assert bytes(got) == b"".join(later)
        # Both processes appended (the producer role moved between them with each append).
        extra = 0
        while processes != {0, 1} and extra < 200:
            data = f"more {extra}".encode()
            processes.add(append_raw(s, "/ds/v1/stream/chat-log", data, ("w", 0, 50 + extra)))
            later.append(data)
            extra += 1
        assert processes == {0, 1}

        # Resume from the offset saved before the tail: exactly the bytes after it.
        with stream(url, offset=saved, live=False, client=http) as res:
            assert res.read_bytes() == b"".join(later)
        with stream(url, offset=tail_offset[-1], live=False, client=http) as res:
            assert res.read_bytes() == b"".join(later)[len(got) :]
        with stream(url, live=False, client=http) as res:
            assert res.read_bytes() == b"".join(first + later)


def test_kill_9_of_an_http_process_under_tailing_clients(serve, kill, wait_for) -> None:
    """Each client resumes from its saved offset after its connection dies with the process,
    and ends with exactly the stream's bytes."""
    with serve(http_procs=2) as s, httpx.Client() as http:
        path = "/ds/v1/stream/tailed"
        url = s.url + path
        DurableStream.create(url, content_type=TEXT, client=http)
        sent = messages(120)
        want = b"".join(sent)
        results: dict[str, bytes] = {}
        resumes: dict[str, int] = {}
        started = threading.Barrier(5)

        def tailer(name: str, live: str) -> None:
            got = bytearray()
            offset = "-1"
            resumes[name] = 0
            started.wait()
            while len(got) < len(want):
                try:
                    # Its own connection pool, closed here: the client leaves the sockets of a
                    # dropped connection to the garbage collector otherwise.
                    with (
                        httpx.Client() as http,
                        stream(url, offset=offset, live=live, client=http) as res,  # type: ignore[arg-type]
                    ):
                        mode = "text" if live == "sse" else "bytes"
                        for ev in res.iter_events(mode=mode):
                            data = ev.data.encode() if isinstance(ev.data, str) else ev.data
                            got.extend(data)
                            offset = ev.next_offset
                            if len(got) >= len(want):
                                break
                except Exception:
                    resumes[name] += 1  # the connection died: resume from the saved offset
            results[name] = bytes(got)

        threads = [
            threading.Thread(target=tailer, args=(f"{live}-{i}", live))
            for live in ("long-poll", "sse")
            for i in range(2)
        ]
        for t in threads:
            t.start()
        started.wait()
        for i, m in enumerate(sent[:60]):
            append_raw(s, path, m, ("writer", 0, i))
        victims = s.children("http")
        assert len(victims) == 2
        kill(victims[0])
        for i, m in enumerate(sent[60:], start=60):
            append_raw(s, path, m, ("writer", 0, i))
        for t in threads:
            t.join(90)
        assert not any(t.is_alive() for t in threads)
        assert set(results) == {"long-poll-0", "long-poll-1", "sse-0", "sse-1"}
        for name, got in results.items():
            assert got == want, name
        wait_for(lambda: len(s.children("http")) == 2, "the HTTP process to be restarted")
        with stream(url, live=False, client=http) as res:
            assert res.read_bytes() == want


def test_streams_are_per_key(serve, raw_client) -> None:
    with serve("--api-key", "key-a", "--api-key", "key-b") as s:
        a = {"Authorization": "Bearer key-a"}
        b = {"X-Api-Key": "key-b"}
        path = "/ds/v1/stream/shared-name"
        assert s.request("PUT", path, b"from a", {**a, "Content-Type": TEXT})[0] == 201
        # Without a key: 401; with another key the stream does not exist there.
        assert s.request("GET", path)[0] == 401
        for method in ("GET", "HEAD", "DELETE"):
            assert s.request(method, path, headers=b)[0] == 404, method
        assert s.request("POST", path, b"x", {**b, "Content-Type": TEXT})[0] == 404
        # The other key's stream of the same name is its own.
        assert (
            s.request("PUT", path, b"from b", {**b, "Content-Type": "application/json"})[0] == 400
        )
        assert s.request("PUT", path, b"[1]", {**b, "Content-Type": "application/json"})[0] == 201
        assert s.request("GET", path, headers=a)[2] == b"from a"
        assert s.request("GET", path, headers=b)[2] == b"[1]"
        assert s.request("DELETE", path, headers=b)[0] == 204
        assert s.request("GET", path, headers=a)[2] == b"from a"
        # Conversations too.
        s.post_chat("conv", max_tokens=3, headers=a).read_all_and_close()
        assert s.request("GET", "/ds/v1/conversations/conv", headers=a)[0] == 200
        assert s.request("GET", "/ds/v1/conversations/conv", headers=b)[0] == 404


def test_a_conversation_reads_as_a_closed_durable_stream(serve) -> None:
    with serve("--tokens-per-s", "200") as s, httpx.Client() as http:
        s.post_chat("conv/with::model", max_tokens=40).read_all_and_close()
        _, _, ring = s.request("GET", "/v1/stream?conv_id=conv%2Fwith%3A%3Amodel")
        assert ring.endswith(b"data: [DONE]\n\n")
        url = f"{s.url}/ds/v1/conversations/conv%2Fwith%3A%3Amodel"
        with stream(url, live=False, client=http) as res:
            assert res.read_bytes() == ring
        status, hs, _ = s.request("HEAD", "/ds/v1/conversations/conv%2Fwith%3A%3Amodel")
        assert status == 200
        assert hs["content-type"] == "text/event-stream"
        assert hs["stream-closed"] == "true"
        # Read-only.
        status, _, _ = s.request(
            "POST", "/ds/v1/conversations/conv%2Fwith%3A%3Amodel", b"x", {"Content-Type": TEXT}
        )
        assert status == 405


def test_a_running_conversation_tails_over_sse_to_its_end(serve) -> None:
    with serve("--tokens-per-s", "50") as s:
        gen = s.post_chat("live", max_tokens=30)
        status, _, body = s.request("GET", "/ds/v1/conversations/live?offset=-1&live=sse")
        gen.read_all_and_close()
        assert status == 200
        events = [e for e in body.replace(b"\r\n", b"\n").split(b"\n\n") if e]
        data = [e for e in events if e.startswith(b"event: data\n")]
        controls = [
            json.loads(e.split(b"data:", 1)[1]) for e in events if e.startswith(b"event: control\n")
        ]
        assert controls[-1]["streamClosed"] is True
        joined = b"".join(sse_payload(e) for e in data)
        _, _, ring = s.request("GET", "/v1/stream?conv_id=live")
        assert joined == ring
        assert ring.endswith(b"data: [DONE]\n\n")


def test_a_process_whose_writer_went_stale_still_appends_and_closes(serve) -> None:
    """An HTTP process keeps the writer of its last append; when another process appended
    since, that writer is stale and the process takes the producer role back, for an append
    and for a close alike."""
    with serve(http_procs=2) as s:
        seen: set[tuple[str, int, int]] = set()
        for i in range(200):
            path = f"/ds/v1/stream/stale-{i}"
            who = []
            for method, body, hs in [
                ("PUT", b"a", {"Content-Type": TEXT}),
                ("POST", b"b", {"Content-Type": TEXT}),
                ("POST", b"c", {"Content-Type": TEXT}),
                ("POST", b"", {"Stream-Closed": "true"}),
            ]:
                status, rh, _ = s.request(method, path, body, hs)
                assert status in (201, 204), (method, status)
                who.append(int(rh["x-ringcast-process"]))
            status, rh, body = s.request("GET", path)
            assert body == b"abc"
            assert rh["stream-closed"] == "true"
            # The interesting orders: the appender or the closer is not the last appender.
            if who[1] != who[0]:
                seen.add(("append", who[0], who[1]))
            if who[3] != who[2]:
                seen.add(("close", who[2], who[3]))
            if {k for k, _, _ in seen} == {"append", "close"}:
                break
        assert {k for k, _, _ in seen} == {"append", "close"}


def test_open_streams_count_against_the_key_quota(serve) -> None:
    # Two HTTP processes: the count is exact whichever one each request reaches.
    with serve("--api-key", "k1", "--api-key", "k2", "--max-sessions-per-key", "2") as s:
        k1 = {"Authorization": "Bearer k1", "Content-Type": TEXT}
        assert s.request("PUT", "/ds/v1/stream/one", b"", k1)[0] == 201
        assert s.request("PUT", "/ds/v1/stream/two", b"", k1)[0] == 201
        # Idempotent re-creates are not new streams.
        assert s.request("PUT", "/ds/v1/stream/two", b"", k1)[0] == 200
        assert s.request("PUT", "/ds/v1/stream/three", b"", k1)[0] == 429
        # The other key is not held back by the first one's streams.
        k2 = {"Authorization": "Bearer k2", "Content-Type": TEXT}
        assert s.request("PUT", "/ds/v1/stream/three", b"", k2)[0] == 201
        # A closed stream no longer counts.
        assert (
            s.request("POST", "/ds/v1/stream/one", b"", {**k1, "Stream-Closed": "true"})[0] == 204
        )
        assert s.request("PUT", "/ds/v1/stream/three", b"", k1)[0] == 201


def test_an_offset_whose_first_part_is_not_0_is_a_400(serve) -> None:
    """docs/DURABLE_STREAMS.md: the first part of an offset is always 0; anything else is 400."""
    with serve() as s:
        path = "/ds/v1/stream/offsets"
        assert s.request("PUT", path, b"hello", {"Content-Type": TEXT})[0] == 201
        ok = "0000000000000000_0000000000000001"
        status, _, body = s.request("GET", f"{path}?offset={ok}")
        assert (status, body) == (200, b"ello")
        for bad in ("0000000000000001_0000000000000000", ok + "%0A"):
            status, _, body = s.request("GET", f"{path}?offset={bad}")
            assert status == 400, bad
            assert b"malformed offset" in body
        fork = {"Content-Type": TEXT, "Stream-Forked-From": path}
        fork["Stream-Fork-Offset"] = "0000000000000001_0000000000000000"
        assert s.request("PUT", path + "-fork", b"", fork)[0] == 400


def test_sse_tails_share_the_pump_and_a_stalled_one_loses_nothing(serve, response) -> None:
    """SSE tails of one stream in one HTTP process are written by that process's one pump
    (a pass's events are rendered once, for every tail); a tail that stops reading is
    detached from it (counted in ``slow_readers_detached_total``, which only the pump
    counts), holds up nobody, and later gets every byte, then the close."""
    import socket

    # ~8 MB outgrow the kernel's socket buffers, so the stalled tail's transport buffer fills;
    # a 32 MiB ring keeps every byte.
    with serve("--http-procs", "1", "--session-bytes", str(32 << 20)) as s:
        path = "/ds/v1/stream/fanned"
        assert s.request("PUT", path, b"", {"Content-Type": TEXT})[0] == 201
        tail = f"GET {path}?offset=now&live=sse HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(("127.0.0.1", s.port))
        stalled.sendall(tail)
        fast = [s.open_request("GET", f"{path}?offset=now&live=sse") for _ in range(4)]
        heads = [f.read_at_least(1) for f in fast]
        for f, head in zip(fast, heads, strict=True):
            assert f.status == 200 and head.startswith(b"event: control")
        sent = [(f"{i:05d} " + "y" * 40_000 + "\n").encode() for i in range(200)]
        for m in sent:
            assert s.request("POST", path, m, {"Content-Type": TEXT})[0] == 204
        assert s.request("POST", path, b"", {"Stream-Closed": "true"})[0] == 204
        whole = b"".join(sent)

        def data_of(body: bytes) -> bytes:
            events = [e for e in body.split(b"\n\n") if e]
            assert b'"streamClosed":true' in events[-1]
            return b"".join(sse_payload(e) for e in events if e.startswith(b"event: data\n"))

        for f, head in zip(fast, heads, strict=True):
            assert data_of(head + f.read_all_and_close()) == whole
        assert s.metric("slow_readers_detached_total") >= 1
        # The stalled tail was detached from the pump and goes on where it stopped.
        assert data_of(response(stalled).read_all_and_close()) == whole


def test_a_stream_name_outside_latin_1_is_created_and_located(serve) -> None:
    """A raw UTF-8 name (``/ds/v1/stream/日本``, as curl sends it) is created with a 201 whose
    ``Location`` gives the name percent-encoded; it was a 500 (the head is Latin-1 bytes)."""
    with serve(http_procs=1) as srv:
        for name in ("日本-1", "café-1"):
            raw_path = f"/ds/v1/stream/{name}".encode()
            head = (
                b"PUT " + raw_path + b" HTTP/1.1\r\nHost: h\r\nContent-Type: text/plain\r\n"
                b"Content-Length: 2\r\nConnection: close\r\n\r\nhi"
            )
            status, hs, _ = srv.request("PUT", "", raw=head)
            assert status == 201, (name, status)
            assert hs["location"] == "http://h/ds/v1/stream/" + quote(name)
            assert srv.request("GET", hs["location"][len("http://h") :])[2] == b"hi"


def test_numbers_of_any_length_are_a_400_or_ignored_never_a_500(serve) -> None:
    """Decimals past what ``int()`` parses (4,300 digits) or SQLite stores (2^63) in a
    ``cursor``, ``Stream-TTL`` or ``Producer-Epoch`` were 500s (the SSE tail's came after its
    200, cutting the stream); now a 400, or for a cursor, which is only a hint, ignored."""
    huge, past_i64 = "1" + "0" * 5000, "1" + "0" * 19
    with serve(http_procs=1) as srv:
        path = "/ds/v1/stream/numbers"
        hs = {"Content-Type": "text/plain", "Stream-Closed": "true"}
        assert srv.request("PUT", path, b"hi", hs)[0] == 201
        for live in ("long-poll", "sse"):
            status, _, body = srv.request("GET", f"{path}?offset=-1&live={live}&cursor={huge}")
            assert status == 200, body
            assert b"hi" in body and (live == "long-poll" or b'"streamClosed":true' in body)
        for n in (huge, past_i64, str(2**53)):
            status, _, body = srv.request("PUT", f"{path}-ttl", b"", {"Stream-TTL": n})
            assert status == 400 and b"Stream-TTL" in body, (n[:22], status, body)
            producer = {"Producer-Id": "p", "Producer-Epoch": n, "Producer-Seq": "0"}
            status, _, body = srv.request("POST", path, b"x", producer)
            assert status == 400 and b"Producer-Epoch" in body, (n[:22], status, body)
        assert srv.request("PUT", f"{path}-ttl", b"", {"Stream-TTL": str(2**53 - 1)})[0] == 201


def test_sse_tails_with_cursors_of_their_own_share_one_data_event_per_pass(
    serve_in_memory, monkeypatch
) -> None:
    """Clients send back the cursor they were given, and one at the live edge gets it
    jittered at random, so past a reconnect every tail has a cursor of its own. The pump
    renders once per distinct cursor: the data event (the append's bytes, copied, encoded)
    was rendered again for every tail, ~2.7x the server's CPU at 300 tails. Now once per
    pass; only the small control event is per cursor."""
    import socket
    import time

    from ringcast.server import durable

    rendered: list[int] = []
    real = durable.DurableStreams.sse_data

    def counting(self: Any, t: Any, data: bytes, binary: bool) -> bytes:
        rendered.append(len(data))
        return real(self, t, data, binary)

    monkeypatch.setattr(durable.DurableStreams, "sse_data", counting)
    srv = serve_in_memory()
    path = "/ds/v1/stream/cursors"
    assert srv.request("PUT", path, b"", {"Content-Type": TEXT})[0] == 201
    now = int((time.time() - durable.CURSOR_EPOCH) // durable.CURSOR_INTERVAL_S)
    tails = []
    for i in range(10):
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        target = f"{path}?offset=-1&live=sse&cursor={now + 1 + i}"
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: h\r\n\r\n".encode())
        tails.append([s, b""])

    def read_until(needle: bytes) -> None:
        for tail in tails:
            while needle not in tail[1]:
                tail[1] += tail[0].recv(65536)

    try:
        read_until(b"event: control")  # every tail is at the live edge
        rendered.clear()
        for k in range(5):
            assert (
                srv.request("POST", path, f"append-{k}\n".encode(), {"Content-Type": TEXT})[0]
                == 204
            )
            read_until(f"append-{k}".encode())
        assert rendered and len(rendered) <= 5, rendered  # was 10 per append
    finally:
        for s, _ in tails:
            s.close()
