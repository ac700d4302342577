"""Churn: many short resumable streams through ``ringcast serve``, 64 clients at a time.

Every stream keeps its finished session for ``--ttl``, so a table smaller than the churn fills
with finished sessions; a create that finds it full must evict the least recently used of them
in the same step, and answer 503 only when every slot holds a running stream (which 64
clients cannot cause in a table of 256). Before the registry evicted on create, 30,000 streams
through 1,024 slots got 129 answers 503.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
from typing import Any

import pytest
from ringcast.http.client import stream

STREAMS = 10_000
CLIENTS = 64


async def _churn(url: str, streams: int, clients: int) -> collections.Counter[int]:
    ids = itertools.count()
    statuses: collections.Counter[int] = collections.Counter()
    body = json.dumps(
        {
            "model": "m",
            "stream": True,
            "max_tokens": 4,
            "messages": [{"role": "user", "content": "hi"}],
        }
    ).encode()

    async def client() -> None:
        while (n := next(ids)) < streams:
            headers = {"Content-Type": "application/json", "X-Conversation-Id": f"churn-{n}"}
            status, ended = 0, b""
            async for _, code, _, piece in stream(
                url, "/v1/chat/completions", headers=headers, body=body
            ):
                status, ended = code, (ended + piece)[-64:]
            # A 200 that did not run to its end would not be a clean stream either.
            statuses[status if status != 200 or b"[DONE]" in ended else -1] += 1

    await asyncio.gather(*(client() for _ in range(clients)))
    return statuses


@pytest.mark.timeout(240)
@pytest.mark.parametrize("table", ["256-slots", "default"])
def test_a_churn_of_short_streams_never_gets_503(serve: Any, table: str) -> None:
    args = ["--tokens-per-s", "0", "--ttl", "60"]
    if table != "default":
        args += ["--max-sessions", table.split("-")[0]]
    with serve(*args, http_procs=2) as s:
        statuses = asyncio.run(_churn(s.url, STREAMS, CLIENTS))
        assert statuses == {200: STREAMS}, statuses
        if table != "default":
            # The table really filled: creates evicted finished sessions to make room.
            assert s.metric('evictions_total{reason="lru"}') >= STREAMS - 256
