"""The kill -9 campaign (``bench/kill_campaign.py``) at a CI size: every kind of process,
the manager included, killed at random points while clients stream; every client, resumed
after each drop, ends with exactly its stream's bytes. The full campaign (200 kills, with
the time from each kill to the terminal event) is run by hand; its figures are in
``bench/RESULTS.md``."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(240)


def test_kill_campaign_resumes_every_client_byte_for_byte(bench_module: Any) -> None:
    campaign = bench_module("kill_campaign")
    kills = asyncio.run(campaign.campaign(rounds=9, seed=1, clients=3, tokens=40, tps=100.0))
    assert {k.kind for k in kills} == {"worker", "http", "manager"}
    assert len(kills) == 9
    print(campaign.summary(kills))
