"""Bad traces fail clearly, naming the file and line: in ``trace info``, ``serve --replay``
and ``replay``; an unreachable ``--url`` fails quickly."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from ringcast.trace import TraceError, load_trace

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def sample_lines(sample_trace: Path) -> list[str]:
    return sample_trace.read_text().splitlines(keepends=True)[:4]  # header + 3 streams


def _write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(lines))
    return path


def _fixed_header(lines: list[str], **changes: object) -> list[str]:
    header = json.loads(lines[0])
    header.update(streams=len(lines) - 1, **changes)
    return [json.dumps(header) + "\n", *lines[1:]]


def test_corrupted_line_is_named(tmp_path: Path, ringcast_cli, sample_lines) -> None:
    lines = _fixed_header(sample_lines)
    lines[2] = lines[2][:-30] + "\n"  # the JSON object is cut short
    path = _write(tmp_path, lines)
    with pytest.raises(TraceError, match=r"bad\.jsonl:3: not valid JSON"):
        load_trace(path)
    res = ringcast_cli("trace", "info", str(path))
    assert res.returncode == 2 and f"{path}:3:" in res.stderr


def test_wrong_field_type_is_named(tmp_path: Path, sample_lines) -> None:
    lines = _fixed_header(sample_lines)
    record = json.loads(lines[3])
    record["events"][0] = ["soon", "data: x\n\n"]
    lines[3] = json.dumps(record) + "\n"
    with pytest.raises(TraceError, match=r":4: bad stream record: .*events"):
        load_trace(_write(tmp_path, lines))


def test_truncated_file_is_named(tmp_path: Path, sample_lines) -> None:
    lines = _fixed_header(sample_lines)
    text = "".join(lines)
    path = tmp_path / "cut.jsonl"
    path.write_text(text[: len(text) - 500])  # cut inside the last line
    with pytest.raises(TraceError, match=r"cut\.jsonl:4: truncated line"):
        load_trace(path)


def test_missing_streams_are_reported(tmp_path: Path, sample_lines) -> None:
    lines = _fixed_header(sample_lines)
    path = _write(tmp_path, lines[:-1])  # header still announces 3 streams
    with pytest.raises(
        TraceError, match=r":4: truncated trace: header announces 3 streams, found 2"
    ):
        load_trace(path)


def test_wrong_version_and_wrong_format(tmp_path: Path, sample_lines) -> None:
    lines = _fixed_header(sample_lines, version=99)
    with pytest.raises(TraceError, match=r":1: trace format version 99 is not supported"):
        load_trace(_write(tmp_path, lines))
    with pytest.raises(TraceError, match=r":1: not a ringcast-trace file"):
        load_trace(_write(tmp_path, ['{"hello": 1}\n']))
    with pytest.raises(TraceError, match=r":1: empty file"):
        load_trace(_write(tmp_path, []))


def test_missing_file(tmp_path: Path, ringcast_cli) -> None:
    res = ringcast_cli("trace", "info", str(tmp_path / "nope.jsonl"))
    assert res.returncode == 2 and "cannot open trace" in res.stderr and "nope.jsonl" in res.stderr


def test_serve_replay_refuses_a_bad_trace_with_its_line(
    tmp_path: Path, ringcast_cli, sample_lines
) -> None:
    lines = _fixed_header(sample_lines)
    lines[2] = "{not json\n"
    path = _write(tmp_path, lines)
    res = ringcast_cli(
        "serve", "--port", "0", "--replay", str(path), "--segment", str(tmp_path / "s")
    )
    assert res.returncode == 2
    assert f"{path}:3:" in res.stderr


def test_replay_refuses_a_bad_trace_with_its_line(
    tmp_path: Path, ringcast_cli, sample_lines
) -> None:
    lines = _fixed_header(sample_lines, version=2)
    path = _write(tmp_path, lines)
    res = ringcast_cli("replay", str(path), "--no-progress")
    assert res.returncode == 2 and f"{path}:1:" in res.stderr


def test_replay_unreachable_url_fails_quickly(tmp_path: Path, sample_trace, ringcast_cli) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The test's timeout bounds "quickly"; the command's own limit is a few seconds.
    res = ringcast_cli("replay", str(sample_trace), "--url", f"http://127.0.0.1:{port}", timeout=30)
    assert res.returncode == 1
    assert f"cannot reach http://127.0.0.1:{port}" in res.stderr


def test_every_subcommand_has_help(ringcast_cli) -> None:
    for args in (["record"], ["trace"], ["trace", "synth"], ["trace", "info"], ["replay"]):
        res = ringcast_cli(*args, "--help")
        assert res.returncode == 0 and "usage: ringcast" in res.stdout and len(res.stdout) > 200
    serve = ringcast_cli("serve", "--help").stdout
    assert "--replay TRACE" in serve and "--speed X|max" in serve
