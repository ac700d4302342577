"""Coalescing: with ``--coalesce always`` a fast stream reaches live readers in fewer, larger
writes and a stream slower than half the cap is written event by event; ``adaptive`` (the
default) waits only while the HTTP process's event loop lags; either way the bytes are the
session's bytes.

Each write of a pump is one HTTP chunk, so counting the chunks a raw-socket client receives
counts the server's writes to that client.
"""

from __future__ import annotations

import itertools
import socket
from pathlib import Path
from typing import Any

import pytest
from pages import http_chunks

pytestmark = pytest.mark.timeout(90)


def chunks_of_live_reader(srv: Any, conv: str) -> list[bytes]:
    """GET the stream from offset 0 and return its body's HTTP chunks, in order."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=60) as sock:
        sock.sendall(
            f"GET /v1/stream?conv_id={conv}&from=0 HTTP/1.1\r\nHost: x\r\n"
            f"Connection: close\r\n\r\n".encode()
        )
        raw = bytearray()
        while data := sock.recv(65536):
            raw += data
    return http_chunks(bytes(raw))


def live_read(srv: Any, conv: str, tokens: int) -> tuple[list[bytes], bytes]:
    """Start a stream whose first token comes after the reader has attached at offset 0;
    return that reader's chunks and the whole stream replayed afterwards."""
    post = srv.post_chat(conv, max_tokens=tokens)
    assert post.status == 200
    chunks = chunks_of_live_reader(srv, conv)
    post.read_all_and_close()
    status, _, whole = srv.request("GET", f"/v1/stream/{conv}?from=0")
    assert status == 200
    return chunks, whole


@pytest.mark.parametrize(
    ("coalesce_ms", "mode", "fast"), [("200", "always", True), ("0", "always", False)]
)
def test_fast_stream_is_coalesced_only_when_asked(
    tmp_path: Path, coalesce_ms: str, mode: str, fast: bool, serve, sse_events
) -> None:
    # 100 tokens at 100 tokens/s: about one second, one token every 10 ms.
    args = (
        *("--tokens-per-s", "100", "--prefill-s", "0.5"),
        *("--coalesce-ms", coalesce_ms, "--coalesce", mode),
    )
    with serve(*args, http_procs=1) as srv:
        chunks, whole = live_read(srv, "fast", 100)
        assert b"".join(chunks) == whole
        assert whole.endswith(b"data: [DONE]\n\n")
        events = len(sse_events(whole))
        if fast:
            # ~1 s of tokens in passes at least 200 ms apart: a handful of writes.
            assert len(chunks) <= 12, [len(c) for c in chunks]
        else:
            # Written as it comes: most events in a write of their own.
            assert len(chunks) >= events // 3, (len(chunks), events)


def test_slow_stream_is_written_event_by_event(tmp_path: Path, serve, sse_events) -> None:
    # One token every 125 ms against a 200 ms cap: within the cap, but further apart than half
    # of it, so the stream gains no batching from waiting and never waits (without that rule
    # every write would be held 200 ms after the previous one, and events would pair up).
    args = (
        *("--tokens-per-s", "8", "--prefill-s", "0.5"),
        *("--coalesce-ms", "200", "--coalesce", "always"),
    )
    with serve(*args, http_procs=1) as srv:
        chunks, whole = live_read(srv, "slow", 10)
        assert b"".join(chunks) == whole
        per_chunk = [len(sse_events(c)) for c in chunks]
        # The role chunk and the first token may share the first write; every later token
        # is its own write. The last write carries the final chunk, usage and [DONE].
        assert max(per_chunk[1:-1], default=1) == 1, per_chunk
        assert len(chunks) >= 10, per_chunk


def test_coalesce_value_is_checked(tmp_path: Path) -> None:
    import subprocess
    import sys

    for bad in ("-1", "1001", "nan"):
        out = subprocess.run(
            [sys.executable, "-m", "ringcast.cli", "serve", "--port", "0", "--coalesce-ms", bad],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=60,
        )
        assert out.returncode == 2, (bad, out.stderr)
        assert "--coalesce-ms must be between 0 and 1000" in out.stderr


def test_metrics_count_coalesced_bytes(tmp_path: Path, serve, wait_for) -> None:
    args = ("--tokens-per-s", "200", "--coalesce-ms", "50", "--coalesce", "always")
    with serve(*args, http_procs=1) as srv:
        chunks, whole = live_read(srv, "counted", 40)
        assert b"".join(chunks) == whole
        # POST, live GET and replay GET each sent the whole stream.
        wait_for(lambda: srv.metric("http_bytes_sent_total") >= 3 * len(whole), "bytes counted")
        assert srv.metric("http_coalesce_seconds") == pytest.approx(0.05)


def test_adaptive_coalescing_follows_the_loop_lag(tmp_path: Path) -> None:
    """The controller on a real loop: no linger while the loop keeps up, the whole cap while
    callbacks hold it up, and back to none when they stop."""
    import asyncio
    import time

    import ringcast
    from ringcast.server.config import ServeConfig
    from ringcast.server.counters import HttpCounter, SharedCounters
    from ringcast.server.fanout import Coalescing

    cfg = ServeConfig(http_procs=1, coalesce_ms=20.0, coalesce="adaptive")
    seg = ringcast.Segment.create(str(tmp_path / "seg"), max_sessions=4, session_bytes=1 << 16)
    counters = SharedCounters(str(tmp_path / "counters"), 3, create=True)
    counters.bind_row(1)

    flips: list[float] = []

    async def main() -> tuple[list[float], list[float], list[float]]:
        app = Coalescing(cfg.coalesce_ms, cfg.coalesce == "always", counters)
        # What the fan-out hears (its pumps stop or start letting producers write through).
        app.on_change = lambda: flips.append(app.linger)
        task = asyncio.create_task(app.run())
        # While the loop keeps up: no linger, for 20 samples in a row. A machine busy with
        # other work makes this loop late now and then (and the controller rightly lingers):
        # wait up to 30 s for such a stretch.
        idle: list[float] = []
        for _ in range(3000):
            await asyncio.sleep(0.01)
            idle = [*idle, app.linger][-20:] if app.linger == 0.0 else []
            if len(idle) == 20:
                break
        # A loop held up 15 ms at a time: lag well past LAG_HIGH.
        busy = []
        for _ in range(60):
            time.sleep(0.015)
            await asyncio.sleep(0)
            busy.append(app.linger)
        after = []
        # It comes down more slowly than it climbs (cap to nothing in ~0.3 s of a quiet loop);
        # on a machine busy with other work the loop lags now and then, so allow up to 30 s.
        while len(after) < 3000 and (len(after) < 10 or after[-1] > 0.0):
            await asyncio.sleep(0.01)
            after.append(app.linger)
        task.cancel()
        return idle, busy, after

    idle, busy, after = asyncio.run(main())
    seg.close()
    assert idle == [0.0] * 20, "the linger never stayed at 0 on a loop that keeps up"
    assert busy[-1] == pytest.approx(0.020), busy
    assert after[-1] == 0.0, after
    assert after[5] > 0.0, "a loaded process keeps batching for a while after the load"
    assert counters._vals[HttpCounter.COALESCE_US] == 0
    # Told of every start and stop, and only of those: lingering and not, in turn.
    assert flips and flips[0] > 0.0 and flips[-1] == 0.0, flips
    assert all((a > 0.0) != (b > 0.0) for a, b in itertools.pairwise(flips)), flips


def test_adaptive_coalescing_takes_half_the_cap_while_merely_busy(tmp_path: Path) -> None:
    """A loop a little late (held 0.5 ms at a time: ~1.6 ms of lag on this loop) gets half
    the cap; one far behind (held 15 ms at a time) gets all of it, and comes back to half
    when the stalls shrink again."""
    import asyncio
    import time

    import ringcast
    from ringcast.server.config import ServeConfig
    from ringcast.server.counters import SharedCounters
    from ringcast.server.fanout import Coalescing

    cfg = ServeConfig(http_procs=1, coalesce_ms=40.0, coalesce="adaptive")
    seg = ringcast.Segment.create(str(tmp_path / "seg"), max_sessions=4, session_bytes=1 << 16)
    counters = SharedCounters(str(tmp_path / "counters"), 3, create=True)
    counters.bind_row(1)

    async def held(app: Coalescing, hold_s: float, want: float, for_s: float) -> list[float]:
        """The linger while the loop is held ``hold_s`` at a time, until it has been ``want``
        for 0.3 s, or ``for_s`` has passed (a machine busy with other work adds lag of its
        own, so the stretch it takes to settle varies; a controller that never gets there
        fails)."""
        seen = []
        end = time.monotonic() + for_s
        settled = 0.0
        while time.monotonic() < end:
            time.sleep(hold_s)
            await asyncio.sleep(0)
            seen.append(app.linger)
            if app.linger != pytest.approx(want):
                settled = 0.0
            elif not settled:
                settled = time.monotonic()
            elif time.monotonic() - settled > 0.3:
                break
        return seen

    async def main() -> tuple[list[float], list[float], list[float]]:
        app = Coalescing(cfg.coalesce_ms, cfg.coalesce == "always", counters)
        task = asyncio.create_task(app.run())
        busy = await held(app, 0.0005, 0.020, 20.0)
        far = await held(app, 0.015, 0.040, 10.0)
        busy_again = await held(app, 0.0005, 0.020, 20.0)
        task.cancel()
        return busy, far, busy_again

    busy, far, busy_again = asyncio.run(main())
    seg.close()
    assert busy[-1] == pytest.approx(0.020), busy[-50:]
    assert far[-1] == pytest.approx(0.040), far
    assert busy_again[-1] == pytest.approx(0.020), busy_again[-50:]


def test_a_background_task_that_fails_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A controller that dies (a bug) must say so at once, not leave the process silently
    writing every event (found when an edit left a name undefined in adapt_coalescing)."""
    import asyncio

    import ringcast
    from ringcast.server.config import ServeConfig
    from ringcast.server.counters import SharedCounters
    from ringcast.server.routes import App
    from ringcast.server.segment_store import SegmentStore

    cfg = ServeConfig(http_procs=1, coalesce_ms=40.0, coalesce="adaptive")
    seg = ringcast.Segment.create(str(tmp_path / "seg"), max_sessions=4, session_bytes=1 << 16)
    counters = SharedCounters(str(tmp_path / "counters"), 3, create=True)
    counters.bind_row(1)

    async def broken() -> None:
        raise NameError("name 'busy_at' is not defined")

    async def quiet() -> None:
        await asyncio.sleep(0)

    async def main() -> App:
        app = App(cfg, 0, SegmentStore(seg), counters)
        for task in (
            app.track(asyncio.create_task(broken())),
            app.track(asyncio.create_task(quiet())),
        ):
            await asyncio.wait([task])
        cancelled = app.track(asyncio.create_task(asyncio.sleep(10)))
        cancelled.cancel()
        await asyncio.wait([cancelled])
        await asyncio.sleep(0)  # done callbacks run
        return app

    with caplog.at_level("DEBUG", logger="ringcast.server"):
        app = asyncio.run(main())
    seg.close()
    assert not app.background
    failures = [r for r in caplog.records if "background task" in r.getMessage()]
    # At ERROR: which task, the exception's type and the line that raised it; its message
    # (which might hold a conversation id) and traceback only at DEBUG.
    (error,) = [r for r in failures if r.levelname == "ERROR"]
    assert "broken" in error.getMessage() and "NameError at test_coalesce.py:" in error.getMessage()
    assert "busy_at" not in error.getMessage() and error.exc_info is None
    (debug,) = [r for r in failures if r.levelname == "DEBUG"]
    assert debug.exc_info is not None and "busy_at" in str(debug.exc_info[1])


def test_an_idle_process_samples_nothing_until_a_pump_starts(tmp_path: Path) -> None:
    """With nothing to coalesce the controller waits (no timer a few dozen times a second
    in an idle process) and samples again as soon as it is woken."""
    import asyncio

    from ringcast.server.counters import SharedCounters
    from ringcast.server.fanout import Coalescing

    counters = SharedCounters(str(tmp_path / "counters"), 3, create=True)
    counters.bind_row(1)

    async def main() -> None:
        c = Coalescing(20.0, False, counters)
        pumps = 0
        c.busy = lambda: pumps > 0
        task = asyncio.create_task(c.run())
        await asyncio.sleep(0.05)
        assert c._idle is not None and not c._idle.done(), "an idle controller waits"
        pumps = 1
        c.wake()
        await asyncio.sleep(0)
        assert c._idle is None, "woken, it samples again"
        await asyncio.sleep(0.1)
        assert c._idle is None, "and keeps sampling while there is a pump"
        pumps = 0
        for _ in range(300):  # back to waiting at the end of its next sample
            await asyncio.sleep(0.01)
            if c._idle is not None:
                break
        assert c._idle is not None and not c._idle.done()
        task.cancel()

    asyncio.run(main())
