"""Every bad input gets a clear 4xx with the JSON error body; odd but valid input works."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from server_harness import Server, open_request, post_chat, request, server

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with server(
        tmp_path_factory.mktemp("errors"), "--tokens-per-s", "0", "--max-body", "4096", http_procs=1
    ) as s:
        post_chat(s.port, "known", max_tokens=3).read_all_and_close()
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
def test_bad_from_is_400(srv: Server, value: str) -> None:
    from urllib.parse import quote

    status, _, body = request(srv.port, "GET", f"/v1/stream?conv_id=known&from={quote(value)}")
    assert status == 400
    assert "from" in str(error(400, body)["message"])


def test_bad_last_event_id_is_400(srv: Server) -> None:
    status, _, body = request(
        srv.port, "GET", "/v1/stream?conv_id=known", headers={"Last-Event-ID": "x1"}
    )
    assert status == 400
    error(400, body)


def test_empty_from_means_zero(srv: Server) -> None:
    _, _, whole = request(srv.port, "GET", "/v1/stream?conv_id=known")
    status, _, body = request(srv.port, "GET", "/v1/stream?conv_id=known&from=")
    assert (status, body) == (200, whole)


@pytest.mark.parametrize(
    "conv", ["a%00b", "tab%09here", "nl%0A", "del%7F", "c1%C2%85", "x" * 257, "%FF%FE"]
)
def test_bad_conversation_id_is_400(srv: Server, conv: str) -> None:
    for path in (f"/v1/stream?conv_id={conv}", f"/v1/stream/{conv}"):
        status, _, body = request(srv.port, "GET", path)
        assert status == 400, path
        error(400, body)


def test_bad_conversation_id_header_is_400(srv: Server) -> None:
    r = post_chat(srv.port, "y" * 257)
    assert r.status == 400
    error(400, r.read_all_and_close())
    raw = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Conversation-Id: a\x01b\r\n"
        b"Content-Length: 2\r\nConnection: close\r\n\r\n{}"
    )
    status, _, _body = request(srv.port, "POST", "", raw=raw)
    assert status == 400


@pytest.mark.parametrize(
    "conv", ["conv-1::ggml-org/tinygemma3-GGUF:Q8_0", "a b", "ünï/cødé", "x" * 256, "?&=#%"]
)
def test_printable_ids_are_accepted_in_every_form(srv: Server, conv: str) -> None:
    from urllib.parse import quote

    body = post_chat(srv.port, conv, max_tokens=2).read_all_and_close()
    assert body.endswith(b"data: [DONE]\n\n")
    q = quote(conv, safe="")
    for path in (f"/v1/stream?conv_id={q}", f"/v1/stream/{quote(conv, safe='/')}"):
        status, _, replay = request(srv.port, "GET", path)
        assert (status, replay) == (200, body), path
    _, _, found = request(srv.port, "POST", "/v1/streams/lookup", {"conversation_ids": [conv]})
    assert [i["conversation_id"] for i in json.loads(found)] == [conv]


def test_unknown_stream_is_404(srv: Server) -> None:
    for path in ("/v1/stream?conv_id=nope", "/v1/stream/nope?from=3"):
        status, _, body = request(srv.port, "GET", path)
        assert status == 404
        assert error(404, body)["type"] == "not_found_error"


def test_missing_id_is_400(srv: Server) -> None:
    for path in ("/v1/stream?from=0", "/v1/stream/", "/v1/stream?conv_id="):
        status, _, body = request(srv.port, "GET", path)
        assert status == 400, path
        error(400, body)


def test_body_limits_and_encodings(srv: Server) -> None:
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 5000}]}).encode()
    status, _headers, body = request(srv.port, "POST", "/v1/chat/completions", big)
    assert status == 413
    error(413, body)
    raw = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"\r\n2\r\n{}\r\n0\r\n\r\n"
    )
    status, _, body = request(srv.port, "POST", "", raw=raw)
    assert status == 411
    error(411, body)
    raw = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1x\r\n\r\n"
    assert request(srv.port, "POST", "", raw=raw)[0] == 400
    assert request(srv.port, "GET", "", raw=b"GARBAGE\r\n\r\n")[0] == 400
    assert request(srv.port, "GET", "", raw=b"GET / HTTP/2.0\r\n\r\n")[0] == 505
    big_head = b"GET /health HTTP/1.1\r\nX-Pad: " + b"p" * 20000 + b"\r\n\r\n"
    assert request(srv.port, "GET", "", raw=big_head)[0] == 431


def test_100_continue(srv: Server) -> None:
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    r = open_request(
        srv.port,
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
    from server_harness import Response

    final = Response(r.sock, r.buf)
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
def test_bad_completion_body_is_400(srv: Server, body: bytes) -> None:
    status, _, resp = request(srv.port, "POST", "/v1/chat/completions", body)
    assert status == 400
    assert error(400, resp)["type"] == "invalid_request_error"


def test_bad_routes_and_methods(srv: Server) -> None:
    status, _, body = request(srv.port, "GET", "/v1/nothing")
    assert status == 404
    error(404, body)
    status, _, body = request(srv.port, "GET", "/v1/chat/completions")
    assert status == 405
    error(405, body)
    status, _, body = request(srv.port, "PUT", "/v1/stream?conv_id=known")
    assert status == 405


def test_lookup_inputs(srv: Server) -> None:
    status, _, body = request(srv.port, "POST", "/v1/streams/lookup", b"not json")
    assert status == 400
    error(400, body)
    assert request(srv.port, "POST", "/v1/streams/lookup", b"{}")[2] == b"[]"
    assert request(srv.port, "POST", "/v1/streams/lookup", b"")[2] == b"[]"
    assert request(srv.port, "POST", "/v1/streams/lookup", {"conversation_ids": []})[2] == b"[]"
    assert (
        request(
            srv.port, "POST", "/v1/streams/lookup", {"conversation_ids": ["nope", "", "z" * 500]}
        )[2]
        == b"[]"
    )
    status, _, body = request(srv.port, "POST", "/v1/streams/lookup", {"conversation_ids": "known"})
    assert status == 400


def test_delete_unknown_is_204(srv: Server) -> None:
    for path in ("/v1/stream?conv_id=nope", "/v1/stream/nope"):
        status, _, body = request(srv.port, "DELETE", path)
        assert (status, body) == (204, b"")


def test_health_models_metrics(srv: Server) -> None:
    status, _, body = request(srv.port, "GET", "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, _, body = request(srv.port, "GET", "/v1/models")
    assert json.loads(body)["data"][0]["id"] == "ringcast-synthetic"
    status, headers, body = request(srv.port, "GET", "/metrics")
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
        "ringcast_write_timeouts_total 0",
        # The default loop, as the children report it.
        'ringcast_event_loop_info{role="http",index="0",loop="uvloop"} 1',
        'ringcast_event_loop_info{role="worker",index="0",loop="uvloop"} 1',
    ):
        assert name in text
    assert "known" not in text  # no conversation ids in metrics


def test_lookup_prefix_rule(srv: Server) -> None:
    for conv in ("pre", "pre::model-a", "pre::org/model:Q8_0", "prefix", "pre:x"):
        post_chat(srv.port, conv, max_tokens=1).read_all_and_close()
    _, _, body = request(srv.port, "POST", "/v1/streams/lookup", {"conversation_ids": ["pre"]})
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


def test_http_1_0_stream_is_close_delimited(srv: Server) -> None:
    _, _, whole = request(srv.port, "GET", "/v1/stream?conv_id=known")
    r = open_request(srv.port, "GET", "/v1/stream?conv_id=known", version="HTTP/1.0")
    assert r.status == 200
    assert "transfer-encoding" not in r.headers
    assert r.headers["connection"] == "close"
    assert r.read_all_and_close() == whole
