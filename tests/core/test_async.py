"""``Reader.aread`` on asyncio and uvloop: wake-ups, ends, cancellation, and ten thousand waiting
readers in one process on a bounded number of threads.

Every test runs on both loops (the ``loop_kind`` fixture) and fails if the loop reports an
unhandled exception (see ``run_async`` in conftest.py).
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import os
import shutil
import struct
import subprocess
import sys
import time
from typing import Any

import pytest
import ringcast
from children import pattern_at, scaled

pytestmark = pytest.mark.timeout(120)


async def _read_to_end(r: ringcast.Reader, max_bytes: int = 1 << 20) -> bytes:
    out = bytearray()
    while True:
        data = await r.aread(max_bytes)
        if not data:
            assert r.at_end
            return bytes(out)
        out += data


def test_aread_returns_buffered_bytes_then_waits(
    seg: ringcast.Segment, loop_kind: str, run_async
) -> None:
    w = seg.create_or_replace("c")
    w.write(b"data: one\n\n")
    r = seg.reader("c")

    async def main() -> None:
        assert await r.aread() == b"data: one\n\n"
        task = asyncio.create_task(r.aread())
        for _ in range(5):
            await asyncio.sleep(0)
        assert not task.done()
        w.write(b"data: two\n\n")
        assert await asyncio.wait_for(task, 30) == b"data: two\n\n"
        w.write(b"abc")
        assert await r.aread(2) == b"ab"
        task = asyncio.create_task(_read_to_end(r))
        await asyncio.sleep(0)
        w.write(b"def")
        w.finalize()
        assert await asyncio.wait_for(task, 30) == b"cdef"
        assert await r.aread() == b""

    run_async(loop_kind, main)


def test_aread_is_woken_by_a_producer_in_another_process(
    seg_path: str, loop_kind: str, run_async, child_env
) -> None:
    total = scaled(2_000_000, 100_000)
    # The ring holds the whole stream, so no reader can fall behind it.
    seg = ringcast.Segment.create(seg_path, max_sessions=4, session_bytes=4 * 1024 * 1024)
    w = seg.create_or_replace("c")
    readers = [seg.reader("c", off) for off in (0, 0, 1, total // 2, total)]
    code = f"""
import sys, ringcast
from children import pattern_at
seg = ringcast.Segment.open(sys.argv[1])
w = seg.adopt("c", "", {w.generation})
sys.stdin.readline()
off = 0
for n in [1, 10, 100, 1000, 10000] * 1000:
    n = min(n, {total} - off)
    if n <= 0:
        break
    w.write(pattern_at(off, n))
    off += n
w.finalize()
"""
    env = child_env
    producer = subprocess.Popen(
        [sys.executable, "-c", code, seg.path], stdin=subprocess.PIPE, env=env, text=True
    )

    async def main() -> list[bytes]:
        tasks = [asyncio.create_task(_read_to_end(r, 1 << 16)) for r in readers]
        await asyncio.sleep(0)
        assert producer.stdin is not None
        producer.stdin.write("go\n")
        producer.stdin.flush()
        return await asyncio.wait_for(asyncio.gather(*tasks), 100)

    with producer:
        results = run_async(loop_kind, main)
        assert producer.stdin is not None
        producer.stdin.close()
        assert producer.wait(60) == 0
    for r, got in zip(readers, results, strict=True):
        start = r.offset - len(got)
        assert r.offset == total
        assert got == pattern_at(start, len(got))


def test_deferred_wakes_flushed_per_batch_lose_no_wake_up(
    seg_path: str, loop_kind: str, run_async, child_env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A producer in another process appends to many sessions with ``defer_wake=True`` and
    calls ``flush_wakes()`` after each batch (of varying size, at varying moments of this
    loop's arm and drain), then finalizes every session with ``defer_wake=True`` and
    flushes once: every reader here reads every stream to its end, woken only by datagrams
    (the rescan is put out of reach, so a lost wake-up hangs the test)."""
    from ringcast import _aio

    monkeypatch.setattr(_aio, "RESCAN_S", 3600.0)
    streams, per_stream = 16, scaled(40_000, 4_000)
    seg = ringcast.Segment.create(seg_path, max_sessions=32, session_bytes=1 << 20)
    writers = [seg.create_or_replace(f"s{i}") for i in range(streams)]
    readers = [seg.reader(f"s{i}", 0) for i in range(streams)]
    gens = [w.generation for w in writers]
    code = f"""
import random, sys, time, ringcast
from children import pattern_at
seg = ringcast.Segment.open(sys.argv[1])
ws = [seg.adopt(f"s{{i}}", "", g) for i, g in enumerate({gens})]
offs = [0] * len(ws)
rng = random.Random(7)
sys.stdin.readline()
while any(o < {per_stream} for o in offs):
    for _ in range(rng.randint(1, 40)):
        i = rng.randrange(len(ws))
        n = min(rng.randint(1, 64), {per_stream} - offs[i])
        if n:
            assert ws[i].write(pattern_at(offs[i], n), defer_wake=True)
            offs[i] += n
    seg.flush_wakes()
    if rng.random() < 0.05:
        time.sleep(0.0005)
sys.stdin.readline()  # every byte was read: only datagrams could have told the reader
for w in ws:
    assert w.finalize(defer_wake=True)
seg.flush_wakes()  # the ends too are told only by the flush
"""
    producer = subprocess.Popen(
        [sys.executable, "-c", code, seg.path], stdin=subprocess.PIPE, env=child_env, text=True
    )

    async def read_all(r: ringcast.Reader) -> bytes:
        out = bytearray()
        while len(out) < per_stream:
            out += await r.aread(1 << 12)
        return bytes(out)

    async def main() -> list[bytes]:
        tasks = [asyncio.create_task(read_all(r)) for r in readers]
        await asyncio.sleep(0)
        assert producer.stdin is not None
        producer.stdin.write("go\n")
        producer.stdin.flush()
        got = await asyncio.wait_for(asyncio.gather(*tasks), 60)
        producer.stdin.write("read\n")
        producer.stdin.flush()
        for r in readers:
            assert await asyncio.wait_for(r.aread(), 30) == b""
        return got

    with producer:
        results = run_async(loop_kind, main)
        assert producer.stdin is not None
        producer.stdin.close()
        assert producer.wait(60) == 0
    for got in results:
        assert got == pattern_at(0, per_stream)


def test_aread_at_a_segment_path_longer_than_a_socket_address_is_woken_from_another_process(
    tmp_path, loop_kind: str, run_async, child_env
) -> None:
    # A socket address holds 107 bytes; the notifier's socket lives in "<segment>.wake/".
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = str(deep / ("s" * max(1, 200 - len(str(deep)) - 1)))
    assert len(path) >= 200
    seg = ringcast.Segment.create(path, max_sessions=4, session_bytes=64 * 1024)
    w = seg.create_or_replace("c")
    r = seg.reader("c")
    code = f"""
import sys, ringcast
seg = ringcast.Segment.open(sys.argv[1])
w = seg.adopt("c", "", {w.generation})
for line in sys.stdin:
    w.write(line.encode())
w.finalize()
"""
    producer = subprocess.Popen(
        [sys.executable, "-c", code, seg.path], stdin=subprocess.PIPE, env=child_env, text=True
    )

    async def main() -> None:
        assert producer.stdin is not None
        for i in range(20):
            # Waiting before the line is sent: only a datagram from the producer wakes it.
            task = asyncio.create_task(r.aread())
            for _ in range(5):
                await asyncio.sleep(0)
            assert not task.done()
            producer.stdin.write(f"line {i}\n")
            producer.stdin.flush()
            assert await asyncio.wait_for(task, 60) == f"line {i}\n".encode()
        task = asyncio.create_task(r.aread())
        producer.stdin.close()
        assert await asyncio.wait_for(task, 60) == b""

    with producer:
        run_async(loop_kind, main)
        assert producer.wait(60) == 0
    assert r.at_end
    seg.close()
    os.unlink(path)


@pytest.mark.parametrize("how", ["replaced", "evicted", "cancelled"])
def test_aread_raises_session_ended(
    seg: ringcast.Segment, loop_kind: str, how: str, run_async
) -> None:
    seg.create_or_replace("c", "o")
    r = seg.reader("c", 0, "o")

    async def main() -> None:
        task = asyncio.create_task(r.aread())
        for _ in range(5):
            await asyncio.sleep(0)
        if how == "replaced":
            seg.create_or_replace("c", "o")
        elif how == "evicted":
            seg.evict("c", "o")
        else:
            seg.evict_and_cancel("c", "o")
        with pytest.raises(ringcast.SessionEnded) as ei:
            await asyncio.wait_for(task, 30)
        assert ei.value.reason == how

    run_async(loop_kind, main)


def test_aread_raises_offset_lost(seg: ringcast.Segment, loop_kind: str, run_async) -> None:
    cap = seg.session_bytes
    w = seg.create_or_replace("c")
    r = seg.reader("c")
    w.write(pattern_at(0, cap + 5))

    async def main() -> None:
        with pytest.raises(ringcast.OffsetLost) as ei:
            await r.aread()
        assert (ei.value.requested, ei.value.first_available) == (0, 5)

    run_async(loop_kind, main)


def test_cancelled_aread_leaves_the_reader_usable(
    seg: ringcast.Segment, loop_kind: str, run_async
) -> None:
    w = seg.create_or_replace("c")
    r = seg.reader("c")
    other = seg.reader("c")

    async def main() -> None:
        t1 = asyncio.create_task(r.aread())
        t2 = asyncio.create_task(other.aread())
        for _ in range(5):
            await asyncio.sleep(0)
        t1.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t1
        w.write(b"after cancel")
        assert await asyncio.wait_for(t2, 30) == b"after cancel"
        assert await asyncio.wait_for(r.aread(), 30) == b"after cancel"
        t3 = asyncio.create_task(r.aread())
        await asyncio.sleep(0)
        w.write(b"!")
        assert await asyncio.wait_for(t3, 30) == b"!"

    run_async(loop_kind, main)


_MANY_PRODUCER = """
import sys, ringcast
seg = ringcast.Segment.open(sys.argv[1])
sessions, events = int(sys.argv[2]), int(sys.argv[3])
writers = [seg.create_or_replace(f"s{i}", "many") for i in range(sessions)]
print("ready", flush=True)
sys.stdin.readline()
for k in range(events):
    for i, w in enumerate(writers):
        w.write(f"data: s{i} e{k}\\n\\n".encode())
for w in writers:
    w.finalize()
print("done", flush=True)
"""


def test_ten_thousand_waiting_readers_on_few_threads(
    seg_path: str, loop_kind: str, run_async, thread_count, child_env
) -> None:
    """1,000 sessions x 10 readers, all waiting in one process before the first byte; each
    reader gets exactly its own session's bytes, and the process does not grow a thread per
    reader (the notifier is a socket, not a thread; the loop may have a few of its own)."""
    sessions, per_session, events = scaled(1000, 50), 10, 5
    seg = ringcast.Segment.create(seg_path, max_sessions=sessions, session_bytes=64 * 1024)
    env = child_env
    producer = subprocess.Popen(
        [sys.executable, "-c", _MANY_PRODUCER, seg_path, str(sessions), str(events)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    assert producer.stdin is not None and producer.stdout is not None
    with producer:
        assert producer.stdout.readline() == "ready\n"
        threads_before = thread_count()
        readers = [
            (i, seg.reader(f"s{i}", 0, "many")) for i in range(sessions) for _ in range(per_session)
        ]
        waiting_threads: list[int] = []

        async def main() -> list[tuple[int, bytes]]:
            async def one(i: int, r: ringcast.Reader) -> tuple[int, bytes]:
                return i, await _read_to_end(r)

            tasks = [asyncio.create_task(one(i, r)) for i, r in readers]
            for _ in range(3):
                await asyncio.sleep(0)
            assert not any(t.done() for t in tasks)
            waiting_threads.append(thread_count())
            assert producer.stdin is not None
            producer.stdin.write("go\n")
            producer.stdin.flush()
            return await asyncio.wait_for(asyncio.gather(*tasks), 100)

        results = run_async(loop_kind, main)
        assert producer.stdout.readline() == "done\n"
        producer.stdin.close()
        assert producer.wait(30) == 0
    assert waiting_threads[0] <= threads_before + 4, (threads_before, waiting_threads)
    assert thread_count() <= threads_before + 4
    assert len(results) == sessions * per_session
    for i, got in results:
        assert got == b"".join(f"data: s{i} e{k}\n\n".encode() for k in range(events)), i
    info = seg.get("s0", "many")
    assert info is not None and info.readers == per_session


def test_aread_on_two_segments_in_one_loop(seg_path: str, loop_kind: str, run_async) -> None:
    """Each segment handle has its own notifier fd; readers of both wake in the same loop."""
    a = ringcast.Segment.create(seg_path, max_sessions=4, session_bytes=64 * 1024)
    b_path = seg_path + "-b"
    b = ringcast.Segment.create(b_path, max_sessions=4, session_bytes=64 * 1024)
    try:
        wa, wb = a.create_or_replace("c"), b.create_or_replace("c")
        ra, rb = a.reader("c"), b.reader("c")

        async def main() -> None:
            ta, tb = asyncio.create_task(ra.aread()), asyncio.create_task(rb.aread())
            for _ in range(5):
                await asyncio.sleep(0)
            wb.write(b"from b")
            assert await asyncio.wait_for(tb, 30) == b"from b"
            wa.write(b"from a")
            assert await asyncio.wait_for(ta, 30) == b"from a"

        run_async(loop_kind, main)
    finally:
        b.close()
        os.unlink(b_path)
        shutil.rmtree(b_path + ".wake", ignore_errors=True)  # as seg_path does for `a`


def test_aread_after_closing_a_segment_in_the_same_loop(
    seg_path: str, loop_kind: str, run_async
) -> None:
    """A closed segment's notifier must not capture the wake-ups of a segment opened later."""
    paths = [seg_path, seg_path + "-2", seg_path + "-3"]
    try:

        async def main() -> None:
            for path in paths:
                s = ringcast.Segment.create(path, max_sessions=4, session_bytes=64 * 1024)
                w = s.create_or_replace("c")
                r = s.reader("c")
                task = asyncio.create_task(r.aread())
                for _ in range(5):
                    await asyncio.sleep(0)
                w.write(path.encode())
                assert await asyncio.wait_for(task, 30) == path.encode()
                s.close()
                with pytest.raises(ringcast.SegmentError):
                    await r.aread()

        run_async(loop_kind, main)
    finally:
        for path in paths[1:]:
            if os.path.exists(path):
                os.unlink(path)


class _CountingNotifier:
    """Wraps a Notifier and records the hub's subscribe/unsubscribe calls."""

    def __init__(self, n: ringcast.Notifier) -> None:
        self.n = n
        self.calls: list[tuple[str, int, int]] = []

    def fileno(self) -> int:
        return self.n.fileno()

    def subscribe(self, slot: int, generation: int) -> None:
        self.calls.append(("subscribe", slot, generation))
        self.n.subscribe(slot, generation)

    def unsubscribe(self, slot: int, generation: int) -> None:
        self.calls.append(("unsubscribe", slot, generation))
        self.n.unsubscribe(slot, generation)

    def drain(self) -> list[int]:
        return self.n.drain()

    def scan(self, take_one: bool = False) -> list[int]:
        return self.n.scan(take_one)

    def arm(self, yield_first: bool = False) -> bool:
        return self.n.arm(yield_first)

    @property
    def arm_state(self) -> str:
        return self.n.arm_state

    def owns_row(self) -> bool:
        return self.n.owns_row()


def _install_hub(wrapper: _CountingNotifier) -> Any:
    """Makes the running loop's hub one fed by ``wrapper``, standing for the real notifier's
    fd (what ``aread`` looks its hub up by); returns the hub."""
    from ringcast import _aio

    loop = asyncio.get_running_loop()
    hub = _aio._LoopHub(loop, wrapper)  # type: ignore[arg-type]
    _aio._hubs[loop] = {wrapper.n.fileno(): hub}
    return hub


def test_subscriptions_stay_while_readers_wait(
    seg: ringcast.Segment, loop_kind: str, run_async
) -> None:
    """A reader that waits again and again subscribes once; the subscription is dropped by the
    first drain that finds the session advanced with nobody waiting on it (a drain happens
    while some reader of the process waits: a process with no waiter is not even told)."""

    w = seg.create_or_replace("c")
    r = seg.reader("c")
    counting = _CountingNotifier(seg.notifier())
    sub, unsub = ("subscribe", r.slot, r.generation), ("unsubscribe", r.slot, r.generation)

    async def main() -> None:
        hub = _install_hub(counting)
        for i in range(20):
            task = asyncio.create_task(r.aread())
            for _ in range(3):
                await asyncio.sleep(0)
            assert not task.done()
            w.write(b"%d," % i)
            assert await asyncio.wait_for(task, 30) == b"%d," % i
        assert counting.calls == [sub]
        assert hub._subscribed == {r.slot: r.generation}
        # Nobody waits on "c" any more, but a reader of "d" does (so the process is armed):
        # the next change of "c" is the last one this process hears of.
        wd = seg.create_or_replace("d")
        rd = seg.reader("d")
        other = asyncio.create_task(rd.aread())
        for _ in range(3):
            await asyncio.sleep(0)
        sub_d = ("subscribe", rd.slot, rd.generation)
        assert counting.calls == [sub, sub_d]
        w.write(b"late")
        for _ in range(3000):
            if len(counting.calls) > 2:
                break
            await asyncio.sleep(0.01)
        assert counting.calls == [sub, sub_d, unsub]
        assert hub._subscribed == {rd.slot: rd.generation}
        assert await r.aread() == b"late"
        wd.write(b"d")
        assert await asyncio.wait_for(other, 30) == b"d"
        hub.close()

    run_async(loop_kind, main)


class _DeafNotifier(_CountingNotifier):
    """A notifier whose datagrams the loop never sees: every wake-up is lost."""

    def __init__(self, n: ringcast.Notifier) -> None:
        super().__init__(n)
        self.r, self.w = os.pipe()

    def fileno(self) -> int:
        return self.r


def test_a_lost_wake_up_costs_at_most_the_rescan(
    seg: ringcast.Segment, loop_kind: str, caplog: pytest.LogCaptureFixture, run_async
) -> None:
    """Even if every datagram were lost, a waiting reader is woken by the hub's periodic
    rescan (RESCAN_S) instead of hanging, and the rescue is logged."""
    from ringcast import _aio

    w = seg.create_or_replace("deaf")
    r = seg.reader("deaf")
    deaf = _DeafNotifier(seg.notifier())

    async def main() -> None:
        hub = _install_hub(deaf)  # it watches the pipe
        task = asyncio.create_task(r.aread())
        for _ in range(3):
            await asyncio.sleep(0)
        t0 = time.monotonic()
        w.write(b"late but not lost")
        assert await asyncio.wait_for(task, 30) == b"late but not lost"
        assert time.monotonic() - t0 <= _aio.RESCAN_S + 1.0
        assert "rescan woke 1 waiting reader(s)" in caplog.text
        hub.close()
        os.close(deaf.r)
        os.close(deaf.w)

    run_async(loop_kind, main)


PROCS_OFFSET_AT = 48  # header: u64 offset of the process table
PROC_ROW_BYTES = 128  # a row: pid u32, armed u32, start time u64, wake nonce u64, padding
ARMED_AT, NONCE_AT = 4, 16


def _my_proc_row(seg_path: str) -> tuple[mmap.mmap, int]:
    """The segment mapped, and the offset of this process's row in its process table."""
    with open(seg_path, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 0)
    procs = struct.unpack_from("<Q", mm, PROCS_OFFSET_AT)[0]
    for i in range(ringcast.MAX_PROCESSES):
        off = procs + i * PROC_ROW_BYTES
        if struct.unpack_from("<I", mm, off)[0] == os.getpid():
            return mm, off
    raise AssertionError("this process has no row")


def test_a_producer_that_died_sending_does_not_silence_the_process(
    seg: ringcast.Segment, seg_path: str, loop_kind: str, monkeypatch: pytest.MonkeyPatch, run_async
) -> None:
    """A producer takes a process's arm ("sending") before its datagram goes out; one killed
    right there leaves the row "sending" for good. The next reader to wait re-arms anyway,
    so the next append reaches it by datagram (the rescan is put out of reach here)."""
    from ringcast import _aio

    monkeypatch.setattr(_aio, "RESCAN_S", 3600.0)
    w = seg.create_or_replace("orphaned-arm")
    r = seg.reader("orphaned-arm")
    n = seg.notifier()
    assert n.arm_state == "armed"
    mm, row = _my_proc_row(seg_path)
    struct.pack_into("<I", mm, row + ARMED_AT, 2)  # what the killed producer left
    assert n.arm_state == "sending"

    async def main() -> None:
        task = asyncio.create_task(r.aread())
        for _ in range(3):
            await asyncio.sleep(0)
        assert not task.done()
        assert n.arm_state == "armed", "the waiting reader took the arm back"
        w.write(b"heard")
        assert await asyncio.wait_for(task, 30) == b"heard"

    run_async(loop_kind, main)
    # And directly: an arm left "sending" counts as disarmed.
    struct.pack_into("<I", mm, row + ARMED_AT, 2)
    assert n.arm() is True
    assert n.arm_state == "armed"
    assert n.arm() is False
    mm.close()


def test_a_stolen_process_row_is_reported_and_rescued(
    seg: ringcast.Segment,
    seg_path: str,
    loop_kind: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    run_async,
) -> None:
    """If another process claimed this one's process-table row (taking it for dead), producers
    signal the wrong socket. The notifier can tell (``owns_row``); the rescan logs it as an
    error, and still wakes the readers (logging the lost wake-up)."""
    import socket

    from ringcast import _aio

    monkeypatch.setattr(_aio, "RESCAN_S", 0.2)
    w = seg.create_or_replace("stolen-row")
    r = seg.reader("stolen-row")
    n = seg.notifier()
    assert n.owns_row()
    mm, row = _my_proc_row(seg_path)
    nonce = struct.unpack_from("<Q", mm, row + NONCE_AT)[0]
    struct.pack_into("<Q", mm, row + NONCE_AT, nonce ^ 1)  # the thief's nonce
    assert not n.owns_row()
    # The thief binds the row's socket name, replacing ours, as a new owner of a row does.
    (name,) = os.listdir(seg_path + ".wake")
    thief_path = os.path.join(seg_path + ".wake", name)
    os.unlink(thief_path)
    thief = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    thief.bind(thief_path)

    async def main() -> None:
        task = asyncio.create_task(r.aread())
        for _ in range(3):
            await asyncio.sleep(0)
        w.write(b"sent to the thief")
        assert await asyncio.wait_for(task, 30) == b"sent to the thief"

    with caplog.at_level(logging.WARNING, logger="ringcast.aio"):
        run_async(loop_kind, main)
    errors = [rec for rec in caplog.records if rec.levelno == logging.ERROR]
    assert len(errors) == 1 and "claimed this process's row" in errors[0].getMessage()
    assert "whose wake-up datagram never came" in caplog.text
    thief.close()
    os.unlink(thief_path)
    struct.pack_into("<Q", mm, row + NONCE_AT, nonce)
    assert n.owns_row()
    mm.close()


class _RacingNotifier(_CountingNotifier):
    """A notifier whose next ``arm()`` is followed at once by an append, as if a producer
    published between the arm and the drain that follows it."""

    def __init__(self, n: ringcast.Notifier) -> None:
        super().__init__(n)
        self.race: ringcast.Writer | None = None

    def arm(self, yield_first: bool = False) -> bool:
        rearmed = self.n.arm(yield_first)
        if self.race is not None:
            w, self.race = self.race, None
            w.write(b"raced")  # takes the fresh arm: its datagram is in the socket
        return rearmed


def test_a_datagram_drained_right_after_an_arm_leaves_the_process_armed(
    seg: ringcast.Segment, loop_kind: str, monkeypatch: pytest.MonkeyPatch, run_async
) -> None:
    """The drain that follows an arm can swallow the datagram of a publish that came right
    after the arm. Readers still waiting then need another arm: without it the process stays
    disarmed with nothing in its socket, and the next append reaches no one (the rescan is put
    out of reach here, so that would hang)."""
    from ringcast import _aio

    monkeypatch.setattr(_aio, "RESCAN_S", 3600.0)
    wa, wb = seg.create_or_replace("raced"), seg.create_or_replace("left-waiting")
    ra, rb = seg.reader("raced"), seg.reader("left-waiting")
    racing = _RacingNotifier(seg.notifier())

    async def main() -> None:
        hub = _install_hub(racing)
        woken = asyncio.create_task(ra.aread())
        waiting = asyncio.create_task(rb.aread())
        for _ in range(3):
            await asyncio.sleep(0)
        assert not woken.done() and not waiting.done()
        # This append's datagram wakes the loop; it wakes the reader of "raced" and, with the
        # other reader still waiting, re-arms, and the race fires right after that arm.
        racing.race = wa
        wa.write(b"first")
        assert await asyncio.wait_for(woken, 30) in (b"first", b"firstraced")
        assert racing.race is None, "the race fired"
        wb.write(b"heard")
        assert await asyncio.wait_for(waiting, 10) == b"heard"
        hub.close()

    run_async(loop_kind, main)


def test_only_the_readers_of_the_advanced_session_are_woken(
    seg: ringcast.Segment, loop_kind: str, run_async
) -> None:
    """An append wakes the futures of its own session's readers and no other (a woken reader
    that finds nothing would go back to waiting on a new future: the other future must stay
    the very same object, unresolved)."""
    from ringcast import _aio

    wa, _wb = seg.create_or_replace("advances"), seg.create_or_replace("stays")
    ra, rb = seg.reader("advances"), seg.reader("stays")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ta, tb = asyncio.create_task(ra.aread()), asyncio.create_task(rb.aread())
        for _ in range(3):
            await asyncio.sleep(0)
        hub = next(iter(_aio._hubs[loop].values()))
        (fut_b,) = hub._waiters[rb.slot][rb.generation]
        wa.write(b"news")
        assert await asyncio.wait_for(ta, 30) == b"news"
        for _ in range(5):
            await asyncio.sleep(0)
        assert not tb.done()
        assert not fut_b.done()
        assert hub._waiters[rb.slot][rb.generation] == [fut_b]
        tb.cancel()

    run_async(loop_kind, main)


def test_a_reader_already_waiting_when_a_producer_dies_sending_is_rescued(
    seg: ringcast.Segment,
    seg_path: str,
    loop_kind: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    run_async,
) -> None:
    """A row left "sending" by a producer killed before its datagram went out silences the
    process for every later publish; a reader already waiting then has no wait of its own to
    re-arm it. The rescan leaves one "sending" to the datagram on its way, but not two in a
    row: it rescans, wakes the reader and says so."""
    from ringcast import _aio

    monkeypatch.setattr(_aio, "RESCAN_S", 0.2)
    w = seg.create_or_replace("died-sending")
    r = seg.reader("died-sending")
    mm, row = _my_proc_row(seg_path)

    async def main() -> None:
        task = asyncio.create_task(r.aread())
        for _ in range(3):
            await asyncio.sleep(0)
        assert not task.done()
        struct.pack_into("<I", mm, row + ARMED_AT, 2)  # what the killed producer left
        w.write(b"unsignalled")  # sees "sending": sends nothing
        assert await asyncio.wait_for(task, 30) == b"unsignalled"

    with caplog.at_level(logging.WARNING, logger="ringcast.aio"):
        run_async(loop_kind, main)
    assert "by a producer that died sending" in caplog.text
    mm.close()


class _Collector:
    """A standing-watch consumer that reads what is there on every call."""

    def __init__(self, r: ringcast.Reader) -> None:
        self.r = r
        self.got = bytearray()
        self.calls = 0
        self.errors: list[BaseException] = []
        self.changed = asyncio.Event()
        self.watch: Any = None

    def on_ready(self) -> None:
        self.calls += 1
        try:
            while (data := self.r.read_nowait()) is not None:
                if not data:
                    self.errors.append(EOFError())
                    self.watch.cancel()
                    break
                self.got += data
        except ringcast.SessionEnded as e:
            self.errors.append(e)
            self.watch.cancel()
        self.changed.set()

    def on_error(self, exc: BaseException) -> None:
        self.errors.append(exc)
        self.changed.set()


async def _until(cond: Any, c: _Collector) -> None:
    while not cond():
        c.changed.clear()
        await asyncio.wait_for(c.changed.wait(), 30)


def test_a_standing_watch_is_called_for_every_change_and_the_end(
    seg: ringcast.Segment, loop_kind: str, run_async
) -> None:
    """A watch sees bytes already there at once, then every append, then the end; it holds
    one subscription throughout and none is left once it ended."""
    from ringcast import _aio

    w = seg.create_or_replace("watched")
    w.write(b"before,")
    r = seg.reader("watched")
    counting = _CountingNotifier(seg.notifier())

    async def main() -> None:
        hub = _install_hub(counting)
        c = _Collector(r)
        c.watch = _aio.watch(r, c)
        assert bytes(c.got) == b"before,", "ready at once: called synchronously"
        for i in range(50):
            w.write(b"%d," % i)
            await _until(lambda i=i: c.got.endswith(b"%d," % i), c)
        w.finalize()
        await _until(lambda: bool(c.errors), c)
        assert isinstance(c.errors[0], EOFError)
        assert bytes(c.got) == b"before," + b"".join(b"%d," % i for i in range(50))
        assert counting.calls == [("subscribe", r.slot, r.generation)]
        assert hub._watches == {}
        hub.close()

    run_async(loop_kind, main)


def test_a_watch_whose_first_call_closes_its_reader_is_dropped(
    seg: ringcast.Segment, loop_kind: str, run_async
) -> None:
    """``watch`` re-arms (and so may drain and call its new consumer) before its own
    readiness check. A consumer that reads a finished session to its end there and closes its
    reader (as the server's pump does) made that check raise "the reader was closed", and the
    watch stayed registered for ever: the hub then re-armed, rescanned and stayed subscribed
    to the slot as if a reader waited."""
    from ringcast import _aio

    w = seg.create_or_replace("short")

    class _Closing(_Collector):
        def on_ready(self) -> None:
            self.calls += 1
            while (data := self.r.read_nowait()) is not None and data:
                self.got += data
            if data == b"":
                self.r.close()

    async def main() -> None:
        hub = _aio._hub_for(seg.notifier())
        first = _Collector(seg.reader("short"))
        first.watch = _aio.watch(first.r, first)
        first.watch.cancel()  # the slot stays subscribed (sticky), the hub armed
        w.write(b"all of it")  # disarms the hub: its datagram is not taken yet
        w.finalize()
        closing = _Closing(seg.reader("short"))
        watch = _aio.watch(closing.r, closing)  # re-arms, drains: calls `closing` at once
        assert closing.calls == 1 and bytes(closing.got) == b"all of it"
        assert watch._hub is None, "the watch of a closed reader is dropped"
        assert hub._watches == {} and not hub._waiting()
        hub.close()

    run_async(loop_kind, main)


def test_watches_and_futures_share_a_hub_and_a_cancelled_watch_is_not_called(
    seg: ringcast.Segment, loop_kind: str, run_async
) -> None:
    """A watch, a cancelled watch and an ``aread`` on three sessions of one process: each
    append reaches only its own session's consumer; a consumer that raises is reported to the
    loop's exception handler and loses its watch, without stopping the others."""
    from ringcast import _aio

    wa, wb, wc = (seg.create_or_replace(x) for x in ("a", "b", "c"))
    ra, rb, rc = (seg.reader(x) for x in ("a", "b", "c"))

    class _Raising(_Collector):
        def on_ready(self) -> None:
            super().on_ready()
            raise RuntimeError("consumer bug")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        reported: list[dict[str, Any]] = []
        handler = loop.get_exception_handler()
        loop.set_exception_handler(lambda _loop, ctx: reported.append(ctx))
        ca, cb, craise = _Collector(ra), _Collector(rb), _Raising(rc)
        ca.watch = _aio.watch(ra, ca)
        cb.watch = _aio.watch(rb, cb)
        craise.watch = _aio.watch(rc, craise)
        cb.watch.cancel()
        cb.watch.cancel()  # idempotent
        wc.write(b"boom")
        await _until(lambda: bool(reported), craise)
        assert str(reported[0]["exception"]) == "consumer bug"
        wb.write(b"unseen")
        wa.write(b"seen")
        await _until(lambda: bytes(ca.got) == b"seen", ca)
        wc.write(b"after")
        waiting = asyncio.create_task(rc.aread())
        assert await asyncio.wait_for(waiting, 30) == b"after"
        assert cb.calls == 0 and bytes(cb.got) == b""
        assert craise.calls == 1, "its watch was dropped when it raised"
        ca.watch.cancel()
        loop.set_exception_handler(handler)

    run_async(loop_kind, main)


def test_a_lost_wake_up_costs_a_watch_at_most_the_rescan(
    seg: ringcast.Segment, loop_kind: str, caplog: pytest.LogCaptureFixture, run_async
) -> None:
    """A standing watch counts as a waiting reader for the safety net: with every datagram
    lost, the rescan still calls it."""
    from ringcast import _aio

    w = seg.create_or_replace("deaf-watch")
    r = seg.reader("deaf-watch")
    deaf = _DeafNotifier(seg.notifier())

    async def main() -> None:
        hub = _install_hub(deaf)
        c = _Collector(r)
        c.watch = _aio.watch(r, c)
        assert c.calls == 0
        t0 = time.monotonic()
        w.write(b"late but not lost")
        await _until(lambda: bytes(c.got) == b"late but not lost", c)
        assert time.monotonic() - t0 <= _aio.RESCAN_S + 1.0
        assert "rescan woke 1 waiting reader(s)" in caplog.text
        c.watch.cancel()
        hub.close()
        os.close(deaf.r)
        os.close(deaf.w)

    run_async(loop_kind, main)


def test_a_datagram_drained_right_after_an_arm_leaves_a_watching_process_armed(
    seg: ringcast.Segment, loop_kind: str, monkeypatch: pytest.MonkeyPatch, run_async
) -> None:
    """The re-arm loop holds for watches too: a publish right after the arm whose datagram
    the following drain swallows leaves the process armed, so a later append still reaches
    a watch (the rescan is out of reach here, so a lost wake-up would hang)."""
    from ringcast import _aio

    monkeypatch.setattr(_aio, "RESCAN_S", 3600.0)
    wa, wb = seg.create_or_replace("raced-w"), seg.create_or_replace("left-watching")
    ra, rb = seg.reader("raced-w"), seg.reader("left-watching")
    racing = _RacingNotifier(seg.notifier())

    async def main() -> None:
        hub = _install_hub(racing)
        ca, cb = _Collector(ra), _Collector(rb)
        ca.watch = _aio.watch(ra, ca)
        cb.watch = _aio.watch(rb, cb)
        racing.race = wa
        wa.write(b"first")
        await _until(lambda: bytes(ca.got) == b"firstraced", ca)
        assert racing.race is None, "the race fired"
        wb.write(b"heard")
        await _until(lambda: bytes(cb.got) == b"heard", cb)
        ca.watch.cancel()
        cb.watch.cancel()
        hub.close()

    run_async(loop_kind, main)


def test_a_watch_is_told_whether_anything_else_in_its_loop_waits_on_the_session(
    seg: ringcast.Segment, loop_kind: str, run_async
) -> None:
    """``on_company``: what lets the server's pump have its producer write through to the
    clients without waking anybody. It must say "shared" for as long as a reader's wait or
    another watch is on the session, and "alone" again once they are gone."""
    from ringcast import _aio

    w = seg.create_or_replace("company")
    other = seg.create_or_replace("elsewhere")

    class _Told(_Collector):
        def __init__(self, r: ringcast.Reader) -> None:
            super().__init__(r)
            self.told: list[bool] = []

        def on_company(self, shared: bool) -> None:
            self.told.append(shared)

    async def main() -> None:
        c = _Told(seg.reader("company"))
        c.watch = _aio.watch(c.r, c)
        assert c.told == [False]
        waiting = asyncio.create_task(seg.reader("company").aread())
        elsewhere = asyncio.create_task(seg.reader("elsewhere").aread())
        for _ in range(3):
            await asyncio.sleep(0)
        assert c.told == [False, True]  # a reader of another session is no company
        w.write(b"x")
        assert await asyncio.wait_for(waiting, 30) == b"x"
        assert c.told[-1] is False
        second = _Told(seg.reader("company"))
        second.watch = _aio.watch(second.r, second)
        assert c.told[-1] is True and second.told == [True]
        second.watch.cancel()
        assert c.told[-1] is False
        cancelled = asyncio.create_task(seg.reader("company", 1).aread())
        for _ in range(3):
            await asyncio.sleep(0)
        assert c.told[-1] is True
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert c.told[-1] is False  # a wait given up leaves no company behind
        other.write(b"y")
        assert await asyncio.wait_for(elsewhere, 30) == b"y"
        c.watch.cancel()

    run_async(loop_kind, main)
