"""``ringcast replay``: every reader's bytes are checked, and the report's counts add up."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from ringcast.replay.synth import SynthParams, synthesize
from ringcast.trace import expected_body, load_trace, write_trace

pytestmark = pytest.mark.timeout(120)


def _check_counts(t: dict, emitted_bodies: list[bytes], emitted_events: int) -> None:  # type: ignore[type-arg]
    r = t["readers_per_stream"]
    assert t["events_emitted"] == emitted_events
    assert t["events_expected"] == emitted_events * r
    # Every event sent reaches every reader, less what the report says was lost.
    assert t["events_received"] + t["events_lost"] == t["events_expected"]
    lat = t["latency_ms"]
    if t["events_received"]:  # else null: no event, no latency
        assert lat["p50"] <= lat["p99"] <= lat["p99.9"] <= lat["max"]
    assert sum(t["timeline"]["events"]) == t["events_received"]
    assert sum(t["timeline"]["bytes"]) == t["bytes_received"]
    roles = {p["role"] for p in t["processes"]}
    assert "load generator" in roles and len(roles) >= 2
    assert all(p["rss_max_mb"] > 0 for p in t["processes"])


def test_replay_fanout_with_resumes_against_ringcast_and_baselines(
    tmp_path: Path, sample_trace, ringcast_cli
) -> None:
    compare = "asyncio,redis" if shutil.which("redis-server") else "asyncio"
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    res = ringcast_cli(
        "replay", str(sample_trace), "--streams", "6", "--fanout", "4", "--resume-share", "0.5",
        "--speed", "4", "--http-procs", "2", "--compare", compare, "--json", str(out),
        "--png", str(png), "--no-progress",
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(out.read_text())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    trace = load_trace(sample_trace)
    streams = [trace.streams[i % len(trace.streams)] for i in range(6)]
    bodies = [expected_body(s)[0] for s in streams]
    emitted = sum(len(s.events) for s in streams)
    assert [t["name"] for t in report["targets"]] == ["ringcast", *compare.split(",")]
    for t in report["targets"]:
        _check_counts(t, bodies, emitted)
        assert t["events_lost"] == 0 and t["errors"] == 0 and t["mismatches"] == 0
        assert t["readers_complete"] == t["readers"] == 24
        # Every reader got every byte once, resumed or not.
        assert t["bytes_received"] == 4 * sum(len(b) for b in bodies)
        assert 0 < t["resumes"] <= 18  # half of the 18 GET readers, once each
    assert "ringcast" in res.stdout and "asyncio" in res.stdout


def test_lost_offsets_are_counted_not_hidden(tmp_path: Path, ringcast_cli) -> None:
    """A ring far smaller than a stream, replayed at full speed: late readers find their
    offset dropped; the report says so and the counts still add up."""
    trace = synthesize(SynthParams(streams=2, seed=2, tokens_min=120, tokens_max=150))
    path = tmp_path / "t.jsonl"
    write_trace(path, trace)
    out = tmp_path / "r.json"
    res = ringcast_cli(
        "replay", str(path), "--fanout", "3", "--speed", "max", "--http-procs", "1",
        "--serve-arg=--session-bytes=8192", "--json", str(out), "--no-progress",
    )  # fmt: skip
    report = json.loads(out.read_text())
    t = report["targets"][0]
    emitted = sum(len(s.events) for s in trace.streams)
    _check_counts(t, [expected_body(s)[0] for s in trace.streams], emitted)
    assert t["events_lost"] > 0 and t["offsets_lost"] > 0
    assert t["mismatches"] == 0
    assert res.returncode == 0 or t["errors"] > 0


def test_a_run_cut_short_still_accounts_for_every_event(
    tmp_path: Path, sample_trace, ringcast_cli
) -> None:
    out = tmp_path / "r.json"
    res = ringcast_cli(
        "replay", str(sample_trace), "--streams", "4", "--fanout", "3", "--speed", "0.5",
        "--http-procs", "1", "--timeout", "1", "--json", str(out), "--no-progress",
    )  # fmt: skip
    assert res.returncode == 1  # cut short = errors
    t = json.loads(out.read_text())["targets"][0]
    trace = load_trace(sample_trace)
    emitted = sum(len(trace.streams[i].events) for i in range(4))
    _check_counts(t, [], emitted)
    assert t["events_lost"] > 0 and t["errors"] >= 1
    assert any("deadline" in e for e in t["error_samples"])


def _checkout(root: Path, name: str) -> Path:
    (root / "bench").mkdir(parents=True)
    (root / "pyproject.toml").write_text(f'[project]\nname = "{name}"\n')
    (root / "bench" / "baselines.py").write_text("")
    return root


def test_compare_finds_the_baselines_of_the_checkout_it_is_run_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ringcast.replay import loadtest

    # ringcast installed by pip: no checkout around the package itself
    site = tmp_path / "venv" / "lib" / "python3.11" / "site-packages"
    monkeypatch.setattr(loadtest, "__file__", str(site / "ringcast" / "replay" / "loadtest.py"))
    checkout = _checkout(tmp_path / "src", "ringcast")
    inside = checkout / "docs" / "deeper"
    inside.mkdir(parents=True)
    assert loadtest.baselines_script(inside) == checkout.resolve() / "bench" / "baselines.py"
    assert loadtest.baselines_script(checkout) == checkout.resolve() / "bench" / "baselines.py"
    # another project's bench/baselines.py is not ringcast's; no checkout at all: say so
    for cwd in (_checkout(tmp_path / "other", "other"), site):
        with pytest.raises(RuntimeError) as exc:
            loadtest.baselines_script(cwd)
        msg = str(exc.value)
        assert "bench/baselines.py" in msg and "pip install does not include" in msg
        assert "leave out --compare" in msg and "site-packages/bench" not in msg


def test_http_procs_default_to_ringcast_serves_auto(tmp_path: Path, ringcast_cli) -> None:
    trace = synthesize(SynthParams(streams=2, seed=3, tokens_min=10, tokens_max=20))
    path = tmp_path / "t.jsonl"
    write_trace(path, trace)
    out = tmp_path / "r.json"
    res = ringcast_cli(
        "replay", str(path), "--fanout", "2", "--speed", "max", "--json", str(out),
        "--no-progress",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    report = json.loads(out.read_text())
    assert report["http_procs"] == "auto"
    t = report["targets"][0]
    emitted = sum(len(s.events) for s in trace.streams)
    _check_counts(t, [expected_body(s)[0] for s in trace.streams], emitted)
    assert t["events_lost"] == 0 and t["mismatches"] == 0
    for bad in ("0", "-2", "two", "²"):
        res = ringcast_cli("replay", str(path), "--http-procs", bad)
        assert res.returncode == 2, bad
        assert "--http-procs" in res.stderr and "give auto or a whole number >= 1" in res.stderr
