"""Idle and slowloris crowds (``bench/slow_clients.py``) at a CI size: with a few hundred
clients that never read a stream and a few hundred sending a head a byte a second, every
``/health`` probe is answered 200, a new stream runs to ``[DONE]``, and the server's memory
stays bounded. The benchmark's 1,000-client figures are in ``bench/RESULTS.md``."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(180)


def test_idle_and_slowloris_crowds_leave_the_server_responsive(bench_module: Any) -> None:
    bench = bench_module("slow_clients")
    server = bench_module("serve_process").ServeProcess(
        "--http-procs", "2", "--tokens-per-s", "200"
    )
    try:
        phases = asyncio.run(bench.run(server, clients=300, hold=2.0, probes=10))
    finally:
        server.stop()
    print(bench.table(phases))
    assert [len(p.health) for p in phases] == [10, 10, 10]  # each probe answered 200
    assert all(p.stream_ok for p in phases), bench.table(phases)
    # 600 held connections cost far less than this; unbounded buffering would not.
    assert phases[-1].rss - phases[0].rss < 256 * 2**20, bench.table(phases)
