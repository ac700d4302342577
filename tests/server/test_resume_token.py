"""Browsers: resume tokens (a stream read authenticated without the API key in the URL) and
the 204 that stops an ``EventSource`` at the end of a finished stream."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
from ringcast.server import resume_token
from ringcast.server.config import key_digest

pytestmark = pytest.mark.timeout(60)

SECRET = secrets.token_hex(32)
ALICE, BOB = key_digest("alice"), key_digest("bob")


def test_a_token_names_its_key_for_its_conversation_only() -> None:
    t = resume_token.issue(SECRET, ALICE, "conv-1", now=1000)
    assert resume_token.verify(SECRET, [BOB, ALICE], "conv-1", t, now=1000) == ALICE
    assert resume_token.verify(SECRET, [BOB], "conv-1", t, now=1000) is None
    assert resume_token.verify(SECRET, [ALICE], "conv-2", t, now=1000) is None
    assert resume_token.verify(secrets.token_hex(32), [ALICE], "conv-1", t, now=1000) is None


def test_a_token_expires() -> None:
    t = resume_token.issue(SECRET, ALICE, "c", now=1000)
    assert resume_token.verify(SECRET, [ALICE], "c", t, now=1000 + resume_token.RESUME_TOKEN_TTL)
    assert not resume_token.verify(
        SECRET, [ALICE], "c", t, now=1001 + resume_token.RESUME_TOKEN_TTL
    )


@pytest.mark.parametrize(
    "bad", ["", "x", "123", "abc.def", "9" * 20 + ".x", "1.2.3", "²1.mac", "1.mäc", "٣.x"]
)
def test_malformed_tokens_are_refused(bad: str) -> None:
    assert resume_token.verify(SECRET, [ALICE], "c", bad, now=0) is None


def test_a_forged_expiry_is_refused() -> None:
    t = resume_token.issue(SECRET, ALICE, "c", now=1000)
    expiry, mac = t.split(".")
    assert resume_token.verify(SECRET, [ALICE], "c", f"{int(expiry) + 9999}.{mac}", now=0) is None


@pytest.fixture(scope="module")
def keyed(serve_module: Any) -> Iterator[Any]:
    with serve_module("--api-key", "alice", "--api-key", "bob", "--tokens-per-s", "0") as s:
        yield s


ALICE_AUTH = {"Authorization": "Bearer alice"}


def test_a_streaming_post_gives_a_token_that_reads_that_stream(keyed: Any) -> None:
    r = keyed.post_chat("tok-a", headers=ALICE_AUTH)
    token = r.headers["x-ringcast-resume-token"]
    whole = r.read_all_and_close()
    assert "alice" not in token
    status, _, body = keyed.request("GET", f"/v1/stream?conv_id=tok-a&token={quote(token)}")
    assert (status, body) == (200, whole)
    status, _, body = keyed.request("GET", f"/v1/stream/tok-a?token={quote(token)}&from=10")
    assert (status, body) == (200, whole[10:])


def test_a_token_opens_nothing_else(keyed: Any) -> None:
    r = keyed.post_chat("tok-b", headers=ALICE_AUTH)
    token = quote(r.headers["x-ringcast-resume-token"])
    r.read_all_and_close()
    keyed.post_chat("tok-c", headers=ALICE_AUTH).read_all_and_close()
    status, _, body = keyed.request("GET", f"/v1/stream?conv_id=tok-c&token={token}")
    assert status == 401 and b"resume token" in body
    for method, path in [
        ("DELETE", f"/v1/stream?conv_id=tok-b&token={token}"),
        ("GET", f"/v1/streams?token={token}"),
        ("POST", f"/v1/streams/lookup?token={token}"),
    ]:
        status, _, _ = keyed.request(method, path, b"{}" if method == "POST" else None)
        assert status == 401, (method, path)
    # The stream is still there for its key.
    status, _, _ = keyed.request("GET", "/v1/stream?conv_id=tok-b", headers=ALICE_AUTH)
    assert status == 200


def test_a_token_of_another_key_reads_nothing_of_this_one(keyed: Any) -> None:
    keyed.post_chat("tok-d", headers=ALICE_AUTH).read_all_and_close()
    r = keyed.post_chat("tok-d", headers={"Authorization": "Bearer bob"})
    bob_token = quote(r.headers["x-ringcast-resume-token"])
    bob_whole = r.read_all_and_close()
    # Bob's token reads Bob's tok-d, never Alice's session of the same id.
    _, _, body = keyed.request("GET", f"/v1/stream?conv_id=tok-d&token={bob_token}")
    assert body == bob_whole


def test_no_token_without_keys(serve: Any) -> None:
    with serve("--tokens-per-s", "0", http_procs=1) as s:
        r = s.post_chat("plain")
        assert "x-ringcast-resume-token" not in r.headers
        r.read_all_and_close()


def test_last_event_id_at_or_past_the_end_of_a_finished_stream_is_204(keyed: Any) -> None:
    whole = keyed.post_chat("end-1", headers=ALICE_AUTH).read_all_and_close()
    n = len(whole)
    for last in (n, n + 100):
        status, _, body = keyed.request(
            "GET", "/v1/stream?conv_id=end-1", headers={**ALICE_AUTH, "Last-Event-ID": str(last)}
        )
        assert (status, body) == (204, b"")
    # from= keeps its documented answers for clients that count bytes.
    status, _, body = keyed.request("GET", f"/v1/stream?conv_id=end-1&from={n}", headers=ALICE_AUTH)
    assert (status, body) == (200, b"")
    status, _, _ = keyed.request(
        "GET", f"/v1/stream?conv_id=end-1&from={n + 1}", headers=ALICE_AUTH
    )
    assert status == 416
