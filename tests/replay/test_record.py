"""``ringcast record`` against a fake upstream that serves llama-server's captured bytes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from ringcast.trace import FORMAT_NAME, FORMAT_VERSION, load_trace

HI = '{"messages": [{"role": "user", "content": "hi"}]}\n'
"""A requests file of one chat request."""

pytestmark = pytest.mark.timeout(90)


def test_record_stores_every_event_byte_for_byte(
    tmp_path: Path, capture, load_capture, ringcast_cli, fake_upstream
) -> None:
    captured = load_capture(capture)
    requests = tmp_path / "prompts.jsonl"
    requests.write_text("".join(json.dumps(c["request"]) + "\n" for c in captured))
    out = tmp_path / "trace.jsonl"
    with fake_upstream(capture) as (_, url):
        res = ringcast_cli(
            "record",
            "--upstream",
            url + "/v1",
            "--requests",
            str(requests),
            "--out",
            str(out),
            "--concurrency",
            "4",
        )
    assert res.returncode == 0, res.stderr
    header_line = json.loads(out.read_text().splitlines()[0])
    assert header_line["format"] == FORMAT_NAME and header_line["version"] == FORMAT_VERSION
    trace = load_trace(out)
    assert trace.header.source == "record" and trace.header.streams == len(captured)
    for cap, s in zip(captured, trace.streams, strict=True):
        assert s.error is None and s.status == 200
        assert s.request["messages"] == cap["request"]["messages"]
        assert s.body() == "".join(e["data"] for e in cap["events"]).encode()
        assert [e.data for e in s.events] == [e["data"] for e in cap["events"]]
        times = [e.t for e in s.events]
        assert times == sorted(times)
        assert 0 < s.ttfb <= times[0] <= s.duration
        assert "Content-Type: text/event-stream" in s.headers


def test_record_keeps_failed_requests_with_their_error(
    tmp_path: Path, capture, ringcast_cli, fake_upstream
) -> None:
    requests = tmp_path / "prompts.jsonl"
    requests.write_text('{"messages": [{"role": "user", "content": "not captured"}]}\n')
    out = tmp_path / "trace.jsonl"
    with fake_upstream(capture) as (_, url):
        res = ringcast_cli(
            "record", "--upstream", url, "--requests", str(requests), "--out", str(out)
        )
    assert res.returncode == 1  # every request failed
    trace = load_trace(out, require_events=False)
    assert trace.streams[0].status == 404


def test_record_unreachable_upstream_is_an_error_per_request(tmp_path: Path, ringcast_cli) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res, out = _record(ringcast_cli, tmp_path, f"http://127.0.0.1:{port}")
    assert res.returncode == 1
    assert "failed" in res.stderr and "request 0" in res.stderr
    assert load_trace(out, require_events=False).streams[0].error
    # Counted alike by record and by trace info: a failed request's stream is one of them.
    assert "wrote" in res.stderr and ": 1 streams, 0 events" in res.stderr
    info = json.loads(ringcast_cli("trace", "info", str(out), check=False).stdout)
    assert (info["streams"], info["failed"], info["events"]) == (1, 1, 0)


def test_record_rejects_a_bad_requests_file_with_its_line(tmp_path: Path, ringcast_cli) -> None:
    res, _ = _record(
        ringcast_cli, tmp_path, "http://127.0.0.1:9", lines='{"messages": []}\n{not json\n'
    )
    assert res.returncode == 2
    assert f"{tmp_path / 'prompts.jsonl'}:2:" in res.stderr


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--concurrency", "0"], "--concurrency must be at least 1 (got 0)"),
        (["--timeout", "0"], "--timeout must be a number of seconds > 0 (got 0.0)"),
        (["--timeout", "nan"], "--timeout must be a number of seconds > 0 (got nan)"),
    ],
)
def test_record_refuses_what_could_not_work(
    tmp_path: Path, ringcast_cli, args: list[str], said: str
) -> None:
    res, out = _record(ringcast_cli, tmp_path, "http://127.0.0.1:9", *args)
    assert res.returncode == 2
    assert res.stderr.strip() == f"ringcast record: {said}"
    assert not out.exists()


def _record(
    ringcast_cli: Any, tmp_path: Path, upstream: str, *args: str, lines: str = HI
) -> tuple[Any, Path]:
    """``ringcast record`` of the requests ``lines`` from ``upstream`` into
    ``tmp_path/trace.jsonl``: its result and that path."""
    requests = tmp_path / "prompts.jsonl"
    requests.write_text(lines)
    out = tmp_path / "trace.jsonl"
    res = ringcast_cli(
        "record",
        "--upstream",
        upstream,
        "--requests",
        str(requests),
        "--out",
        str(out),
        *args,
        check=False,
    )
    return res, out
