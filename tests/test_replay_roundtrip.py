"""Record -> ``serve --replay`` -> read back is byte-identical to what the upstream sent."""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from _replay_support import (
    capture_path,
    fake_upstream,
    load_capture,
    request,
    ringcast,
    spawn_listening,
)
from _replay_support import strip_ids as strip

pytestmark = pytest.mark.timeout(120)

CAPTURE = capture_path()


@pytest.mark.skipif(CAPTURE is None, reason="shared/ capture not beside the repo")
def test_record_then_replay_through_serve_is_byte_identical(tmp_path: Path) -> None:
    assert CAPTURE is not None
    captured = load_capture(CAPTURE)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(c["request"]) + "\n" for c in captured))
    trace = tmp_path / "trace.jsonl"
    with fake_upstream(CAPTURE) as (_, url):
        rec = ringcast(
            "record",
            "--upstream",
            url,
            "--requests",
            str(prompts),
            "--out",
            str(trace),
            "--concurrency",
            "8",
        )
    assert rec.returncode == 0, rec.stderr

    serve = [
        sys.executable, "-m", "ringcast.cli", "serve", "--port", "0", "--http-procs", "2",
        "--segment", str(tmp_path / "seg"), "--log-level", "WARNING",
        "--replay", str(trace), "--speed", "4",
    ]  # fmt: skip
    with spawn_listening(serve) as (_, base):
        port = int(base.rsplit(":", 1)[1])

        def one(i: int) -> tuple[bytes, bytes, bytes, int]:
            conv = f"rt-{i}"
            # The original request body: the replay finds its stream by the messages.
            status, _, body = request(
                port,
                "POST",
                "/v1/chat/completions",
                captured[i]["request"],
                {"X-Conversation-Id": conv, "Content-Type": "application/json"},
            )
            assert status == 200, body[:300]
            _, _, again = request(port, "GET", f"/v1/stream?conv_id={conv}&from=0")
            middle = len(body) // 3
            _, _, tail = request(port, "GET", f"/v1/stream/{conv}?from={middle}")
            return body, again, tail, middle

        with ThreadPoolExecutor(len(captured)) as pool:
            results = list(pool.map(one, range(len(captured))))

    for cap, (body, again, tail, middle) in zip(captured, results, strict=True):
        recorded = "".join(e["data"] for e in cap["events"]).encode()
        assert strip(body) == recorded  # ringcast adds only its id: lines
        assert again == body
        assert tail == body[middle:]
        assert body.count(b"\nid: ") + body.startswith(b"id: ") == len(cap["events"])


def test_replay_generator_through_the_plugin_flag(tmp_path: Path) -> None:
    """``--generator ringcast.replay:generate`` (the plain plug-in API, trace from the env)
    gives the same bytes as ``--replay``."""
    import os

    from ringcast.replay import expected_body
    from ringcast.trace import SynthParams, synthesize, write_trace

    trace = synthesize(SynthParams(streams=3, seed=5, tokens_min=5, tokens_max=10))
    path = tmp_path / "t.jsonl"
    write_trace(path, trace)
    serve = [
        sys.executable, "-m", "ringcast.cli", "serve", "--port", "0", "--http-procs", "1",
        "--segment", str(tmp_path / "seg"), "--log-level", "WARNING",
        "--generator", "ringcast.replay:generate",
    ]  # fmt: skip
    env = {"RINGCAST_REPLAY": str(path), "RINGCAST_REPLAY_SPEED": "max"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with spawn_listening(serve) as (_, base):
            port = int(base.rsplit(":", 1)[1])
            for i in range(3):
                status, _, body = request(
                    port, "POST", "/v1/chat/completions",
                    {"messages": [{"role": "user", "content": "x"}], "stream": True,
                     "replay_stream": i},
                    {"X-Conversation-Id": f"plug-{i}"},
                )  # fmt: skip
                assert status == 200
                assert body == expected_body(trace.streams[i])[0]
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
