"""A library reader learns that its producer died, without any manager running: a reader
waiting on a running session whose producer process was killed gets
``SessionEnded("producer_died")`` (blocking ``read`` and ``aread``), instead of waiting for
ever."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import ringcast

pytestmark = pytest.mark.timeout(60)

PRODUCER = """
import sys, ringcast
seg = ringcast.Segment.open(sys.argv[1])
w = seg.create_or_replace("conv-1")
w.write(b"data: first\\n\\n")
print("ready", flush=True)
sys.stdin.read()  # holds the session until killed
"""


@pytest.fixture
def producer(tmp_path: Path) -> tuple[ringcast.Segment, subprocess.Popen[str]]:
    seg = ringcast.Segment.create(str(tmp_path / "seg"), max_sessions=4, session_bytes=65536)
    proc = subprocess.Popen(
        [sys.executable, "-c", PRODUCER, str(tmp_path / "seg")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    yield seg, proc
    proc.kill()
    proc.communicate()
    seg.unlink()


def _kill(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_blocking_read_raises_producer_died(producer) -> None:
    seg, proc = producer
    r = seg.reader("conv-1", offset=0)
    assert r.read(timeout=5) == b"data: first\n\n"
    assert r.dead_producer() is None  # alive: reads just wait
    assert r.read(timeout=1.2) == b""
    _kill(proc)
    assert r.dead_producer() == proc.pid
    with pytest.raises(ringcast.SessionEnded) as ended:
        r.read()  # no timeout: without the check this would wait for ever
    assert ended.value.reason == "producer_died"
    assert str(proc.pid) in str(ended.value)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_aread_raises_producer_died(producer, loop: str) -> None:
    seg, proc = producer
    r = seg.reader("conv-1", offset=0)

    async def main() -> str:
        assert await r.aread() == b"data: first\n\n"
        waiting = asyncio.ensure_future(r.aread())
        await asyncio.sleep(0.6)  # the waiting read has seen a live producer
        assert not waiting.done()
        _kill(proc)
        with pytest.raises(ringcast.SessionEnded) as ended:
            await waiting
        return ended.value.reason

    if loop == "uvloop":
        import uvloop

        assert uvloop.run(main()) == "producer_died"
    else:
        assert asyncio.run(main()) == "producer_died"


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_standing_watch_is_told_its_producer_died(producer, loop: str) -> None:
    """What ``aread`` raises, a standing watch (``ringcast._aio.watch``, the server's fan-out
    pump) gets through ``on_error``, its watch already cancelled."""
    from ringcast import _aio

    seg, proc = producer
    r = seg.reader("conv-1", offset=0)

    class Consumer:
        def __init__(self) -> None:
            self.got = b""
            self.died: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()

        def on_ready(self) -> None:
            self.got += r.read_nowait() or b""

        def on_error(self, exc: BaseException) -> None:
            self.died.set_result(exc)

    async def main() -> str:
        c = Consumer()
        watch = _aio.watch(r, c)
        assert c.got == b"data: first\n\n"
        await asyncio.sleep(0.6)  # the watch has seen a live producer
        assert not c.died.done()
        _kill(proc)
        exc = await asyncio.wait_for(c.died, 30)
        assert isinstance(exc, ringcast.SessionEnded)
        assert watch._hub is None, "cancelled before on_error"
        return exc.reason

    if loop == "uvloop":
        import uvloop

        assert uvloop.run(main()) == "producer_died"
    else:
        assert asyncio.run(main()) == "producer_died"


def test_dead_producers_names_the_dead_producer_of_each_reader(producer) -> None:
    seg, proc = producer
    live = seg.create_or_replace("mine")  # this process produces it: alive
    readers = [seg.reader("conv-1"), seg.reader("mine"), seg.reader("conv-1")]
    assert ringcast.Reader.dead_producers(readers) == [None, None, None]
    _kill(proc)
    assert ringcast.Reader.dead_producers(readers) == [proc.pid, None, proc.pid]
    assert readers[0].dead_producer() == proc.pid
    live.finalize()


def test_a_session_taken_over_is_not_a_dead_producer(producer) -> None:
    """What a manager does (take the session over, end it in-band) leaves nothing dead."""
    seg, proc = producer
    assert seg.take_over_dead("conv-1") is None  # its producer runs
    _kill(proc)
    w = seg.take_over_dead("conv-1")
    assert w is not None
    w.write(b'data: {"error": "producer_died"}\n\n')
    w.finalize("failed")
    r = seg.reader("conv-1", offset=0)
    assert r.dead_producer() is None
    body = b"".join(iter(lambda: r.read(timeout=1), b""))
    assert body == b'data: first\n\ndata: {"error": "producer_died"}\n\n'
