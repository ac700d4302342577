"""Session lifecycle through ``ringcast serve``: cancel, replace, TTL, eviction, keys, shutdown."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import tempfile
from pathlib import Path
from typing import Any

import psutil
import pytest

pytestmark = pytest.mark.timeout(90)


def lookup(srv: Any, conv: str, headers: dict[str, str] | None = None) -> list[dict[str, object]]:
    _, _, body = srv.request(
        "POST", "/v1/streams/lookup", {"conversation_ids": [conv]}, headers=headers
    )
    found: list[dict[str, object]] = json.loads(body)
    return found


def test_delete_before_the_first_token(
    tmp_path: Path, serve, wait_for, sse_events, error_of
) -> None:
    # A prefill that never ends: the only way out is the DELETE.
    with serve("--prefill-s", "3600") as s:
        r = s.post_chat("slow-start")
        assert r.status == 200
        g = s.open_request("GET", "/v1/stream?conv_id=slow-start")
        assert g.status == 200
        wait_for(lambda: s.metric("worker_jobs_active") == 1, "the worker to adopt the job")
        assert lookup(s, "slow-start")[0]["total_bytes"] == 0
        assert s.request("DELETE", "/v1/stream?conv_id=slow-start")[0] == 204
        for resp in (r, g):
            events = sse_events(resp.read_all_and_close())
            assert error_of(events[-1])["type"] == "cancelled"
        assert s.request("GET", "/v1/stream?conv_id=slow-start")[0] == 404
        assert lookup(s, "slow-start") == []
        # The worker stopped the job (it was waiting for its first token).
        wait_for(lambda: s.metric("worker_jobs_active") == 0, "the job to stop")
        assert s.metric('worker_jobs_total{outcome="cancelled"}') == 1
        assert s.request("DELETE", "/v1/stream/slow-start")[0] == 204  # idempotent


def test_replace_ends_old_readers_with_replaced(
    tmp_path: Path, serve, wait_for, sse_events, error_of
) -> None:
    with serve("--tokens-per-s", "20") as s:
        old = s.post_chat("same", max_tokens=1000)
        old.read_at_least(300)
        new = s.post_chat("same", max_tokens=3, prompt="other")
        assert error_of(sse_events(old.read_all_and_close())[-1])["type"] == "replaced"
        body = new.read_all_and_close()
        assert body.endswith(b"data: [DONE]\n\n")
        assert s.request("GET", "/v1/stream?conv_id=same")[2] == body
        wait_for(
            lambda: s.metric('worker_jobs_total{outcome="cancelled"}') == 1,
            "the replaced job to stop",
        )


def test_anonymous_stream_stops_when_the_client_leaves(tmp_path: Path, serve, wait_for) -> None:
    with serve("--tokens-per-s", "20") as s:
        r = s.post_chat(None, max_tokens=1000)
        r.read_at_least(300)
        assert s.request("GET", "/v1/streams")[2] == b"[]"  # never listed
        r.close()
        wait_for(
            lambda: s.metric('worker_jobs_total{outcome="cancelled"}') == 1,
            "the generation to stop",
        )
        wait_for(lambda: s.metric("sessions") == 0, "the session to go away")


def test_ttl_collects_completed_sessions(tmp_path: Path, serve, wait_for) -> None:
    with serve("--tokens-per-s", "0", "--ttl", "0.5") as s:
        s.post_chat("short-lived", max_tokens=2).read_all_and_close()
        wait_for(
            lambda: s.request("GET", "/v1/stream?conv_id=short-lived")[0] == 404,
            "the TTL to expire the session",
        )
        wait_for(lambda: s.metric('evictions_total{reason="ttl"}') == 1, "the TTL count")


def test_lru_eviction_of_completed_sessions_only(tmp_path: Path, serve, wait_for) -> None:
    with serve("--tokens-per-s", "5", "--max-sessions", "16") as s:
        running = s.post_chat("running", max_tokens=1000)
        running.read_at_least(100)
        for i in range(20):
            s.post_chat(f"done-{i}", max_tokens=1, prompt=str(i)).read_all_and_close()
        # The newest completed sessions and the running one survive; the oldest went first.
        assert s.request("GET", "/v1/stream?conv_id=done-19")[0] == 200
        assert s.request("GET", "/v1/stream?conv_id=done-0")[0] == 404
        assert lookup(s, "running")[0]["state"] == "running"
        wait_for(lambda: s.metric('evictions_total{reason="lru"}') >= 5, "the LRU count")
        running.close()


def test_lru_counts_a_read_as_a_use(tmp_path: Path, serve, wait_for) -> None:
    """Least recently *used*: a session read again after it finished outlives one that
    finished later but nobody asked for since."""
    with serve("--tokens-per-s", "0", "--max-sessions", "16") as s:
        a = s.post_chat("a", max_tokens=2, prompt="a").read_all_and_close()
        s.post_chat("b", max_tokens=2, prompt="b").read_all_and_close()
        assert s.request("GET", "/v1/stream?conv_id=a")[2] == a
        # 16 sessions: one over the manager's headroom (1/16 of the table), so it evicts one.
        for i in range(14):
            s.post_chat(f"fill-{i}", max_tokens=1, prompt=str(i)).read_all_and_close()
        wait_for(lambda: s.metric('evictions_total{reason="lru"}') == 1, "an LRU eviction")
        # Looked up, not read: a read would count as a use.
        assert lookup(s, "b") == []
        assert lookup(s, "a")[0]["state"] == "done"
        assert s.request("GET", "/v1/stream?conv_id=a")[2] == a


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_client_that_never_reads_is_cut_off(
    tmp_path: Path, loop: str, serve, wait_for, chat_body
) -> None:
    """A streaming client that reads nothing fills its connection's buffers and then, for
    --write-timeout, takes nothing: its connection is reset and its reader released, while
    another client reads the same stream to the end."""
    with serve(
        "--event-loop",
        loop,
        "--tokens-per-s",
        "0",
        "--write-timeout",
        "1",
        "--session-bytes",
        str(32 << 20),
        http_procs=1,
    ) as s:
        stuck = socket.socket()
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before the handshake
        stuck.settimeout(30)
        stuck.connect((s.host, s.port))
        try:
            stuck.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                b"X-Conversation-Id: never-read\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body := chat_body(50_000)) + body
            )
            wait_for(lambda: lookup(s, "never-read"), "the stream to start")
            other = s.open_request("GET", "/v1/stream?conv_id=never-read")
            assert other.read_all_and_close().endswith(b"data: [DONE]\n\n")
            wait_for(lambda: s.metric("write_timeouts_total") == 1, "the stalled client's reset")
            wait_for(lambda: s.metric("http_readers_active") == 0, "its reader to be released")
            assert s.metric("readers") == 0
            # The server's end is gone: what the kernel holds drains, then the reset shows.
            with contextlib.suppress(ConnectionResetError):
                while stuck.recv(1 << 20):
                    pass
        finally:
            stuck.close()
        assert s.request("GET", "/health")[0] == 200


def test_full_table_of_running_sessions_is_503(tmp_path: Path, serve) -> None:
    with serve("--prefill-s", "3600", "--max-sessions", "8") as s:
        held = [s.post_chat(f"r-{i}") for i in range(8)]
        assert all(r.status == 200 for r in held)
        r = s.post_chat("one-too-many")
        assert r.status == 503
        assert json.loads(r.read_all_and_close())["error"]["type"] == "unavailable_error"
        for r in held:
            r.close()


def test_evict_running_when_asked(tmp_path: Path, serve, sse_events, error_of) -> None:
    with serve("--prefill-s", "3600", "--max-sessions", "8", "--evict-running") as s:
        held = [s.post_chat(f"r-{i}") for i in range(8)]
        r = s.post_chat("one-more")
        assert r.status == 200
        assert error_of(sse_events(held[0].read_all_and_close())[-1])["type"] == "evicted"
        for h in [*held[1:], r]:
            h.close()


def test_per_key_isolation(tmp_path: Path, serve) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# two tenants\nkey-a\nkey-b\n")
    with serve("--tokens-per-s", "0", "--api-key-file", str(keys)) as s:
        a = {"Authorization": "Bearer key-a"}
        b = {"X-Api-Key": "key-b"}
        body = s.post_chat("shared-name", max_tokens=3, headers=a).read_all_and_close()
        assert (
            s.post_chat("shared-name", max_tokens=5, headers=b, prompt="b").read_all_and_close()
            != body
        )
        # Same id, two tenants: each sees only its own session.
        assert s.request("GET", "/v1/stream?conv_id=shared-name", headers=a)[2] == body
        only_a = s.post_chat("only-a", max_tokens=3, headers=a).read_all_and_close()
        assert only_a
        assert s.request("GET", "/v1/stream?conv_id=only-a", headers=b)[0] == 404
        assert lookup(s, "only-a", b) == []
        listed_b = json.loads(s.request("GET", "/v1/streams", headers=b)[2])
        assert [i["conversation_id"] for i in listed_b] == ["shared-name"]
        listed_a = json.loads(s.request("GET", "/v1/streams?conversation_id=only-a", headers=a)[2])
        assert [i["conversation_id"] for i in listed_a] == ["only-a"]
        assert s.request("DELETE", "/v1/stream?conv_id=only-a", headers=b)[0] == 204
        assert s.request("GET", "/v1/stream?conv_id=only-a", headers=a)[0] == 200
        for h in ({}, {"Authorization": "Bearer nope"}):
            status, _, err = s.request("GET", "/v1/streams", headers=h)
            assert status == 401
            assert json.loads(err)["error"]["type"] == "authentication_error"
        assert s.request("GET", "/health")[0] == 200


def test_repeated_api_key_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serve) -> None:
    """Two keys given as two --api-key options: both work, each has its own sessions."""
    args = ("--tokens-per-s", "0", "--api-key", "key-a", "--api-key", "key-b")
    # No $RINGCAST_API_KEY: the two options are the only keys.
    monkeypatch.delenv("RINGCAST_API_KEY", raising=False)
    with serve(*args) as s:
        a = {"Authorization": "Bearer key-a"}
        b = {"X-Api-Key": "key-b"}
        body_a = s.post_chat("shared-name", max_tokens=3, headers=a).read_all_and_close()
        body_b = s.post_chat(
            "shared-name", max_tokens=5, headers=b, prompt="b"
        ).read_all_and_close()
        assert body_a.endswith(b"data: [DONE]\n\n") and body_b.endswith(b"data: [DONE]\n\n")
        assert body_a != body_b
        # Same id, two keys: two sessions (b's POST did not replace a's), each reads its own.
        assert s.request("GET", "/v1/stream?conv_id=shared-name", headers=a)[2] == body_a
        assert s.request("GET", "/v1/stream?conv_id=shared-name", headers=b)[2] == body_b
        # The other key cannot read, look up, list or delete a key's session.
        only_b = s.post_chat("only-b", max_tokens=3, headers=b).read_all_and_close()
        for path in ("/v1/stream?conv_id=only-b", "/v1/stream/only-b?from=3"):
            status, _, err = s.request("GET", path, headers=a)
            assert status == 404, path
            assert json.loads(err)["error"]["type"] == "not_found_error"
        assert lookup(s, "only-b", a) == []
        assert [i["conversation_id"] for i in lookup(s, "only-b", b)] == ["only-b"]
        listed_a = json.loads(s.request("GET", "/v1/streams", headers=a)[2])
        assert [i["conversation_id"] for i in listed_a] == ["shared-name"]
        listed_b = json.loads(s.request("GET", "/v1/streams", headers=b)[2])
        assert sorted(i["conversation_id"] for i in listed_b) == ["only-b", "shared-name"]
        # DELETE answers 204 also for an id it does not know (as llama-server) and does
        # nothing to another key's session.
        status, _, empty = s.request("DELETE", "/v1/stream?conv_id=only-b", headers=a)
        assert (status, empty) == (204, b"")
        assert s.request("GET", "/v1/stream?conv_id=only-b", headers=b)[2] == only_b
        assert s.request("DELETE", "/v1/stream/shared-name", headers=a)[0] == 204
        assert s.request("GET", "/v1/stream?conv_id=shared-name", headers=a)[0] == 404
        assert s.request("GET", "/v1/stream?conv_id=shared-name", headers=b)[2] == body_b
        # No key, a wrong key, or a key in the wrong header form: 401 on every /v1 route.
        for h in (
            {},
            {"Authorization": "Bearer key-c"},
            {"X-Api-Key": "key-a-and-more"},
            {"Authorization": "key-a"},
        ):
            for method, path in (
                ("GET", "/v1/streams"),
                ("GET", "/v1/stream?conv_id=only-b"),
                ("DELETE", "/v1/stream?conv_id=only-b"),
                ("POST", "/v1/streams/lookup"),
                ("GET", "/v1/models"),
            ):
                status, _, err = s.request(method, path, headers=h)
                assert status == 401, (h, method, path)
                assert json.loads(err)["error"]["type"] == "authentication_error"
            r = s.post_chat("only-b", headers=h)
            assert r.status == 401
            assert json.loads(r.read_all_and_close())["error"]["code"] == 401
        # None of that touched b's session; /health needs no key.
        assert s.request("GET", "/v1/stream?conv_id=only-b", headers=b)[2] == only_b
        assert s.request("GET", "/health")[0] == 200
        # Both keys reach the children as digests only: not in their argv, not in the config.
        (config,) = Path(tempfile.gettempdir()).glob(f"ringcast-run-{s.proc.pid}-*/config.json")
        digests = json.loads(config.read_text())["key_digests"]
        assert sorted(digests) == sorted(
            hashlib.sha256(k).hexdigest() for k in (b"key-a", b"key-b")
        )
        assert b"key-a" not in config.read_bytes() and b"key-b" not in config.read_bytes()
        children = s.children("http") + s.children("worker")
        assert len(children) == 2  # two HTTP processes, which run the jobs
        for pid in children:
            argv = " ".join(psutil.Process(pid).cmdline())
            assert "key-a" not in argv and "key-b" not in argv


@pytest.mark.parametrize("keep", [False, True])
def test_sigint_ends_readers_and_removes_the_segment_unless_kept(
    tmp_path: Path, keep: bool, serve, sse_events, error_of, check_ids
) -> None:
    """SIGINT (Ctrl-C) stops the server like SIGTERM: a running stream's reader gets the
    terminal server_shutdown event, and the segment file goes unless --keep-segment."""
    s = serve.start("--tokens-per-s", "20", *(["--keep-segment"] if keep else []))
    r = s.post_chat("interrupted", max_tokens=1000)
    head = r.read_at_least(300)
    assert s.segment.exists()
    assert s.stop(signal.SIGINT) == 0
    body = head + r.read_all_and_close()
    events = sse_events(body)
    assert error_of(events[-1])["type"] == "server_shutdown"
    assert b"data: [DONE]" not in body
    check_ids(body)  # the shutdown event is part of the ring, with its id
    assert s.segment.exists() == keep
    if not keep:
        # Nothing left: the notifier sockets of the readers' processes went with the segment.
        assert not wake_dir(s).exists()
        return
    # The kept segment holds the stream as the reader saw it, finalized failed.
    s2 = serve.start("--tokens-per-s", "0")
    try:
        assert s2.request("GET", "/v1/stream?conv_id=interrupted")[2] == body
        assert lookup(s2, "interrupted")[0]["state"] == "failed"
    finally:
        assert s2.stop() == 0
    assert not s.segment.exists()
    assert not wake_dir(s).exists()


def test_sigterm_finalizes_running_sessions_and_removes_the_segment(
    tmp_path: Path, serve, sse_events, error_of
) -> None:
    s = serve.start("--tokens-per-s", "20")
    r = s.post_chat("running", max_tokens=1000)
    r.read_at_least(300)
    assert s.segment.exists()
    s.proc.send_signal(signal.SIGTERM)
    events = sse_events(r.read_all_and_close())
    assert error_of(events[-1])["type"] == "server_shutdown"
    assert s.stop() == 0
    assert not s.segment.exists()
    assert not wake_dir(s).exists()


def wake_dir(s: Any) -> Path:
    """The directory of the server's notifier sockets (``<segment>.wake``)."""
    return Path(f"{s.segment}.wake")


def test_keep_segment_and_reattach(tmp_path: Path, serve) -> None:
    s = serve.start("--tokens-per-s", "0", "--keep-segment")
    body = s.post_chat("survivor", max_tokens=4).read_all_and_close()
    assert s.stop() == 0
    assert s.segment.exists()
    s2 = serve.start("--tokens-per-s", "0")
    try:
        assert s2.request("GET", "/v1/stream?conv_id=survivor")[2] == body
    finally:
        s2.stop()
    assert not os.path.exists(s.segment)


def test_idle_running_session_is_evicted(
    tmp_path: Path, serve, wait_for, sse_events, error_of
) -> None:
    with serve("--prefill-s", "3600", "--idle-timeout", "0.5") as s:
        r = s.post_chat("stuck")
        assert error_of(sse_events(r.read_all_and_close())[-1])["type"] == "evicted"
        wait_for(lambda: s.metric('evictions_total{reason="idle"}') == 1, "the idle count")
        wait_for(
            lambda: s.metric('worker_jobs_total{outcome="cancelled"}') == 1,
            "the stuck job to stop",
        )


def test_memory_cap_evicts_completed_sessions_oldest_first(tmp_path: Path, serve, wait_for) -> None:
    with serve("--tokens-per-s", "0", "--max-memory", "20000") as s:
        sizes = [
            len(s.post_chat(f"m-{i}", max_tokens=20, prompt=str(i)).read_all_and_close())
            for i in range(8)
        ]
        assert sum(sizes) > 20000
        # Polled by lookup: a GET would count as a use and keep m-0 from being the oldest.
        wait_for(lambda: lookup(s, "m-0") == [], "the oldest session to be evicted")
        assert s.request("GET", "/v1/stream?conv_id=m-7")[0] == 200
        wait_for(lambda: s.metric("bytes_buffered") <= 20000, "memory below the cap")


def test_pings_during_a_slow_prefill_and_cors(tmp_path: Path, serve, sse_events, check_ids) -> None:
    page = "http://page.example"
    with serve("--prefill-s", "0.6", "--sse-ping-interval", "0.1", "--cors-origin", page) as s:
        r = s.post_chat("pinged", max_tokens=3, headers={"Origin": page})
        assert r.headers["access-control-allow-origin"] == page
        assert "X-Ringcast-Offset" in r.headers["access-control-expose-headers"]
        body = r.read_all_and_close()
        events = sse_events(body)
        assert events[0] == b": ping\n\n"  # the prefill was not silent
        assert body.endswith(b"data: [DONE]\n\n")
        check_ids(body)  # the pings are counted by the next event's id
        status, headers, _ = s.request("OPTIONS", "/v1/chat/completions", headers={"Origin": page})
        assert status == 204
        assert "X-Conversation-Id" in headers["access-control-allow-headers"]
        _, headers, _ = s.request("GET", "/health", headers={"Origin": "http://evil"})
        assert "access-control-allow-origin" not in headers
