"""Record -> ``serve --replay`` -> read back is byte-identical to what the upstream sent."""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from ringcast.wire.sse import strip_id_lines

pytestmark = pytest.mark.timeout(120)


def test_record_then_replay_through_serve_is_byte_identical(
    tmp_path: Path,
    capture,
    load_capture,
    ringcast_cli,
    spawn_listening,
    fake_upstream,
    http_request,
) -> None:
    captured = load_capture(capture)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(c["request"]) + "\n" for c in captured))
    trace = tmp_path / "trace.jsonl"
    with fake_upstream(capture) as (_, url):
        rec = ringcast_cli(
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
            status, _, body = http_request(
                port,
                "POST",
                "/v1/chat/completions",
                captured[i]["request"],
                {"X-Conversation-Id": conv, "Content-Type": "application/json"},
            )
            assert status == 200, body[:300]
            _, _, again = http_request(port, "GET", f"/v1/stream?conv_id={conv}&from=0")
            middle = len(body) // 3
            _, _, tail = http_request(port, "GET", f"/v1/stream/{conv}?from={middle}")
            return body, again, tail, middle

        with ThreadPoolExecutor(len(captured)) as pool:
            results = list(pool.map(one, range(len(captured))))

    for cap, (body, again, tail, middle) in zip(captured, results, strict=True):
        recorded = "".join(e["data"] for e in cap["events"]).encode()
        assert strip_id_lines(body) == recorded  # ringcast adds only its id: lines
        assert again == body
        assert tail == body[middle:]
        assert body.count(b"\nid: ") + body.startswith(b"id: ") == len(cap["events"])


def test_replay_generator_through_the_plugin_flag(
    tmp_path: Path, spawn_listening, http_request
) -> None:
    """``--generator ringcast.replay:generate`` (the plain plug-in API, trace from the env)
    gives the same bytes as ``--replay``."""
    import os

    from ringcast.replay.synth import SynthParams, synthesize
    from ringcast.trace import expected_body, write_trace

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
                status, _, body = http_request(
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


def test_a_replay_at_max_speed_lets_its_loop_serve_others(sample_trace: Path) -> None:
    """``--speed max`` never sleeps between events; the replay still gives its loop back
    every 16 events, or one stream would hold up every client of its process (with
    ``--workers 0`` an HTTP process's) until it ended."""
    import asyncio

    from ringcast.trace import ReplaySource

    source = ReplaySource(sample_trace, "max")

    async def main() -> tuple[int, int]:
        ticks = 0

        async def other_client() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0)
                ticks += 1

        task = asyncio.create_task(other_client())
        await asyncio.sleep(0)
        events = 0
        for _ in range(20):
            async for _ in source.events(None):
                events += 1
        task.cancel()
        return events, ticks

    events, ticks = asyncio.run(main())
    assert events >= 64
    assert ticks >= events // 16 - 20, (events, ticks)
