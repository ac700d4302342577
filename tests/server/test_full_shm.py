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
    # 4,000 tokens a second: the three streams below run together for ~1 s, so none of them
    # is finished (and evictable to make room) while the others write.
    args = ("--max-sessions", "8", "--session-bytes", str(MiB), "--tokens-per-s", "4000")
    with serve(*args, segment=small_shm / "seg") as s:
        assert "about 1 full rings fit" in capfd.readouterr().err
        children = sorted(s.children("http") + s.children("worker"))
        per_token = len(_stream(s, "probe", 200)) / 200
        # Three streams of ~0.85 MiB each at once (running streams are never evicted to
        # make room): two fit, and the filesystem is full for the rest.
        tokens = int(0.85 * MiB / per_token)
        running = [s.post_chat(conv, max_tokens=tokens) for conv in ("first", "second", "third")]
        bodies = [bytes(r.read_all()) for r in running]
        for r in running:
            r.close()
        ends = [
            "done" if b.endswith(b"data: [DONE]\n\n") else error_of(sse_events(b)[-1])["type"]
            for b in bodies
        ]
        assert "no_memory" in ends and set(ends) <= {"done", "no_memory"}, ends
        # Nobody died, nothing restarted; a finished stream reads in full, or is gone whole
        # (the least recently used finished ones are evicted to give new ones room).
        assert s.proc.poll() is None
        assert sorted(s.children("http") + s.children("worker")) == children
        for conv, body in zip(("first", "second", "third"), bodies, strict=True):
            status, _, again = s.request("GET", f"/v1/stream?conv_id={conv}&from=0")
            assert (status == 200 and again == body) or status == 404, (conv, status)
        # Memory given back by a deleted stream serves the next one.
        assert s.request("DELETE", "/v1/stream?conv_id=second")[0] in (200, 204)
        assert _stream(s, "fourth", tokens // 2).endswith(b"data: [DONE]\n\n")
        status, _, _ = s.request("GET", "/health")
        assert status == 200


def test_finished_streams_give_their_pages_to_new_ones_when_the_filesystem_is_full(
    serve: Any, small_shm: Path
) -> None:
    """Finished streams keep their bytes for resumes until --ttl; when they fill the
    filesystem, the least recently used of them nobody reads are evicted as new streams
    start, so each new one has room (before, every stream after the filesystem filled failed
    with no_memory, and later creates were refused with 507, until the --ttl)."""
    args = ("--max-sessions", "64", "--session-bytes", str(MiB), "--tokens-per-s", "0")
    with serve(*args, segment=small_shm / "seg") as s:
        per_token = len(_stream(s, "probe", 100)) / 100
        tokens = int(0.3 * MiB / per_token)
        # 20 streams of 0.3 MiB one after another on a 2 MiB filesystem: each whole.
        for i in range(20):
            assert _stream(s, f"fill-{i}", tokens).endswith(b"data: [DONE]\n\n"), i
        assert s.metric('evictions_total{reason="lru"}') > 0
        # The least recently used went first; the newest finished stream is still whole.
        assert s.request("GET", "/v1/stream?conv_id=probe")[0] == 404
        status, _, last = s.request("GET", "/v1/stream?conv_id=fill-19")
        assert status == 200 and last.endswith(b"data: [DONE]\n\n")


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
