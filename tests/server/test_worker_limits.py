"""What a single request can cost a worker: a huge ``max_tokens`` must not stall the others,
and a generation stuck before its first token is found idle even while it keeps its readers
alive with pings."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(60)

HUGE = 10**9  # as a list of tokens, tens of GB and minutes of work before the first one


@pytest.fixture(params=["uvloop", "asyncio"])
def srv(tmp_path: Path, request: pytest.FixtureRequest, serve) -> Iterator[Any]:
    # One worker, so the huge jobs and the small one share its event loop; a pace faster than
    # it can go, so a huge job is always behind it and never sleeps to keep it.
    with serve("--tokens-per-s", "1000000", "--event-loop", request.param, workers=1) as s:
        yield s


def test_huge_max_tokens_streams_at_once_and_stops_when_cancelled(
    srv: Any, wait_for, sse_events, data_of, error_of, check_ids
) -> None:
    named = srv.post_chat("huge", max_tokens=HUGE)
    assert named.status == 200
    assert len(sse_events(named.read_at_least(2000))) > 1
    anonymous = srv.post_chat(None, max_tokens=HUGE)
    assert anonymous.status == 200
    assert len(sse_events(anonymous.read_at_least(2000))) > 1
    # Meanwhile another job on the same worker runs start to finish.
    small = srv.post_chat("small", max_tokens=16, prompt="a small one").read_all_and_close()
    check_ids(small)
    chunks = [json.loads(data_of(e)) for e in sse_events(small)[:-1]]
    assert chunks[-1]["usage"]["completion_tokens"] == 16
    assert small.endswith(b"data: [DONE]\n\n")
    # Both huge jobs stop: one by DELETE, the other when its client leaves.
    assert srv.request("DELETE", "/v1/stream?conv_id=huge")[0] == 204
    assert error_of(sse_events(named.read_all_and_close())[-1])["type"] == "cancelled"
    anonymous.close()
    wait_for(
        lambda: srv.metric('worker_jobs_total{outcome="cancelled"}') == 2,
        "both huge jobs to stop",
    )
    wait_for(lambda: srv.metric("worker_jobs_active") == 0, "the worker to be idle")
    assert srv.metric('worker_jobs_total{outcome="done"}') == 1


def test_a_stream_that_only_pings_is_still_found_idle(
    tmp_path: Path, serve, wait_for, sse_events, error_of
) -> None:
    """Pings keep a slow prefill's readers (and proxies) from timing out, but are not
    progress: with pings every 0.1 s, a generation that produces nothing is still evicted as
    idle after --idle-timeout."""
    with serve(
        *("--prefill-s", "3600", "--sse-ping-interval", "0.1", "--idle-timeout", "1"),
        workers=1,
    ) as s:
        events = sse_events(s.post_chat("pings-only").read_all_and_close())
        assert events.count(b": ping\n\n") >= 3, events
        assert error_of(events[-1])["type"] == "evicted"
        wait_for(lambda: s.metric('evictions_total{reason="idle"}') == 1, "the idle count")
