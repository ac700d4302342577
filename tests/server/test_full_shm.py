"""``ringcast serve`` on a shared-memory filesystem much smaller than its segment (a 2 MiB tmpfs,
as Docker's 64 MiB ``/dev/shm`` is to the default 4 GiB segment): it starts with a warning
saying how many full rings fit; a stream that finds the filesystem full ends with an in-band
error event, and every process and every other stream goes on. Before, the worker died by
``SIGBUS``, then the manager, then everything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20


def _stream(s: Any, conv: str, max_tokens: int) -> bytes:
    r = s.post_chat(conv, max_tokens=max_tokens)
    try:
        assert r.status == 200
        return bytes(r.read_all())
    finally:
        r.close()


def test_a_full_shared_memory_filesystem_fails_one_stream_not_the_server(
    serve: Any, small_shm: Path, sse_events, error_of, capfd: pytest.CaptureFixture[str]
) -> None:
    args = ("--max-sessions", "8", "--session-bytes", str(MiB), "--tokens-per-s", "0")
    with serve(*args, segment=small_shm / "seg") as s:
        assert "about 1 full rings fit" in capfd.readouterr().err
        children = sorted(s.children("http") + s.children("worker"))
        per_token = len(_stream(s, "probe", 200)) / 200
        # Two streams of ~0.85 MiB each fit; the third finds the filesystem full.
        tokens = int(0.85 * MiB / per_token)
        first = _stream(s, "first", tokens)
        assert first.endswith(b"data: [DONE]\n\n")
        _stream(s, "second", tokens)
        third = _stream(s, "third", tokens)
        last = sse_events(third)[-1]
        assert error_of(last)["type"] == "no_memory", last
        assert len(third) < len(first)
        # Nobody died, nothing restarted; the earlier stream still reads in full.
        assert s.proc.poll() is None
        assert sorted(s.children("http") + s.children("worker")) == children
        status, _, again = s.request("GET", "/v1/stream?conv_id=first&from=0")
        assert status == 200 and again == first
        # Memory given back by a deleted stream serves the next one.
        assert s.request("DELETE", "/v1/stream?conv_id=second")[0] in (200, 204)
        assert _stream(s, "fourth", tokens).endswith(b"data: [DONE]\n\n")
        status, _, _ = s.request("GET", "/health")
        assert status == 200


def _space_warnings(tmp: Path, caplog: pytest.LogCaptureFixture, **sizes: int) -> list[str]:
    """The start-up space check's warnings for a segment of ``sizes`` in ``tmp``; ``explicit``
    as ``ringcast serve`` decides it (a table sized on the command line)."""
    from ringcast import Segment
    from ringcast.server.config import default_max_sessions
    from ringcast.server.supervisor import say_whether_the_segment_fits

    seg = Segment.create(str(tmp / "seg"), **sizes)
    try:
        explicit = sizes["max_sessions"] != default_max_sessions(sizes["session_bytes"])
        caplog.clear()
        with caplog.at_level("WARNING", logger="ringcast.manager"):
            say_whether_the_segment_fits(seg, str(tmp / "seg"), explicit)
        return [r.getMessage() for r in caplog.records]
    finally:
        seg.unlink()
        seg.close()


def test_a_default_table_is_judged_by_its_pages_and_a_working_set(
    tmpfs: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The default table (1,048,576 slots x 4 MiB, a 4 TiB sparse file) never fits in full:
    no warning where its table pages and 256 full rings fit (3 GiB), one where they do not
    (2 GiB), and one naming the table where even its pages (1.3 GiB) do not (256 MiB)."""
    from ringcast.server.config import default_max_sessions

    n = default_max_sessions(4 * MiB)
    sizes = {"max_sessions": n, "session_bytes": 4 * MiB}
    assert _space_warnings(tmpfs("3g"), caplog, **sizes) == []
    (rings,) = _space_warnings(tmpfs("2g"), caplog, **sizes)
    assert "its table and 256 full rings" in rings and "full rings fit beside" in rings
    (table,) = _space_warnings(tmpfs("256m"), caplog, **sizes)
    assert f"its table of {n} sessions alone" in table


def test_a_table_sized_on_the_command_line_should_fit_in_full(
    tmpfs: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """``--max-sessions`` given: every ring full must fit, else a warning saying how many do."""
    mnt = tmpfs("64m")
    assert _space_warnings(mnt, caplog, max_sessions=8, session_bytes=4 * MiB) == []
    (full,) = _space_warnings(mnt, caplog, max_sessions=64, session_bytes=4 * MiB)
    assert "when all 64 sessions' rings are full" in full and "about 15 full rings fit" in full
