"""Every bad input gets a clear 4xx with the JSON error body; odd but valid input works."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def srv(serve_store: Any) -> Iterator[Any]:
    """One server per stream store: every route test here runs against both."""
    with serve_store(
        "--tokens-per-s",
        "0",
        "--max-body",
        "4096",
        http_procs=1,
    ) as s:
        s.post_chat("known", max_tokens=3).read_all_and_close()
        yield s


def error(status: int, body: bytes) -> dict[str, object]:
    err: dict[str, object] = json.loads(body)["error"]
    assert err["code"] == status
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str)
    return err


@pytest.mark.parametrize(
    "value", ["abc", "-1", "12x", " 1", "1.5", "0x10", "١٢", "99999999999999999999999"]
)
def test_bad_from_is_400(srv: Any, value: str) -> None:
    from urllib.parse import quote

    status, _, body = srv.request("GET", f"/v1/stream?conv_id=known&from={quote(value)}")
    assert status == 400
    assert "from" in str(error(400, body)["message"])


def test_bad_last_event_id_is_400(srv: Any) -> None:
    status, _, body = srv.request(
        "GET", "/v1/stream?conv_id=known", headers={"Last-Event-ID": "x1"}
    )
    assert status == 400
    error(400, body)


def test_empty_from_means_zero(srv: Any) -> None:
    _, _, whole = srv.request("GET", "/v1/stream?conv_id=known")
    status, _, body = srv.request("GET", "/v1/stream?conv_id=known&from=")
    assert (status, body) == (200, whole)


@pytest.mark.parametrize(
    "conv", ["a%00b", "tab%09here", "nl%0A", "del%7F", "c1%C2%85", "x" * 257, "%FF%FE"]
)
def test_bad_conversation_id_is_400(srv: Any, conv: str) -> None:
    for path in (f"/v1/stream?conv_id={conv}", f"/v1/stream/{conv}"):
        status, _, body = srv.request("GET", path)
        assert status == 400, path
        error(400, body)


def test_bad_conversation_id_header_is_400(srv: Any) -> None:
    r = srv.post_chat("y" * 257)
    assert r.status == 400
    error(400, r.read_all_and_close())
    raw = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Conversation-Id: a\x01b\r\n"
        b"Content-Length: 2\r\nConnection: close\r\n\r\n{}"
    )
    status, _, _body = srv.request("POST", "", raw=raw)
    assert status == 400


@pytest.mark.parametrize(
    "conv", ["conv-1::ggml-org/tinygemma3-GGUF:Q8_0", "a b", "ünï/cødé", "x" * 256, "?&=#%"]
)
def test_printable_ids_are_accepted_in_every_form(srv: Any, conv: str) -> None:
    from urllib.parse import quote

    body = srv.post_chat(conv, max_tokens=2).read_all_and_close()
    assert body.endswith(b"data: [DONE]\n\n")
    q = quote(conv, safe="")
    for path in (f"/v1/stream?conv_id={q}", f"/v1/stream/{quote(conv, safe='/')}"):
        status, _, replay = srv.request("GET", path)
        assert (status, replay) == (200, body), path
    _, _, found = srv.request("POST", "/v1/streams/lookup", {"conversation_ids": [conv]})
    assert [i["conversation_id"] for i in json.loads(found)] == [conv]


def test_unknown_stream_is_404(srv: Any) -> None:
    for path in ("/v1/stream?conv_id=nope", "/v1/stream/nope?from=3"):
        status, _, body = srv.request("GET", path)
        assert status == 404
        assert error(404, body)["type"] == "not_found_error"


def test_missing_id_is_400(srv: Any) -> None:
    for path in ("/v1/stream?from=0", "/v1/stream/", "/v1/stream?conv_id="):
        status, _, body = srv.request("GET", path)
        assert status == 400, path
        error(400, body)


def test_body_limits_and_encodings(srv: Any) -> None:
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 5000}]}).encode()
    status, _headers, body = srv.request("POST", "/v1/chat/completions", big)
    assert status == 413
    error(413, body)
    # A chunked body goes to the route decoded (here: valid JSON, but not a chat request)...
    raw = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"\r\n2\r\n{}\r\n0\r\n\r\n"
    )
    status, _, body = srv.request("POST", "", raw=raw)
    assert status == 400
    assert "messages" in str(error(400, body)["message"])
    # ...and is held to --max-body like any other (4096 here).
    chunk = json.dumps({"messages": [{"role": "user", "content": "x" * 3000}]}).encode()
    raw = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n%s\r\n" % (len(chunk), chunk) * 2
        + b"0\r\n\r\n"
    )
    status, _, body = srv.request("POST", "", raw=raw)
    assert status == 413
    assert "chunked request body" in str(error(413, body)["message"])
    # A transfer coding other than chunked is not implemented; framed two ways is refused.
    raw = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
    )
    status, _, body = srv.request("POST", "", raw=raw)
    assert status == 501
    error(501, body)
    raw = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: 7\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    )
    assert srv.request("POST", "", raw=raw)[0] == 400
    raw = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1x\r\n\r\n"
    assert srv.request("POST", "", raw=raw)[0] == 400
    assert srv.request("GET", "", raw=b"GARBAGE\r\n\r\n")[0] == 400
    assert srv.request("GET", "", raw=b"GET / HTTP/2.0\r\n\r\n")[0] == 505
    big_head = b"GET /health HTTP/1.1\r\nX-Pad: " + b"p" * 20000 + b"\r\n\r\n"
    assert srv.request("GET", "", raw=big_head)[0] == 431
    long_line = b"GET /health?x=" + b"p" * 20000 + b" HTTP/1.1\r\n\r\n"
    assert srv.request("GET", "", raw=long_line)[0] == 414
    assert srv.request("GET", "", raw=b"GET /\r\n\r\n")[0] == 400  # HTTP/0.9: no version


def test_100_continue(srv: Any, response) -> None:
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    r = srv.open_request(
        "POST",
        "/v1/chat/completions",
        raw=(
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            f"Expect: 100-continue\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n"
        ).encode(),
    )
    assert r.status == 100
    r.sock.sendall(body.encode())

    final = response(r.sock, r.buf)
    assert final.status == 200
    assert json.loads(final.read_all_and_close())["object"] == "chat.completion"


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"{}",
        b'{"messages": "x"}',
        b'{"messages": [], "max_tokens": -1}',
        b'{"messages": [], "n": 2}',
    ],
)
def test_bad_completion_body_is_400(srv: Any, body: bytes) -> None:
    status, _, resp = srv.request("POST", "/v1/chat/completions", body)
    assert status == 400
    assert error(400, resp)["type"] == "invalid_request_error"


def test_bad_routes_and_methods(srv: Any) -> None:
    status, _, body = srv.request("GET", "/v1/nothing")
    assert status == 404
    error(404, body)
    status, _, body = srv.request("GET", "/v1/chat/completions")
    assert status == 405
    error(405, body)
    status, headers, body = srv.request("PUT", "/v1/stream?conv_id=known")
    assert status == 405
    assert headers.get("allow") == "GET, DELETE"  # RFC 9110: a 405 lists what is allowed
    assert "use GET or DELETE" in error(405, body)["message"]
    status, headers, _ = srv.request("GET", "/v1/chat/completions")
    assert headers.get("allow") == "POST"


@pytest.mark.parametrize(
    ("query", "says"),
    [
        ("conv_id=known&from=-1", "expected a non-negative decimal byte offset"),
        ("conv_id=known&from=1e3", "expected a non-negative decimal byte offset"),
        ("conv_id=known&from=18446744073709551616", "larger than any stream can be"),
        ("conv_id=known&from=10&from=70000", "'from' given more than once"),
        ("conv_id=known&conv_id=other", "'conv_id' given more than once"),
    ],
)
def test_a_bad_or_ambiguous_offset_or_id_is_400(srv: Any, query: str, says: str) -> None:
    status, _, body = srv.request("GET", f"/v1/stream?{query}")
    assert status == 400, query
    assert says in error(400, body)["message"], query


def test_lookup_inputs(srv: Any) -> None:
    status, _, body = srv.request("POST", "/v1/streams/lookup", b"not json")
    assert status == 400
    error(400, body)
    assert srv.request("POST", "/v1/streams/lookup", b"{}")[2] == b"[]"
    assert srv.request("POST", "/v1/streams/lookup", b"")[2] == b"[]"
    assert srv.request("POST", "/v1/streams/lookup", {"conversation_ids": []})[2] == b"[]"
    assert (
        srv.request("POST", "/v1/streams/lookup", {"conversation_ids": ["nope", "", "z" * 500]})[2]
        == b"[]"
    )
    status, _, body = srv.request("POST", "/v1/streams/lookup", {"conversation_ids": "known"})
    assert status == 400


def test_delete_unknown_is_204(srv: Any) -> None:
    for path in ("/v1/stream?conv_id=nope", "/v1/stream/nope"):
        status, _, body = srv.request("DELETE", path)
        assert (status, body) == (204, b"")


def test_health_models_metrics(srv: Any) -> None:
    status, _, body = srv.request("GET", "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, _, body = srv.request("GET", "/v1/models")
    assert json.loads(body)["data"][0]["id"] == "ringcast-synthetic"
    status, headers, body = srv.request("GET", "/metrics")
    assert headers["content-type"].startswith("text/plain")
    text = body.decode()
    for name in (
        'ringcast_sessions{state="done"}',
        "ringcast_bytes_buffered",
        "ringcast_readers",
        "ringcast_resumes_total",
        "ringcast_offsets_lost_total",
        "ringcast_evictions_total",
        'ringcast_http_requests_total{process="0"}',
        "ringcast_write_timeouts_total 0.0",
        # The default loop, as the children report it (labels in prometheus-client's order).
        'ringcast_event_loop_info{index="0",loop="uvloop",role="http"} 1.0',
    ):
        assert name in text
    assert "known" not in text  # no conversation ids in metrics


def test_lookup_prefix_rule(srv: Any) -> None:
    for conv in ("pre", "pre::model-a", "pre::org/model:Q8_0", "prefix", "pre:x"):
        srv.post_chat(conv, max_tokens=1).read_all_and_close()
    _, _, body = srv.request("POST", "/v1/streams/lookup", {"conversation_ids": ["pre"]})
    found = sorted(i["conversation_id"] for i in json.loads(body))
    assert found == ["pre", "pre::model-a", "pre::org/model:Q8_0"]
    info = json.loads(body)[0]
    assert set(info) == {
        "conversation_id",
        "is_done",
        "total_bytes",
        "started_at",
        "completed_at",
        "state",
        "first_available",
        "epoch",
        "readers",
    }


def test_http_1_0_stream_is_close_delimited(srv: Any) -> None:
    _, _, whole = srv.request("GET", "/v1/stream?conv_id=known")
    r = srv.open_request("GET", "/v1/stream?conv_id=known", version="HTTP/1.0")
    assert r.status == 200
    assert "transfer-encoding" not in r.headers
    assert r.headers["connection"] == "close"
    assert r.read_all_and_close() == whole


def lookup(srv: Any, conv: str) -> dict[str, Any]:
    _, _, body = srv.request("POST", "/v1/streams/lookup", {"conversation_ids": [conv]})
    found: list[dict[str, Any]] = json.loads(body)
    return found[0] if found else {}


def event_id(event: bytes) -> int:
    assert event.startswith(b"id: "), event[:80]
    return int(event[4 : event.index(b"\n")])


def test_metrics_count_known_traffic(
    tmp_path: Path, serve, wait_for, kill, sse_events, error_of
) -> None:
    """Drive known traffic through one HTTP process and check the values /metrics reports."""
    # An 8 KiB ring: a 200-token stream is several times that, so it drops its first bytes.
    with serve("--tokens-per-s", "100", "--session-bytes", "8192", http_procs=1, workers=1) as s:
        assert s.metric("resumes_total") == 0
        assert s.metric("offsets_lost_total") == 0
        assert s.metric("readers") == 0

        # -- resumes and offsets lost
        wrap = s.post_chat("wrap", max_tokens=200).read_all_and_close()
        assert wrap.endswith(b"data: [DONE]\n\n")
        info = lookup(s, "wrap")
        first = info["first_available"]
        assert info["total_bytes"] == len(wrap) and 0 < first < len(wrap)
        status, _, _ = s.request("GET", f"/v1/stream?conv_id=wrap&from={first - 1}")
        assert status == 410
        assert s.metric("offsets_lost_total") == 1
        assert s.metric("resumes_total") == 0  # a refused read is not a resume
        status, _, tail = s.request("GET", f"/v1/stream?conv_id=wrap&from={first}")
        assert (status, tail) == (200, wrap[first:])
        assert s.metric("resumes_total") == 1
        last_id = event_id(sse_events(wrap)[-2])  # the event before data: [DONE]
        status, _, tail = s.request(
            "GET", "/v1/stream?conv_id=wrap", headers={"Last-Event-ID": str(last_id)}
        )
        assert (status, tail) == (200, wrap[last_id:])
        assert tail.startswith(b"id: ") and tail.endswith(b"data: [DONE]\n\n")
        assert s.metric("resumes_total") == 2
        # Beyond the end of the finished stream (416), from=0: neither counts.
        assert s.request("GET", f"/v1/stream?conv_id=wrap&from={len(wrap) + 1}")[0] == 416
        status, _, _ = s.request("GET", "/v1/stream?conv_id=wrap&from=0")
        assert status == 410
        assert s.metric("resumes_total") == 2
        assert s.metric("offsets_lost_total") == 2

        # -- readers: one attached mid-stream counts while it reads, and nothing after
        r = s.post_chat("mid", max_tokens=1000)
        head = r.read_at_least(500)
        # The POST's reader: clients only (the live-edge fan-out's own reader, server.Pump,
        # which every client at the edge shares, is not counted).
        assert s.metric("readers") == 1
        assert s.metric("http_readers_active") == 1
        g = s.open_request("GET", "/v1/stream?conv_id=mid")
        assert g.status == 200
        assert g.read_at_least(len(head))[: len(head)] == head
        assert s.metric("readers") == 2
        assert s.metric("http_readers_active") == 2
        assert lookup(s, "mid")["readers"] == 2
        g.close()  # the mid-stream reader leaves...
        wait_for(lambda: s.metric("readers") == 1, "the GET's reader to detach")
        assert s.metric("http_readers_active") == 1
        r.close()  # ...then the POST's client: the generation goes on without readers
        wait_for(lambda: s.metric("readers") == 0, "the POST's reader to detach")
        assert s.metric("http_readers_active") == 0
        assert lookup(s, "mid")["readers"] == 0
        assert lookup(s, "mid")["state"] == "running"
        assert s.metric("resumes_total") == 2  # from=0 is no resume

        # -- sessions by state: two done, one failed (its worker killed), one cancelled
        assert s.request("DELETE", "/v1/stream?conv_id=mid")[0] == 204
        r = s.post_chat("doomed", max_tokens=5000)
        r.read_at_least(300)
        (worker,) = s.children("worker")
        kill(worker)
        assert error_of(sse_events(r.read_all_and_close())[-1])["type"] == "producer_died"
        wait_for(lambda: lookup(s, "doomed").get("state") == "failed", "the sweep")
        small = s.post_chat("small", max_tokens=3).read_all_and_close()  # new worker
        assert small.endswith(b"data: [DONE]\n\n")
        # A cancelled session is removed at once, so the "cancelled" line stays at 0.
        for state, n in (("running", 0), ("done", 2), ("failed", 1), ("cancelled", 0)):
            assert s.metric(f'sessions{{state="{state}"}}') == n, state
        assert s.metric("sessions") == 3
        assert s.metric("dead_producers_total") == 1
        assert s.metric('restarts_total{role="worker"}') == 1
        assert s.metric('restarts_total{role="http"}') == 0
        for reason in ("ttl", "idle", "lru"):
            assert s.metric(f'evictions_total{{reason="{reason}"}}') == 0, reason
        assert (s.metric("resumes_total"), s.metric("offsets_lost_total")) == (2, 2)


def test_metrics_count_ttl_evictions(tmp_path: Path, serve, wait_for, sse_events, error_of) -> None:
    with serve("--tokens-per-s", "20", "--ttl", "0.5", http_procs=1) as s:
        running = s.post_chat("long", max_tokens=5000)
        running.read_at_least(100)
        for conv in ("done-1", "done-2"):
            s.post_chat(conv, max_tokens=2, prompt=conv).read_all_and_close()
        wait_for(lambda: s.metric('evictions_total{reason="ttl"}') == 2, "the TTL evictions")
        assert s.request("GET", "/v1/stream?conv_id=done-1")[0] == 404
        # TTL counts from completion: the running session stays.
        assert s.metric('sessions{state="done"}') == 0
        assert s.metric('sessions{state="running"}') == 1
        assert lookup(s, "long")["state"] == "running"
        assert s.metric('evictions_total{reason="idle"}') == 0
        assert s.metric('evictions_total{reason="lru"}') == 0
        # A DELETE cancels; it is not an eviction.
        assert s.request("DELETE", "/v1/stream?conv_id=long")[0] == 204
        assert error_of(sse_events(running.read_all_and_close())[-1])["type"] == "cancelled"
        assert s.metric("sessions") == 0
        assert s.metric("evictions_total") == 2
