"""The paced synthetic model on one :class:`~ringcast.server.synthetic.Ticker` per worker: the
same tokens as the per-stream generator, on the same schedule, and cancellation."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from ringcast import Segment
from ringcast.server.counters import SharedCounters
from ringcast.server.emitter import Emitter, TurnBatch
from ringcast.server.plugin import JobContext
from ringcast.server.segment_store import SegmentStore
from ringcast.server.synthetic import Ticker, synthetic_tokens
from ringcast.wire.openai import chat_request_decoder
from ringcast.wire.sse import iter_sse_data

pytestmark = pytest.mark.timeout(60)


def _ctx(seg: Segment, name: str, prompt: str) -> tuple[JobContext, Any]:
    body = json.dumps({"messages": [{"role": "user", "content": prompt}]}).encode()
    w = seg.create_or_replace(name, "")
    return JobContext("chat", body, chat_request_decoder.decode(body), w), w


def _contents(seg: Segment, name: str) -> list[str]:
    r = seg.reader(name, 0, "")
    data = r.read_nowait(1 << 20) or b""
    r.close()
    return [json.loads(d)["choices"][0]["delta"].get("content", "") for d in iter_sse_data(data)]


def test_streams_on_one_ticker_get_their_tokens_on_their_schedule(tmp_path: Path) -> None:
    seg = Segment.create(str(tmp_path / "seg"), max_sessions=16, session_bytes=1 << 20)
    counters = SharedCounters(str(tmp_path / "counters"), 2, create=True)
    counters.bind_row(1)
    tps, prefill = 400.0, 0.05
    jobs = [("a", "first prompt", 40), ("b", "second, longer prompt", 80), ("c", "x", 1)]

    async def main() -> dict[str, float]:
        loop = asyncio.get_running_loop()
        ticker = Ticker(tps, prefill)
        batch = TurnBatch(SegmentStore(seg), counters)
        elapsed: dict[str, float] = {}

        async def one(name: str, prompt: str, n: int) -> None:
            ctx, w = _ctx(seg, name, prompt)
            t = loop.time()
            await ticker.run(ctx, Emitter(w, "chat", "m", counters, batch=batch), n)
            elapsed[name] = loop.time() - t
            assert ctx.finish_reason == "length"

        await asyncio.gather(*(one(*j) for j in jobs))
        return elapsed

    elapsed = asyncio.run(main())
    for name, prompt, n in jobs:
        # The role chunk, then exactly the per-stream generator's tokens, in order.
        assert _contents(seg, name) == ["", *synthetic_tokens(prompt, n)]
        # Token i is due prefill + i / tps after the start: never early.
        assert elapsed[name] >= prefill + (n - 1) / tps
    seg.close()


def test_a_cancelled_stream_stops_and_the_others_go_on(tmp_path: Path) -> None:
    seg = Segment.create(str(tmp_path / "seg"), max_sessions=16, session_bytes=1 << 20)
    counters = SharedCounters(str(tmp_path / "counters"), 2, create=True)
    counters.bind_row(1)

    async def main() -> int:
        ticker = Ticker(200.0, 0.0)
        batch = TurnBatch(SegmentStore(seg), counters)
        ctx_a, wa = _ctx(seg, "stopped", "p")
        ctx_b, wb = _ctx(seg, "goes-on", "q")
        a = asyncio.create_task(
            ticker.run(ctx_a, Emitter(wa, "chat", "m", counters, batch=batch), 10**6)
        )
        b = asyncio.create_task(
            ticker.run(ctx_b, Emitter(wb, "chat", "m", counters, batch=batch), 30)
        )
        await asyncio.sleep(0.05)
        a.cancel()
        with pytest.raises(asyncio.CancelledError):
            await a
        stopped_at = len(_contents(seg, "stopped"))
        await b
        await asyncio.sleep(0.05)
        assert len(_contents(seg, "stopped")) == stopped_at
        return stopped_at

    assert asyncio.run(main()) > 1
    assert _contents(seg, "goes-on") == ["", *synthetic_tokens("q", 30)]
    seg.close()
