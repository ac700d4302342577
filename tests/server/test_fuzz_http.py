"""Generated requests against a live ``ringcast serve`` (issue 13's HTTP fuzzing): request
heads, query strings, JSON bodies of every shape and per-key combinations, sent raw.

Whatever comes in, the server must answer with a status below 500 within a bound (or close
the connection on a request it cannot frame), keep every process alive, and never hand one
key's bytes to another caller. Another key's stream is planted first; its chunk id, random
per stream, must never show up in an answer to anyone else.

The number of examples is fixed (no wall-clock budget: hypothesis' own database and shrinking
stay deterministic), sized so the module runs in well under a minute on a loaded machine;
``RINGCAST_FUZZ_EXAMPLES`` raises it for a longer local campaign.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.timeout(300)

KEY_A, KEY_B = "fuzz-key-a", "fuzz-key-b"
VICTIM = "victim-conv"
ANSWER_BOUND = 10.0
"""Seconds within which every complete request gets its response head."""
BODY_CAP = 1 << 20
"""Bytes of a response body read before the client leaves (a stream may go on)."""

EXAMPLES = int(os.environ.get("RINGCAST_FUZZ_EXAMPLES", "400"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    database=None,
)


@pytest.fixture(scope="module")
def target(serve_module: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    log = tmp_path_factory.mktemp("fuzzlog") / "server.log"
    with serve_module(
        "--tokens-per-s",
        "0",
        "--session-bytes",
        "65536",
        "--max-body",
        "65536",
        "--max-sessions",
        "256",
        "--api-key",
        KEY_A,
        "--api-key",
        KEY_B,
        http_procs=1,
        log=log,
    ) as s:
        r = s.post_chat(VICTIM, 8, {"Authorization": f"Bearer {KEY_B}"})
        body = r.read_all_and_close()
        m = re.search(rb'"id":"(chatcmpl-[0-9a-f]+)"', body)
        assert r.status == 200 and m, body[:200]
        s.victim_marker = m.group(1)
        yield s
        # After the campaign: every process is the one that started, and answers.
        assert s.request("GET", "/health")[0] == 200
        assert s.metric('restarts_total{role="http"}') == 0
        assert s.metric('restarts_total{role="worker"}') == 0
        assert s.metric('http_errors_total{class="5xx"}') == 0
        # The victim's bytes are still whole for their own key.
        status, _, again = s.request(
            "GET", f"/v1/stream/{VICTIM}", headers={"Authorization": f"Bearer {KEY_B}"}
        )
        assert status == 200 and again == body
    assert "Traceback" not in log.read_text()


def exchange(port: int, raw: bytes) -> tuple[int | None, bytes]:
    """Send ``raw``, half-close, and read the answer: (status, everything read), or
    (None, b"") if the server closed without answering. Fails if nothing comes within
    :data:`ANSWER_BOUND`."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=ANSWER_BOUND)
    try:
        try:
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused mid-request (e.g. 413 before the whole body): read what it said
        data = b""
        try:
            while len(data) < BODY_CAP:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except ConnectionResetError:
            pass
        except TimeoutError:
            pytest.fail(f"no answer within {ANSWER_BOUND} s to {raw[:200]!r}")
    finally:
        sock.close()
    m = re.match(rb"HTTP/1\.[01] (\d{3}) ", data)
    return (int(m.group(1)) if m else None), data


STATUSES: set[int] = set()
"""Every status the campaign was answered with."""


def check(target: Any, raw: bytes) -> None:
    status, data = exchange(target.port, raw)
    if status is not None:
        STATUSES.add(status)
        assert status < 500, (raw[:300], data[:300])
    assert target.victim_marker not in data, raw[:300]


# -- strategies

tokens = st.text(
    alphabet="!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIZ", min_size=1
)
methods = st.sampled_from(["GET", "POST", "DELETE", "OPTIONS", "PUT", "HEAD", "PATCH"]) | tokens
ids = st.sampled_from([VICTIM, "x", "x::m", "", "a/b", "café", "%00", "..", "%ff"]) | st.text(
    max_size=40
)
offsets = st.sampled_from(["0", "5", "-1", "5%0A", "1e3", " 1", "99999999999999999999", ""]) | (
    st.integers(0, 1 << 70).map(str)
)
routes = st.sampled_from(
    [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/stream",
        "/v1/streams",
        "/v1/streams/lookup",
        "/health",
        "/metrics",
        "/v1/models",
        "/",
        "/v1/stream/",
        "//v1/stream",
    ]
)


def quote(text: str) -> str:
    from urllib.parse import quote as q

    return q(text, safe="/:@")


@st.composite
def targets(draw: st.DrawFn) -> str:
    path = draw(routes)
    if path.startswith("/v1/stream") and draw(st.booleans()):
        path = "/v1/stream/" + quote(draw(ids))
    params = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["conv_id", "from", "conversation_id", "x", ""]),
                ids | offsets,
            ),
            max_size=4,
        )
    )
    query = "&".join(f"{quote(k)}={quote(v)}" for k, v in params)
    if draw(st.booleans()):
        query += draw(st.sampled_from(["", "&", "=", "%", "%zz", "+", "&&from", "from=%0A"]))
    return path + ("?" + query if query else "")


auth_headers = st.sampled_from(
    [
        [],
        [("Authorization", f"Bearer {KEY_A}")],
        [("X-Api-Key", KEY_A)],
        [("Authorization", "Bearer wrong")],
        [("Authorization", f"bearer  {KEY_A} ")],
        [("Authorization", f"Basic {KEY_A}")],
        [("Authorization", f"Bearer {KEY_A}"), ("X-Api-Key", "wrong")],
        [("X-Api-Key", ""), ("Authorization", "Bearer ")],
    ]
)

json_leaf = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20)
)
json_value = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "x"]) | json_value},
    optional={"content": st.text(max_size=30) | json_value},
)
chat_body = st.fixed_dictionaries(
    {},
    optional={
        "messages": st.lists(message, max_size=3) | json_value,
        "prompt": st.text(max_size=30) | st.lists(st.text(max_size=10), max_size=3) | json_value,
        "stream": st.booleans() | json_value,
        "max_tokens": st.integers(-3, 40) | json_value,
        "max_completion_tokens": st.integers(-3, 40),
        "n": st.integers(0, 3),
        "model": st.text(max_size=10),
        "stream_options": json_value,
        "conversation_ids": st.lists(ids, max_size=6) | json_value,
    },
)


def nested(depth: int) -> bytes:
    return b'{"messages":[],"x":' + b"[" * depth + b"]" * depth + b"}"


bodies = (
    chat_body.map(lambda d: json.dumps(d).encode())
    | json_value.map(lambda v: json.dumps(v).encode())
    | st.binary(max_size=200)
    | st.integers(900, 3000).map(nested)
)


@st.composite
def chunk_encoded(draw: st.DrawFn, body: bytes) -> bytes:
    """``body`` as a well-formed chunked body: cut in up to five chunks, each with a chunk
    extension or not, the last chunk with trailer fields or not."""
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(body) - 1)), max_size=4)))
    edges = [0, *cuts, len(body)]
    pieces = [body[a:b] for a, b in itertools.pairwise(edges) if body[a:b]]
    ext = draw(st.sampled_from([b"", b";a", b';a=b;c="d"']))
    trailer = draw(st.sampled_from([b"", b"X-T: 1\r\n", b"A: b\r\nC: d\r\n"]))
    chunks = b"".join(b"%x%s\r\n%s\r\n" % (len(p), ext, p) for p in pieces)
    return chunks + b"0\r\n" + trailer + b"\r\n"


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    method = draw(methods)
    path = draw(targets())
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.0"]))
    headers = [("Host", "fuzz"), *draw(auth_headers)]
    if draw(st.booleans()):
        headers.append(("X-Conversation-Id", draw(ids)))
    if draw(st.booleans()):
        headers.append(("Last-Event-ID", draw(offsets)))
    body = draw(bodies) if method in ("POST", "PUT", "PATCH") or draw(st.booleans()) else b""
    framing = draw(
        st.sampled_from(["exact", "exact", "exact", "short", "long", "chunked", "encoded", "none"])
    )
    if framing == "exact":
        headers.append(("Content-Length", str(len(body))))
    elif framing == "short":
        headers.append(("Content-Length", str(max(0, len(body) - 1))))
    elif framing == "long":
        headers.append(("Content-Length", str(len(body) + 5)))
    elif framing == "chunked":  # (the body left as it is: mostly malformed chunks)
        headers.append(("Transfer-Encoding", "chunked"))
    elif framing == "encoded":  # well-formed chunks, with extensions and trailer fields
        headers.append(("Transfer-Encoding", "chunked"))
        body = draw(chunk_encoded(body))
    if draw(st.booleans()):
        headers.append(("Expect", "100-continue"))
    headers += draw(st.lists(st.tuples(tokens, st.text(max_size=20)), max_size=3))
    head = f"{method} {path} {version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
    return head.encode("utf-8", "surrogatepass") + b"\r\n" + body


# -- the campaign


@FUZZ
@given(raw=requests())
def test_generated_requests(target: Any, raw: bytes) -> None:
    check(target, raw)


@FUZZ
@given(
    line=st.binary(max_size=120),
    rest=st.lists(st.binary(max_size=60), max_size=5),
    end=st.sampled_from([b"\r\n\r\n", b"\n\n", b"\r\r", b"\r\n", b""]),
)
def test_generated_heads(target: Any, line: bytes, rest: list[bytes], end: bytes) -> None:
    """Arbitrary bytes where the request line and headers go."""
    check(target, line + b"".join(b"\r\n" + h for h in rest) + end)


@FUZZ
@given(
    route=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/streams/lookup"]),
    body=bodies,
    key=st.sampled_from([KEY_A, "wrong", ""]),
    conv=st.none() | ids,
)
def test_generated_json_per_key(
    target: Any, route: str, body: bytes, key: str, conv: str | None
) -> None:
    """Well-framed requests with generated JSON, for key A, a wrong key and none, at the
    victim's id among others: never key B's bytes."""
    head = f"POST {route} HTTP/1.1\r\nHost: fuzz\r\nContent-Length: {len(body)}\r\n"
    if key:
        head += f"Authorization: Bearer {key}\r\n"
    if conv is not None:
        head += f"X-Conversation-Id: {conv}\r\n"
    check(target, head.encode("utf-8", "surrogatepass") + b"\r\n" + body)


def test_campaign_reached_the_routes(target: Any) -> None:
    """The generated requests got past the framing and the key to the routes' handlers (a
    fuzz that never got past 401 would prove little)."""
    if not STATUSES:
        pytest.skip("the campaign's tests did not run")
    assert {200, 400, 401, 404, 405} <= STATUSES, STATUSES
