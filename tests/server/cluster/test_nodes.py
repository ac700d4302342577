"""Several ``ringcast serve`` nodes on one machine (own ports, own segments) sharing a private
``redis-server``, or a 3-master Redis Cluster, that the tests start: every stream is readable,
resumable, listable and cancellable on every node, byte for byte, and survives the loss of the
node that produced it up to what that node had mirrored."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from ringcast import Segment

LEASE_MS = "600"
Nodes = Callable[..., list[Any]]


def uid() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture(params=["standalone", "cluster"])
def redis_args(request: pytest.FixtureRequest) -> list[str]:
    if request.param == "cluster":
        return ["--redis-cluster", request.getfixturevalue("redis_cluster").seeds]
    return ["--redis", request.getfixturevalue("redis_server").url]


def stop_all(servers: list[Any]) -> None:
    """Stop every node, and kill the process group of every one whatever happens meanwhile
    (a node that does not stop, the test's timeout or a Ctrl-C cutting the stops short)."""
    try:
        for s in servers:
            s.stop()
    finally:
        for s in servers:
            s.kill()


@pytest.fixture
def started_nodes() -> Iterator[list[Any]]:
    """The nodes a test started (each in its own process group), stopped after it."""
    started: list[Any] = []
    try:
        yield started
    finally:
        stop_all(started)


@pytest.fixture
def nodes(serve: Any, tmp_path: Path, started_nodes: list[Any]) -> Nodes:
    """``nodes(n, *args, redis=[...])``: n nodes sharing one Redis, stopped after the test."""

    def start(n: int, *args: str, redis: list[str], **kw: Any) -> list[Any]:
        out = []
        for _ in range(n):
            name = "node-" + uid()
            d = tmp_path / name
            d.mkdir()
            s = serve.at(d).start(
                *redis,
                "--node-id",
                name,
                "--node-lease-ms",
                LEASE_MS,
                *args,
                http_procs=1,
                new_session=True,
                **kw,
            )
            s.node_id = name
            started_nodes.append(s)
            out.append(s)
        return out

    return start


def lookup(node: Any, conv: str, headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    status, _, body = node.request(
        "POST", "/v1/streams/lookup", {"conversation_ids": [conv]}, headers=headers
    )
    assert status == 200
    found: list[dict[str, Any]] = json.loads(body)
    return found


def mirror_report(node: Any, conv: str) -> str:
    """What ``node`` shows of its mirror and of ``conv`` (for a report when a stream did not
    reach another node): its local lookup and its ``ringcast_mirror_*`` samples."""
    try:
        _, _, body = node.request("GET", "/metrics")
        found = lookup(node, conv)
    except (OSError, AssertionError) as e:
        return f"node {node.port}: {e!r}"
    samples = [
        ln
        for ln in body.decode().splitlines()
        if ln.startswith(("ringcast_mirror_", "ringcast_redis_"))
    ]
    return f"node {node.port} has {found}, its Redis figures: {'; '.join(samples)}"


def wait_in_redis(wait_for: Any, source: Any, conv: str, *others: Any) -> None:
    """Wait until every one of ``others`` finds ``conv`` (produced on ``source``) by a
    lookup; a timeout reports what each of them and ``source`` (and its mirror) show."""
    wait_for(
        lambda: all(lookup(o, conv) for o in others),
        "the stream to reach Redis",
        explain=lambda: " | ".join(mirror_report(n, conv) for n in (source, *others)),
    )


def first_id(body: bytes) -> int:
    m = re.search(rb"^id: (\d+)$", body, re.M)
    assert m is not None
    return int(m.group(1))


def metric_sample(node: Any, name: str, labels: str = "") -> float:
    """The sample of ``ringcast_<name>`` with these labels (in any order)."""
    value: float = node.metric(name + labels)
    return value


def test_a_stream_is_byte_identical_on_every_node(
    redis_args: list[str], nodes: Nodes, wait_for: Any, check_ids: Any
) -> None:
    a, b, c = nodes(3, "--tokens-per-s", "100", redis=redis_args)
    conv = "conv-" + uid()
    post = a.post_chat(conv, max_tokens=60)
    first = post.read_at_least(600)
    wait_in_redis(wait_for, a, conv, b, c)
    mid, event_end = len(first) // 2, first_id(first)
    readers = [
        b.open_request("GET", f"/v1/stream?conv_id={conv}&from=0"),
        b.open_request("GET", f"/v1/stream?conv_id={conv}&from=7"),
        c.open_request("GET", f"/v1/stream?conv_id={conv}&from={mid}"),
        c.open_request("GET", f"/v1/stream/{conv}", headers={"Last-Event-ID": str(event_end)}),
    ]
    body = first + post.read_all_and_close()
    check_ids(body)
    assert body.endswith(b"data: [DONE]\n\n")
    for r, start in zip(readers, (0, 7, mid, event_end), strict=True):
        assert r.status == 200
        assert r.headers["x-ringcast-epoch"] == post.headers["x-ringcast-epoch"]
        # Only the producing node names the generation (it alone can check it).
        assert "x-ringcast-generation" not in r.headers
        assert r.read_all_and_close() == body[start:]
    # A resume naming the producer's generation: checked there, taken as given elsewhere,
    # never refused for the stream it names.
    generation = post.headers["x-ringcast-generation"]
    for node in (a, b, c):
        url = f"/v1/stream?conv_id={conv}&from={mid}&generation={generation}"
        status, _, got = node.request("GET", url)
        assert (status, got) == (200, body[mid:])
    for node in (a, b, c):
        status, _, got = node.request("GET", f"/v1/stream?conv_id={conv}&from=100")
        assert (status, got) == (200, body[100:])
        (info,) = lookup(node, conv)
        assert (info["state"], info["total_bytes"], info["is_done"]) == ("done", len(body), True)
        _, _, listed = node.request("GET", "/v1/streams")
        assert conv in {i["conversation_id"] for i in json.loads(listed)}
        status, _, err = node.request("GET", f"/v1/stream?conv_id={conv}&from={len(body) + 1}")
        assert status == 416, err
        assert node.request("GET", f"/v1/stream?conv_id=nope-{uid()}")[0] == 404


def test_a_reader_on_another_node_right_after_the_post_gets_the_stream(
    redis_args: list[str], nodes: Nodes
) -> None:
    """A GET on node B sent as soon as node A answered the POST's head (before A's mirror
    has claimed the stream in Redis) waits for the claim instead of answering 404, and
    gets the same bytes as the POST (docs/CLUSTER.md's two-node example)."""
    a, b = nodes(2, "--tokens-per-s", "100", redis=redis_args)
    for _ in range(3):
        conv = "conv-" + uid()
        post = a.post_chat(conv, max_tokens=30)  # returns once the head is in
        status, _, got = b.request("GET", f"/v1/stream?conv_id={conv}&from=0")
        body = post.read_all_and_close()
        assert status == 200, got
        assert got == body and body.endswith(b"data: [DONE]\n\n")
    # A stream that is nowhere is still a 404, once the wait is over.
    assert b.request("GET", f"/v1/stream?conv_id=nowhere-{uid()}&from=0")[0] == 404


def test_delete_on_another_node_stops_the_producer(
    redis_args: list[str], nodes: Nodes, wait_for: Any, error_of: Any, sse_events: Any
) -> None:
    a, b = nodes(2, "--tokens-per-s", "20", redis=redis_args)
    conv = "conv-" + uid()
    post = a.post_chat(conv, max_tokens=5000)
    post.read_at_least(300)
    wait_in_redis(wait_for, a, conv, b)
    assert b.request("DELETE", f"/v1/stream?conv_id={conv}")[0] == 204
    body = post.read_all_and_close()
    assert error_of(sse_events(body)[-1])["type"] == "cancelled"
    wait_for(
        lambda: metric_sample(a, "worker_jobs_total", '{worker="0",outcome="cancelled"}') == 1,
        "A's worker to see the cancel",
    )
    wait_for(lambda: metric_sample(a, "mirror_controls_total") == 1, "A's mirror to count it")
    for node in (a, b):
        assert lookup(node, conv) == []
        assert node.request("GET", f"/v1/stream?conv_id={conv}")[0] == 404


def test_replace_across_nodes_has_one_winner(
    redis_args: list[str], nodes: Nodes, wait_for: Any, error_of: Any, sse_events: Any
) -> None:
    a, b, c = nodes(3, "--tokens-per-s", "20", redis=redis_args)
    conv = "conv-" + uid()
    first = a.post_chat(conv, max_tokens=5000, prompt="first")
    first.read_at_least(300)
    wait_in_redis(wait_for, a, conv, c)
    second = b.post_chat(conv, max_tokens=10, prompt="second")
    assert error_of(sse_events(first.read_all_and_close())[-1])["type"] == "replaced"
    won = second.read_all_and_close()

    def c_has(body: bytes) -> bool:
        return [(i["state"], i["total_bytes"]) for i in lookup(c, conv)] == [("done", len(body))]

    wait_for(lambda: c_has(won), "the new stream to be the one in Redis")
    assert c.request("GET", f"/v1/stream?conv_id={conv}")[2] == won
    # Two nodes at once: one wins, the other's client learns it was replaced.
    conv = "race-" + uid()
    posts = [n.post_chat(conv, max_tokens=40, prompt=f"from {i}") for i, n in enumerate((a, b))]
    bodies = [p.read_all_and_close() for p in posts]
    ends = [sse_events(x)[-1] for x in bodies]
    replaced = [e for e in ends if e.startswith(b"data: {") and b'"replaced"' in e]
    assert len(replaced) == 1, ends
    winners = [x for x, e in zip(bodies, ends, strict=True) if e.endswith(b"data: [DONE]\n\n")]
    assert len(winners) == 1, ends
    winner = winners[0]
    wait_for(lambda: c_has(winner), "the winner to be the one in Redis")
    assert c.request("GET", f"/v1/stream?conv_id={conv}")[2] == winner


def test_two_keys_three_nodes_never_see_each_other(
    redis_args: list[str], nodes: Nodes, wait_for: Any
) -> None:
    keys = ["--api-key", "key-one", "--api-key", "key-two"]
    a, b, c = nodes(3, *keys, "--tokens-per-s", "0", redis=redis_args)
    h1, h2 = {"Authorization": "Bearer key-one"}, {"Authorization": "Bearer key-two"}
    conv, only1 = "shared-" + uid(), "only-one-" + uid()
    body1 = a.post_chat(conv, max_tokens=8, headers=h1, prompt="one").read_all_and_close()
    body2 = b.post_chat(conv, max_tokens=12, headers=h2, prompt="two").read_all_and_close()
    a.post_chat(only1, max_tokens=4, headers=h1).read_all_and_close()
    assert body1 != body2
    wait_for(lambda: len(lookup(c, conv, h1)) == 1 and len(lookup(c, conv, h2)) == 1, "Redis")
    wait_for(lambda: lookup(c, only1, h1), "Redis")
    for node in (a, b, c):
        assert node.request("GET", f"/v1/stream?conv_id={conv}", headers=h1)[2] == body1
        assert node.request("GET", f"/v1/stream?conv_id={conv}", headers=h2)[2] == body2
        assert node.request("GET", f"/v1/stream?conv_id={only1}", headers=h2)[0] == 404
        assert lookup(node, only1, h2) == []
        _, _, listed = node.request("GET", "/v1/streams", headers=h2)
        assert {i["conversation_id"] for i in json.loads(listed)} == {conv}
        assert node.request("DELETE", f"/v1/stream?conv_id={only1}", headers=h2)[0] == 204
        assert lookup(node, only1, h1)  # a DELETE with the other key touched nothing


def mirror_pids(node: Any) -> list[int]:
    """Pids of the node's live mirror processes, by index (``... mirror CONFIG INDEX``)."""
    import psutil

    found: dict[int, int] = {}
    for c in psutil.Process(node.proc.pid).children():
        try:
            cmd = c.cmdline()
            if "ringcast.server.cluster.mirror" in cmd and c.status() != psutil.STATUS_ZOMBIE:
                found[int(cmd[-1])] = c.pid
        except psutil.NoSuchProcess:
            continue
    return [found[i] for i in sorted(found)]


def test_a_killed_mirror_process_is_restarted_and_its_streams_go_on(
    redis_server: Any, nodes: Nodes, wait_for: Any, check_ids: Any
) -> None:
    """``--mirror-procs 2``: each mirror process copies its share of the streams; one killed
    mid-stream is restarted by the supervisor and its streams reach the other node whole."""
    a, b = nodes(
        2, "--tokens-per-s", "100", "--mirror-procs", "2", redis=["--redis", redis_server.url]
    )
    assert len(wait_for(lambda: len(mirror_pids(a)) == 2 and mirror_pids(a), "two mirrors")) == 2
    assert re.search(r"; node node-\w+ mirrored to Redis by 2 mirror processes\)$", a.banner)
    convs = [f"conv-{i}-{uid()}" for i in range(4)]
    posts = [a.post_chat(conv, max_tokens=150) for conv in convs]
    firsts = [p.read_at_least(500) for p in posts]
    for conv in convs:
        wait_in_redis(wait_for, a, conv, b)
    followers = [b.open_request("GET", f"/v1/stream?conv_id={conv}") for conv in convs]
    wait_for(lambda: metric_sample(a, "mirror_sessions") == 4, "both mirrors to report")
    victim = mirror_pids(a)[1]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: metric_sample(a, "restarts_total", '{role="mirror"}') == 1, "the restart")
    wait_for(lambda: len(mirror_pids(a)) == 2 and victim not in mirror_pids(a), "a new mirror")
    for post, first, follower in zip(posts, firsts, followers, strict=True):
        body = first + post.read_all_and_close()
        check_ids(body)
        assert body.endswith(b"data: [DONE]\n\n")
        assert follower.read_all_and_close() == body

    def connected() -> bool:
        _, _, health = a.request("GET", "/health")
        return bool(json.loads(health)["mirror"]["connected"])

    wait_for(connected, "both mirrors to say they are connected (the new one too)")


def test_cluster_options_are_checked_before_anything_starts(tmp_path: Path) -> None:
    def serve(*args: str, env: dict[str, str] | None = None, code: str = "") -> str:
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; " + code + "from ringcast.cli import main; sys.exit(main())",
                "serve",
                *args,
            ],
            capture_output=True,
            text=True,
            env={**os.environ, **(env or {})},
            cwd=tmp_path,
            timeout=60,
        )
        assert out.returncode == 2, out
        return out.stderr

    assert "--node-id only applies with --redis" in serve("--node-id", "x")
    assert "redis://, rediss:// or unix://" in serve("--redis", "http://127.0.0.1:1")
    bare = serve("--redis", "localhost:6379")  # no scheme: not "--redis 'localhost'"
    assert "--redis has no scheme" in bare and "redis://127.0.0.1:6379/0" in bare
    assert "secret" not in serve("--redis", "http://:secret@h:1")
    assert "give one" in serve("--redis", "redis://h:1", "--redis-cluster", "h:1")
    assert "is not HOST:PORT" in serve("--redis-cluster", "h:1,nope")
    assert "--mirror-ms" in serve("--redis", "redis://h:1", "--mirror-ms", "0")
    assert "--mirror-procs must be" in serve("--redis", "redis://h:1", "--mirror-procs", "65")
    assert "--mirror-procs only applies" in serve("--mirror-procs", "2")
    assert "too short" in serve("--redis", "redis://h:1", "--node-lease-ms", "50")
    assert "non-empty ASCII" in serve("--redis", "redis://h:1", "--node-id", "节点")
    missing = serve("--redis", "redis://h:1", code="sys.modules['redis'] = None; ")
    assert missing.count("\n") == 1 and "pip install 'ringcast[redis]'" in missing
    env_bad = serve(env={"RINGCAST_REDIS_URL": "mysql://h:1"})
    assert "redis://, rediss:// or unix://" in env_bad
    assert "$RINGCAST_REDIS_URL has scheme mysql://" in env_bad


def test_without_redis_there_is_no_mirror(serve: Any) -> None:
    with serve(http_procs=1) as s:
        assert "(1 HTTP process, jobs run in it, " in s.banner and "mirror" not in s.banner
        _, _, health = s.request("GET", "/health")
        assert "mirror" not in json.loads(health)
        _, _, metrics = s.request("GET", "/metrics")
        assert b"ringcast_mirror" not in metrics
        assert "ringcast.server.cluster.mirror" not in " ".join(
            " ".join(p.cmdline()) for p in __import__("psutil").Process(s.proc.pid).children()
        )


def test_redis_killed_or_paused_never_stops_local_serving(
    redis_server: Any, nodes: Nodes, wait_for: Any, check_ids: Any
) -> None:
    a, b = nodes(2, "--tokens-per-s", "100", redis=["--redis", redis_server.url])
    conv = "conv-" + uid()
    post = a.post_chat(conv, max_tokens=300)
    first = post.read_at_least(1000)
    wait_in_redis(wait_for, a, conv, b)
    follower = b.open_request("GET", f"/v1/stream?conv_id={conv}")
    redis_server.kill()
    during = post.read_at_least(5000)  # the local client goes on
    assert [i["conversation_id"] for i in lookup(a, conv)] == [conv]  # so do local lookups
    redis_server.start()  # empty: the mirror claims the stream again and catches up
    body = first + during + post.read_all_and_close()
    check_ids(body)
    assert body.endswith(b"data: [DONE]\n\n")
    assert follower.read_all_and_close() == body
    wait_for(lambda: metric_sample(a, "redis_reconnects_total") >= 1, "the reconnect counted")
    assert metric_sample(a, "redis_errors_total", '{role="mirror"}') >= 1
    # Paused (every client blocked for a second): the same.
    conv = "conv-" + uid()
    post = a.post_chat(conv, max_tokens=200)
    first = post.read_at_least(1000)
    wait_in_redis(wait_for, a, conv, b)
    follower = b.open_request("GET", f"/v1/stream?conv_id={conv}")
    redis_server.cli("CLIENT", "PAUSE", "1000")
    body = first + post.read_all_and_close()
    assert follower.read_all_and_close() == body
    _, _, health = a.request("GET", "/health")
    assert json.loads(health)["mirror"]["node_id"] == a.node_id


def test_bytes_dropped_before_they_were_mirrored_are_a_410_elsewhere(
    redis_server: Any, nodes: Nodes, wait_for: Any
) -> None:
    a, b = nodes(
        2, "--tokens-per-s", "1000", "--session-bytes", "16384", redis=["--redis", redis_server.url]
    )
    conv = "conv-" + uid()
    redis_server.kill()
    a.post_chat(conv, max_tokens=400).read_all_and_close()  # ~90 KB through 16 KiB
    (here,) = lookup(a, conv)
    total = here["total_bytes"]
    redis_server.start()
    wait_for(lambda: [i["state"] for i in lookup(b, conv)] == ["done"], "the catch-up")
    status, _, err = b.request("GET", f"/v1/stream?conv_id={conv}&from=0")
    assert status == 410
    first = json.loads(err)["error"]["first_available"]
    assert here["first_available"] <= first < total and total - 16384 <= first
    ring = a.request("GET", f"/v1/stream?conv_id={conv}&from={first}")[2]
    assert b.request("GET", f"/v1/stream?conv_id={conv}&from={first}")[2] == ring
    assert len(ring) == total - first
    wait_for(lambda: metric_sample(a, "mirror_gaps_total") == 1, "the gap counted")
    assert metric_sample(a, "mirror_gap_bytes_total") == first


@pytest.mark.slow
@pytest.mark.timeout(600)  # 30 server starts: ~1.5 min alone, longer on a busy machine
def test_kill_9_of_a_node_loses_only_what_it_had_not_mirrored(
    serve: Any,
    tmp_path: Path,
    redis_server: Any,
    started_nodes: list[Any],
    wait_for: Any,
    check_ids: Any,
    error_of: Any,
    sse_events: Any,
) -> None:
    """30 rounds: node A streams, a reader on B follows it, A's whole process group is
    killed; B's reader gets exactly a prefix of what A's ring held (what was mirrored), then
    ``node_lost``; a resume on B from the middle gets the same; lookups show it failed."""
    redis = ["--redis", redis_server.url, "--node-lease-ms", LEASE_MS, "--mirror-ms", "25"]
    b_dir = tmp_path / "b"
    b_dir.mkdir()
    b = serve.at(b_dir).start(*redis, "--node-id", "b", http_procs=1, new_session=True)
    started_nodes.append(b)  # stopped, or its group killed, however the test ends
    losses: list[int] = []
    try:
        for round_ in range(30):
            a_dir = tmp_path / f"a{round_}"
            a_dir.mkdir()
            a = serve.at(a_dir).start(
                *redis, "--node-id", "a", "--tokens-per-s", "200", http_procs=1, new_session=True
            )
            started_nodes.append(a)
            conv = f"conv-{round_}-{uid()}"
            try:
                post = a.post_chat(conv, max_tokens=100_000)
                post.read_at_least(2000)
                wait_in_redis(wait_for, a, conv, b)
                follower = b.open_request("GET", f"/v1/stream?conv_id={conv}")
                seen = follower.read_at_least(1000 + 97 * round_)  # another moment each round
            finally:
                a.kill()  # kill -9 of its whole process group
            started_nodes.remove(a)
            post.close()
            got = seen + follower.read_all_and_close()
            dead = Segment.open(str(a.segment))
            ring = dead.reader(conv, 0).read_nowait() or b""
            dead.close()
            events = sse_events(got)
            assert error_of(events[-1])["type"] == "node_lost"
            mirrored = got[: len(got) - len(events[-1])]
            assert ring.startswith(mirrored) and mirrored, (len(ring), len(mirrored))
            check_ids(mirrored)
            losses.append(len(ring) - len(mirrored))
            (info,) = lookup(b, conv)
            assert (info["state"], info["total_bytes"]) == ("failed", len(mirrored))
            mid = len(mirrored) // 2
            again = b.request("GET", f"/v1/stream?conv_id={conv}&from={mid}")[2]
            assert again == mirrored[mid:] + events[-1]
            os.unlink(a.segment)
    finally:
        stop_all([b])
    print(f"bytes produced but not mirrored at the kill: max {max(losses)}, rounds {losses}")


def test_a_conversation_reads_as_a_durable_stream_on_another_node(
    redis_server: Any, nodes: Nodes, wait_for: Any
) -> None:
    """The ``durable-streams`` client on node B reads (catch-up, then a live SSE tail to the
    end) a conversation produced on node A, byte-identical to ``/v1/stream``."""
    from durable_streams import stream

    a, b = nodes(2, "--tokens-per-s", "50", redis=["--redis", redis_server.url])
    conv = "conv-" + uid()
    post = a.post_chat(conv, max_tokens=40)
    first = post.read_at_least(300)
    wait_in_redis(wait_for, a, conv, b)
    status, _, tail = b.request("GET", f"/ds/v1/conversations/{conv}?offset=-1&live=sse")
    body = first + post.read_all_and_close()
    assert body.endswith(b"data: [DONE]\n\n")
    assert status == 200
    events = [e for e in tail.split(b"\n\n") if e]
    data = b"".join(
        b"\n".join(
            ln[6:] if ln.startswith(b"data: ") else ln[5:]
            for ln in e.split(b"\n")
            if ln.startswith(b"data:")
        )
        for e in events
        if e.startswith(b"event: data\n")
    )
    assert data == body
    assert b'"streamClosed":true' in events[-1]
    wait_for(lambda: lookup(b, conv)[0]["is_done"], "the end to reach node B")
    with stream(f"{b.url}/ds/v1/conversations/{conv}", live=False) as res:
        assert res.read_bytes() == body


def test_a_generic_durable_stream_works_from_every_node(
    redis_args: list[str], nodes: Nodes, wait_for: Any
) -> None:
    """The ``durable-streams`` client writes, reads back, tails live (SSE and long-poll) and
    resumes a generic stream created on node A through node B: B serves reads from Redis and
    forwards appends, a duplicate create, the close and the delete to A. Another key sees
    nothing of it on either node."""

    import httpx
    from durable_streams import DurableStream, stream

    keys = ["--api-key", "key-one", "--api-key", "key-two"]
    a, b = nodes(2, *keys, redis=redis_args)
    h1, h2 = {"Authorization": "Bearer key-one"}, {"Authorization": "Bearer key-two"}
    name = "log/" + uid()
    path = f"/ds/v1/stream/{name}"
    ua, ub = a.url + path, b.url + path
    text = {"Content-Type": "text/plain"}

    def msgs(lo: int, hi: int) -> list[bytes]:
        return [f"line {i}\n".encode() for i in range(lo, hi)]

    with (
        httpx.Client(headers=h1) as http,
        httpx.Client(headers=h1) as sse_http,
        httpx.Client(headers=h1) as poll_http,
    ):
        on_a = DurableStream.create(ua, content_type="text/plain", ttl_seconds=600, client=http)
        on_b = DurableStream(ub, content_type="text/plain", client=http, batching=False)
        sent = msgs(0, 5)
        for m in sent:
            on_a.append(m)
        # A create on B of A's stream is A's answer: idempotent, or a conflict.
        status, hs, _ = b.request("PUT", path, b"", {**h1, **text, "Stream-TTL": "600"})
        assert (status, hs["x-ringcast-node"]) == (200, a.node_id)
        assert b.request("PUT", path, b"", {**h1, "Content-Type": "application/json"})[0] == 409
        for m in msgs(5, 10):
            on_b.append(m)  # forwarded to A
            sent.append(m)
        wait_for(
            lambda: (
                b.request("HEAD", path, headers=h1)[1].get("stream-next-offset")
                == a.request("HEAD", path, headers=h1)[1]["stream-next-offset"]
            ),
            "B to see every append",
        )
        status, hs, _ = b.request("HEAD", path, headers=h1)
        assert (status, hs["content-type"], hs["stream-ttl"]) == (200, "text/plain", "600")
        with stream(ub, live=False, client=http) as res:
            assert res.read_bytes() == b"".join(sent)
            saved = res.offset

        later = msgs(10, 40)
        want = b"".join(later)
        got: dict[str, bytearray] = {"sse": bytearray(), "long-poll": bytearray()}
        offsets: dict[str, str] = {}

        errors: list[BaseException] = []

        def tail(live: str, client: httpx.Client) -> None:
            try:
                with stream(ub, offset=saved, live=live, client=client) as res:  # type: ignore[arg-type]
                    for ev in res.iter_events(mode="text"):  # SSE has no bytes mode
                        got[live].extend(ev.data.encode())
                        offsets[live] = ev.next_offset
                        if len(got[live]) >= len(want):
                            return
            except BaseException as e:
                errors.append(e)

        tails = [
            threading.Thread(target=tail, args=("sse", sse_http)),
            threading.Thread(target=tail, args=("long-poll", poll_http)),
        ]
        for t in tails:
            t.start()
        for i, m in enumerate(later):
            (on_a if i % 2 else on_b).append(m)
        for t in tails:
            t.join(60)
            assert not t.is_alive()
        assert not errors, errors
        assert bytes(got["sse"]) == want and bytes(got["long-poll"]) == want
        # Resume on either node from offsets handed out by B.
        for url in (ua, ub):
            with stream(url, offset=saved, live=False, client=http) as res:
                assert res.read_bytes() == want
            with stream(url, offset=offsets["sse"], live=False, client=http) as res:
                assert res.read_bytes() == b""

        # Another key: nothing on either node, and its own stream of the same name is its own.
        for node in (a, b):
            for method in ("GET", "HEAD", "DELETE"):
                assert node.request(method, path, headers=h2)[0] == 404, (node, method)
            assert node.request("POST", path, b"x", {**h2, **text})[0] == 404
        assert b.request("PUT", path, b"two", {**h2, **text})[0] == 201
        assert b.request("GET", path, headers=h2)[2] == b"two"
        assert a.request("GET", path, headers=h1)[2] == b"".join(sent) + want

        # A fork made through B is made where its source is, and reads on both nodes.
        fork = f"/ds/v1/stream/fork-{uid()}"
        status, hs, _ = b.request("PUT", fork, b"", {**h1, **text, "Stream-Forked-From": path})
        assert (status, hs["x-ringcast-node"]) == (201, a.node_id)
        # Location is built from the Host the client gave B, not A's address.
        assert hs["location"].endswith(fork) and f":{a.port}/" not in hs["location"]
        copied = b"".join(sent) + want
        wait_for(lambda: b.request("GET", fork, headers=h1)[2] == copied, "the fork on B")
        assert a.request("GET", fork, headers=h1)[2] == copied

        # Close through B: B's SSE tail ends with the close.
        status, hs, _ = b.request("POST", path, b"", {**h1, "Stream-Closed": "true"})
        assert (status, hs["stream-closed"]) == (204, "true")
        wait_for(lambda: "stream-closed" in b.request("HEAD", path, headers=h1)[1], "the close")
        status, _, body = b.request("GET", f"{path}?offset={saved}&live=sse", headers=h1)
        assert status == 200 and b'"streamClosed":true' in body
        assert b.request("POST", path, b"late", {**h1, **text})[0] == 409

        # Delete through B: its fork outlives it, so it is a tombstone (410) on both nodes;
        # the fork deleted through B is gone (404) on both; key two's stream stays.
        assert b.request("DELETE", path, headers=h1)[0] == 204
        assert a.request("GET", path, headers=h1)[0] == 410
        wait_for(lambda: b.request("GET", path, headers=h1)[0] == 410, "the delete on B")
        assert b.request("DELETE", fork, headers=h1)[0] == 204
        assert a.request("GET", fork, headers=h1)[0] == 404
        wait_for(lambda: b.request("GET", fork, headers=h1)[0] == 404, "the fork's delete")
        assert a.request("GET", path, headers=h1)[0] == 404  # its last fork went
        assert b.request("GET", path, headers=h2)[2] == b"two"


def test_reads_on_another_node_slide_a_durable_streams_ttl(
    redis_server: Any, nodes: Nodes, wait_for: Any
) -> None:
    """``Stream-TTL`` counts from the last use on any node: reads on B keep a stream created
    on A alive past its TTL; once nobody uses it, it expires on both."""
    a, b = nodes(2, redis=["--redis", redis_server.url])
    path = f"/ds/v1/stream/ttl-{uid()}"
    hs = {"Content-Type": "text/plain", "Stream-TTL": "2"}
    assert a.request("PUT", path, b"kept", hs)[0] == 201
    # Its bytes: a read on B waits up to 0.5 s for the mirror to bring what A answered the
    # create with, and past that is a 200 of less, not up to date (a loaded machine's
    # window can be that late). This test is about the TTL, so it waits for them.
    wait_for(lambda: b.request("GET", path)[2] == b"kept", "the stream's bytes to reach node B")
    end = time.monotonic() + 5
    while time.monotonic() < end:
        assert b.request("GET", path)[2] == b"kept"
        time.sleep(0.3)
    assert a.request("GET", path)[2] == b"kept"  # 5 s after its creation, TTL 2 s
    time.sleep(2.5)
    assert b.request("GET", path)[0] == 404
    assert a.request("GET", path)[0] == 404


def ds_offset(n: int) -> str:
    return f"{0:016d}_{n:016d}"


def test_a_read_on_another_node_never_calls_a_stream_up_to_date_short_of_an_answered_write(
    redis_server: Any, nodes: Nodes, wait_for: Any
) -> None:
    """An append answered on A is mirrored within a flush window; a read on B meanwhile was
    a 200 of the older bytes with ``Stream-Up-To-Date: true`` (and, right after a create
    with a body whose first window the mirror claimed empty, of no bytes at all), and an
    offset A had handed out was a 400 on B. A's mirror is stopped here (SIGSTOP) between
    the two, so Redis cannot have the append: B waits a moment for it, then serves what
    Redis holds without calling it up to date; once the mirror runs, B has it all."""
    # A lease longer than the pause, so that B does not take A for lost meanwhile.
    a, b = nodes(2, "--node-lease-ms", "10000", redis=["--redis", redis_server.url])
    path = f"/ds/v1/stream/acked-{uid()}"
    text = {"Content-Type": "text/plain"}
    assert a.request("PUT", path, b"head", text)[0] == 201
    wait_for(lambda: b.request("GET", path)[2] == b"head", "the stream's bytes on node B")
    mirrors = mirror_pids(a)
    assert mirrors
    for pid in mirrors:
        os.kill(pid, signal.SIGSTOP)
    try:
        status, hs, _ = a.request("POST", path, b"tail", text)
        assert (status, hs["stream-next-offset"]) == (204, ds_offset(8))
        status, hs, body = b.request("GET", path)
        assert (status, body, hs["stream-next-offset"]) == (200, b"head", ds_offset(4))
        assert "stream-up-to-date" not in hs
        assert hs["cache-control"] == "no-cache"  # the same GET soon answers more
        status, hs, body = b.request("GET", f"{path}?offset=now")
        assert (status, hs["stream-next-offset"]) == (200, ds_offset(4))
        assert "stream-up-to-date" not in hs
        assert b.request("HEAD", path)[1]["stream-next-offset"] == ds_offset(4)
        # The offset A handed out is a valid one on B: nothing after it, up to date.
        status, hs, body = b.request("GET", f"{path}?offset={ds_offset(8)}")
        assert (status, body, hs["stream-next-offset"]) == (200, b"", ds_offset(8))
        assert hs["stream-up-to-date"] == "true"
        # An SSE tail from the start: its first control event is not up to date either.
        sse = b.open_request("GET", f"{path}?offset=-1&live=sse")
        first = sse.read_at_least(1)
        while b"event: control" not in first:
            first += sse.read_some()
        control = first.split(b"event: control\ndata:", 1)[1].split(b"\n", 1)[0]
        assert json.loads(control) == {
            "streamNextOffset": ds_offset(4),
            "streamCursor": json.loads(control)["streamCursor"],
        }
        # A long-poll from B's end waits for the bytes A answered with; a catch-up read
        # started now waits for them a moment (0.5 s), and has them or says it has not.
        got: dict[str, Any] = {}
        reads = [
            threading.Thread(target=lambda q=q: got.update({q: b.request("GET", path + q)}))
            for q in (f"?offset={ds_offset(4)}&live=long-poll", "")
        ]
        for t in reads:
            t.start()
        time.sleep(0.1)
    finally:
        for pid in mirrors:
            os.kill(pid, signal.SIGCONT)
    for t in reads:
        t.join(30)
    status, hs, body = got[f"?offset={ds_offset(4)}&live=long-poll"]
    assert (status, body, hs["stream-next-offset"]) == (200, b"tail", ds_offset(8))
    status, hs, body = got[""]
    assert status == 200 and body in (b"head", b"headtail")
    assert hs["stream-next-offset"] == ds_offset(len(body))
    assert ("stream-up-to-date" in hs) == (body == b"headtail")
    while b"data:tail" not in first:
        first += sse.read_some()
    sse.close()
    status, hs, body = b.request("GET", path)
    assert (status, body, hs["stream-next-offset"]) == (200, b"headtail", ds_offset(8))
    assert hs["stream-up-to-date"] == "true"


def raw_ds(node: Any, method: str, name: str, body: bytes = b"", extra: bytes = b"") -> Any:
    """A Durable Streams request whose target carries ``name`` as raw UTF-8 (as curl sends
    ``/ds/v1/stream/日本``): status, headers, body."""
    head = (
        f"{method} /ds/v1/stream/".encode() + name.encode() + b" HTTP/1.1\r\nHost: h\r\n"
        b"Content-Type: text/plain\r\n"
        + extra
        + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    return node.request(method, "", raw=head)


def test_a_non_ascii_stream_name_is_forwarded_to_its_node(
    redis_server: Any, nodes: Nodes, wait_for: Any
) -> None:
    """Appends and deletes through B of streams held by A whose names are raw UTF-8 reach A
    under the same name: a name outside Latin-1 was a 500 on B (the request line sent to A
    is Latin-1 bytes), one inside it a 400 from A (sent as Latin-1, not UTF-8)."""
    a, b = nodes(2, redis=["--redis", redis_server.url])
    for name in (f"日本-{uid()}", f"café-{uid()}"):
        assert raw_ds(a, "PUT", name, b"hi")[0] == 201
        wait_for(lambda n=name: raw_ds(b, "GET", n)[0] == 200, "the stream to reach node B")
        status, hs, body = raw_ds(b, "POST", name, b"yo")
        assert status == 204, body
        assert hs["x-ringcast-node"] == a.node_id
        assert raw_ds(a, "GET", name)[2] == b"hiyo"
        status, _, body = raw_ds(b, "PUT", name, b"", b"Stream-Closed: true\r\n")
        assert status in (200, 204), body  # an idempotent create closing it, done on A
        assert raw_ds(b, "DELETE", name)[0] == 204
        assert raw_ds(a, "GET", name)[0] == 404


def test_a_forged_forwarded_mark_cannot_give_a_stream_a_second_node(
    redis_server: Any, nodes: Nodes, wait_for: Any
) -> None:
    """A client sending the mark that nodes put on forwarded requests
    (``X-Ringcast-Forwarded-By``) with a create of a name A holds, through B, gets a 409:
    it made B create a second stream of that name, which then shadowed A's on both nodes
    (reads on A served B's bytes, appends through B went to B's)."""
    a, b = nodes(2, redis=["--redis", redis_server.url])
    name = f"held-{uid()}"
    assert raw_ds(a, "PUT", name, b"mine")[0] == 201
    # Its bytes (a read on B waits up to 0.5 s for them, and past that is not up to date
    # with less): B's reads below must show A's stream.
    wait_for(lambda: raw_ds(b, "GET", name)[2] == b"mine", "the stream's bytes to reach node B")
    forged = b"X-Ringcast-Forwarded-By: " + a.node_id.encode() + b"\r\n"
    status, _, body = raw_ds(b, "PUT", name, b"forged", forged)
    assert status == 409, body
    assert a.node_id.encode() in body
    assert raw_ds(b, "POST", name, b"+")[0] == 204
    assert raw_ds(a, "GET", name)[2] == b"mine+"
    assert raw_ds(b, "GET", name)[2] in (b"mine", b"mine+")  # B reads A's (mirrored) bytes
    # A fork through B with the mark, of a stream B does not hold, is refused the same way.
    fork = b"Stream-Forked-From: /ds/v1/stream/" + name.encode() + b"\r\n"
    status, _, body = raw_ds(b, "PUT", f"fork-{uid()}", b"", forged + fork)
    assert status == 409, body


@pytest.mark.timeout(300)
def test_a_deleted_source_stays_deleted_on_every_node_while_its_forks_live(
    redis_server: Any, nodes: Nodes, wait_for: Any
) -> None:
    """A source deleted while a fork lives is a tombstone on its node for the fork's life,
    and its copy in Redis is kept as long: it expired after 60 s, and node B then created
    the name again (201; B served the new stream, A answered 410 and refused a create)."""

    a, b = nodes(2, redis=["--redis", redis_server.url])
    name, fork = f"src-{uid()}", f"fork-{uid()}"
    assert raw_ds(a, "PUT", name, b"hi")[0] == 201
    forked = f"Stream-Forked-From: /ds/v1/stream/{name}\r\n".encode()
    assert raw_ds(a, "PUT", fork, b"", forked)[0] == 201
    assert raw_ds(a, "DELETE", name)[0] == 204
    wait_for(lambda: raw_ds(b, "GET", name)[0] == 410, "the tombstone on node B")
    time.sleep(65)  # past the 60 s a tombstone lives in Redis unless its node renews it
    assert raw_ds(b, "GET", name)[0] == 410
    assert raw_ds(b, "PUT", name, b"again")[0] == 409  # forwarded to A, which refuses it
    assert raw_ds(a, "GET", name)[0] == 410
    assert raw_ds(b, "GET", fork)[2] == b"hi"
