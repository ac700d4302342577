"""``ringcast trace synth``: the statistics of a synthetic trace match what was asked."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
from ringcast.replay.synth import SynthParams, synthesize
from ringcast.trace import load_trace

pytestmark = pytest.mark.timeout(60)


def _gaps(trace_streams: list) -> list[float]:  # type: ignore[type-arg]
    # Content events are events[1:-2] (role chunk first; final chunk and [DONE] last).
    return [
        b.t - a.t
        for s in trace_streams
        for a, b in zip(s.events[1:-3], s.events[2:-2], strict=True)
    ]


def test_synth_statistics_match_the_request(tmp_path: Path, ringcast_cli) -> None:
    out = tmp_path / "t.jsonl"
    res = ringcast_cli(
        "trace",
        "synth",
        "--streams",
        "300",
        "--out",
        str(out),
        "--ttft-ms",
        "250",
        "--ttft-sigma",
        "0.3",
        "--itl-ms",
        "12",
        "--itl-sigma",
        "0.2",
        "--tokens-min",
        "20",
        "--tokens-max",
        "60",
        "--seed",
        "7",
    )
    assert res.returncode == 0, res.stderr
    trace = load_trace(out)
    assert trace.header.source == "synth" and len(trace.streams) == 300
    ttft = [s.events[0].t for s in trace.streams]
    # Median of a lognormal is exp(mu); with 300 samples it is within ~5% (sd 0.3/sqrt(300)).
    assert statistics.median(ttft) == pytest.approx(0.250, rel=0.08)
    assert statistics.stdev(math.log(x) for x in ttft) == pytest.approx(0.3, rel=0.15)
    gaps = _gaps(trace.streams)
    assert statistics.median(gaps) == pytest.approx(0.012, rel=0.03)
    assert statistics.stdev(math.log(g) for g in gaps) == pytest.approx(0.2, rel=0.05)
    tokens = [len(s.events) - 3 for s in trace.streams]
    assert min(tokens) >= 20 and max(tokens) <= 60
    assert statistics.mean(tokens) == pytest.approx(40, rel=0.1)


def test_synth_events_are_shaped_like_chat_completion_chunks() -> None:
    trace = synthesize(SynthParams(streams=5, usage=True, seed=3))
    for s in trace.streams:
        assert s.events[-1].data == "data: [DONE]\n\n"
        assert all(e.data.endswith("\n\n") and e.data.startswith("data: ") for e in s.events)
        chunks = [json.loads(e.data[6:]) for e in s.events[:-1]]
        assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
        assert len({c["id"] for c in chunks}) == 1
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
        assert chunks[-2]["choices"][0]["finish_reason"] == "length"
        assert chunks[-1]["usage"]["completion_tokens"] == len(s.events) - 4
        assert "timings" in chunks[-1]
        assert [e.t for e in s.events] == sorted(e.t for e in s.events)


def test_synth_defaults_are_calibrated_on_the_capture(capture, load_capture) -> None:
    path = capture
    if path is None:
        pytest.skip("shared/ capture not beside the repo")
    cap = load_capture(path)
    plain = [c for c in cap if "logprobs" not in c["request"]]
    cap_gaps = [
        b["t"] - a["t"]
        for c in plain
        for a, b in zip(c["events"][1:-3], c["events"][2:-2], strict=True)
    ]
    syn = synthesize(SynthParams(streams=200, seed=1))
    assert statistics.median(_gaps(syn.streams)) == pytest.approx(
        statistics.median(cap_gaps), rel=0.1
    )
    cap_size = statistics.median(len(e["data"]) for c in plain for e in c["events"][1:-2])
    syn_size = statistics.median(len(e.data) for s in syn.streams for e in s.events[1:-2])
    assert syn_size == pytest.approx(cap_size, rel=0.1)
    cap_ttft = statistics.median(c["events"][0]["t"] for c in cap)
    assert statistics.median(s.events[0].t for s in syn.streams) == pytest.approx(
        cap_ttft, rel=0.25
    )


def test_sample_trace_is_small_and_valid(sample_trace) -> None:
    sample = sample_trace
    assert sample.stat().st_size < 400_000
    trace = load_trace(sample)
    assert trace.streams and all(s.events for s in trace.streams)


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--streams", "0"], "--streams must be between 1 and 1000000 (got 0)"),
        (["--streams", "9" * 21], f"--streams must be between 1 and 1000000 (got {'9' * 21})"),
        (["--tokens-max", "9" * 20], f"--tokens-max must be at most 1000000 (got {'9' * 20})"),
        (["--tokens-min", "0"], "--tokens-min must be at least 1 (got 0)"),
        (
            ["--tokens-min", "10", "--tokens-max", "5"],
            "--tokens-max (5) must be at least --tokens-min (10)",
        ),
        (["--ttft-ms", "0"], "--ttft-ms must be a number of milliseconds > 0 (got 0.0)"),
        (["--itl-ms", "nan"], "--itl-ms must be a number of milliseconds > 0 (got nan)"),
        (["--itl-sigma", "-1"], "--itl-sigma must be a number >= 0 (got -1.0)"),
    ],
)
def test_bad_synthesis_parameters_are_named_by_their_option(
    tmp_path: Path, ringcast_cli, args: list[str], said: str
) -> None:
    out = tmp_path / "t.jsonl"
    argv = ["trace", "synth", "--streams", "3", "--out", str(out), *args]
    res = ringcast_cli(*argv, check=False)
    assert res.returncode == 2
    assert res.stderr.strip() == f"ringcast trace synth: {said}"
    assert not out.exists()
