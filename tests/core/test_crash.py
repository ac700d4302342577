"""``kill -9`` at random points of every operation leaves the segment fully usable.

A child loops one operation (append, create_or_replace, evict, read); the parent kills it with
SIGKILL after a random delay, N times, then checks that the segment still works from the
parent and from a fresh process (a lock left held would hang those: they run with a timeout),
that sessions whose producer died say so and can be taken over, and that the bytes readers
see are still exactly the bytes that were published.
"""

from __future__ import annotations

import os
import random
import signal
import time
from typing import Any

import children
import multiprocess
import pytest
import ringcast
from children import pattern_at, scaled

KiB = 1024
CTX = multiprocess.get_context("spawn")
ROUNDS = scaled(12, 2)


def _kill_at_random(target: Any, args: tuple[Any, ...], rng: random.Random) -> None:
    ready = CTX.Event()
    p = CTX.Process(target=target, args=(*args, ready))
    p.start()
    assert ready.wait(60), "child never got going"
    # Not a timing assertion: the delay only picks a random point of the child's loop.
    time.sleep(rng.uniform(0.0, 0.03))
    os.kill(p.pid, signal.SIGKILL)
    p.join(30)
    assert p.exitcode == -signal.SIGKILL, f"child ended on its own: {p.exitcode}"


def _read_all_checked(seg: ringcast.Segment, conv: str, owner: str) -> int:
    """Read ``conv`` from its first available offset to the published end, checking every
    byte against the pattern; returns the end offset."""
    info = seg.get(conv, owner)
    assert info is not None
    r = seg.reader(conv, info.first_available, owner)
    while True:
        start = r.offset
        data = r.read_nowait(1 << 19)
        if not data:
            break
        assert data == pattern_at(start, len(data)), f"wrong bytes in [{start}, {r.offset})"
    end = r.offset
    r.close()
    return end


_USABLE_SCRIPT = """
import sys, ringcast
from children import pattern_at
seg = ringcast.Segment.open(sys.argv[1])
cap = seg.session_bytes
w = seg.create_or_replace("usable-check", "fresh")
r = seg.reader("usable-check", 0, "fresh")
assert w.write(pattern_at(0, cap // 2))
assert r.read_nowait(cap) == pattern_at(0, cap // 2)
assert w.write(pattern_at(cap // 2, 2 * cap))
info = seg.get("usable-check", "fresh")
assert info.total_bytes == 5 * cap // 2 and info.first_available == 3 * cap // 2, info
r2 = seg.reader("usable-check", info.first_available, "fresh")
assert r2.read_nowait(cap) == pattern_at(3 * cap // 2, cap)
assert w.finalize()
assert seg.evict("usable-check", "fresh")
w = seg.create_or_replace("usable-check", "fresh")
assert seg.evict_and_cancel("usable-check", "fresh") and w.cancelled
seg.list(); seg.stats(); seg.lookup_prefix("crash", "crash")
print("usable")
"""


@pytest.fixture
def assert_usable(run_python: Any) -> Any:
    """``assert_usable(seg)``: the segment still works, from a fresh process and from here."""
    return lambda seg: _assert_usable(run_python, seg)


def _assert_usable(run_python: Any, seg: ringcast.Segment) -> None:
    # From a fresh process first: if a dead child left a lock held, this hangs and times out
    # instead of hanging the test run.
    proc = run_python(_USABLE_SCRIPT, 60, seg.path)
    assert proc.returncode == 0 and proc.stdout == "usable\n", proc.stderr
    # And from the parent.
    w = seg.create_or_replace("parent-check", "crash")
    assert w.write(b"data: still works\n\n")
    assert seg.reader("parent-check", 0, "crash").read_nowait() == b"data: still works\n\n"
    assert w.finalize()
    assert seg.evict("parent-check", "crash")


def _assert_registry_consistent(seg: ringcast.Segment) -> None:
    """Every listed session is unique, and a running one whose producer died (all children are
    dead by now) can be taken over and written to."""
    infos = seg.list()
    keys = [(i.owner, i.conversation_id) for i in infos]
    assert len(keys) == len(set(keys)), keys
    assert seg.stats().sessions_used == len(infos)
    assert len({i.slot for i in infos}) == len(infos)
    for info in infos:
        if info.state != "running" or info.producer_pid == os.getpid():
            continue
        assert not info.producer_alive, info
        w = seg.take_over_dead(info.conversation_id, info.owner)
        assert w is not None, info
        assert (w.slot, w.generation) == (info.slot, info.generation)
        assert w.write(b"taken over")
        assert seg.take_over_dead(info.conversation_id, info.owner) is None
        now = seg.get(info.conversation_id, info.owner)
        assert now is not None
        assert now.producer_pid == os.getpid() and now.producer_alive
        assert now.total_bytes == info.total_bytes + len(b"taken over")
        w.finalize()


@pytest.mark.timeout(120)
def test_kill_9_while_appending(seg_path: str, assert_usable) -> None:
    seg = ringcast.Segment.create(seg_path, max_sessions=16, session_bytes=64 * KiB)
    rng = random.Random(1)
    for _ in range(ROUNDS):
        _kill_at_random(children.loop_append, (seg_path, "crash-append"), rng)
        info = seg.get("crash-append", "crash")
        assert info is not None and info.state == "running"
        assert not info.producer_alive
        published = info.total_bytes
        # Whatever the dead producer was in the middle of, readers see only published bytes,
        # and those are right.
        assert _read_all_checked(seg, "crash-append", "crash") == published
        w = seg.take_over_dead("crash-append", "crash")
        assert w is not None
        assert w.total_bytes == published
        assert w.write(pattern_at(published, 1000))
        assert _read_all_checked(seg, "crash-append", "crash") == published + 1000
        assert w.finalize()
    _assert_registry_consistent(seg)
    assert_usable(seg)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("op", ["create_or_replace", "evict"])
def test_kill_9_during_registry_changes(seg_path: str, op: str, assert_usable) -> None:
    seg = ringcast.Segment.create(seg_path, max_sessions=16, session_bytes=64 * KiB)
    target = children.loop_create_or_replace if op == "create_or_replace" else children.loop_evict
    rng = random.Random(2)
    for _ in range(ROUNDS):
        _kill_at_random(target, (seg_path,), rng)
        _assert_registry_consistent(seg)
    assert_usable(seg)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["read", "aread"])
def test_kill_9_while_reading(seg_path: str, how: str, assert_usable) -> None:
    seg = ringcast.Segment.create(seg_path, max_sessions=16, session_bytes=64 * KiB)
    w = seg.create_or_replace("crash-read", "crash")
    rng = random.Random(3)
    off = 0
    target = children.loop_read if how == "read" else children.loop_aread
    for _ in range(ROUNDS):
        n = rng.randrange(1, 100 * KiB)
        assert w.write(pattern_at(off, n))
        off += n
        _kill_at_random(target, (seg_path, "crash-read"), rng)
        # Appends keep flowing while dead readers' subscriptions linger.
        assert w.write(pattern_at(off, 10))
        off += 10
    info = seg.get("crash-read", "crash")
    assert info is not None
    assert info.readers == 0, "readers of killed processes still counted"
    # The producer is not blocked by whatever the dead readers left behind (a waiter count,
    # a subscription): it appends, and a new reader wakes on the append.
    r = seg.reader("crash-read", off, "crash")
    assert w.write(pattern_at(off, 10))
    assert r.read(100, timeout=30) == pattern_at(off, 10)
    _assert_registry_consistent(seg)
    assert_usable(seg)


_SIGBUS_SCRIPT = """
import mmap, os, sys, tempfile, ringcast
from children import pattern_at
seg = ringcast.Segment.open(sys.argv[1])
cap = seg.session_bytes
w = seg.create_or_replace("torn", "crash")
assert w.write(pattern_at(0, 3 * cap))
print("published", w.total_bytes, flush=True)
# A source buffer whose second half vanishes: the append faults (SIGBUS) half-way through its
# copy into the ring, which is a producer dying mid-append at a known point.
fd, src = tempfile.mkstemp(dir="/dev/shm")
os.write(fd, pattern_at(3 * cap, cap))
mm = mmap.mmap(fd, cap)
os.ftruncate(fd, cap // 2)
os.unlink(src)
w.write(memoryview(mm))
print("not reached", flush=True)
"""


@pytest.mark.timeout(60)
def test_producer_dying_mid_copy_never_exposes_torn_bytes(seg_path: str, run_python) -> None:
    seg = ringcast.Segment.create(seg_path, max_sessions=4, session_bytes=64 * KiB)
    cap = seg.session_bytes
    proc = run_python(_SIGBUS_SCRIPT, 60, seg_path)
    assert proc.returncode == -signal.SIGBUS, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == f"published {3 * cap}\n"
    info = seg.get("torn", "crash")
    assert info is not None
    assert info.total_bytes == 3 * cap and not info.producer_alive
    # Readers of the published range get right bytes or OffsetLost, never torn ones.
    for offset in (2 * cap, 2 * cap + 1, 2 * cap + cap // 4, 3 * cap - 1):
        try:
            r = seg.reader("torn", offset, "crash")
            data = r.read_nowait(cap)
        except ringcast.OffsetLost as exc:
            assert exc.first_available > offset
            continue
        assert data == pattern_at(offset, 3 * cap - offset), offset
    w = seg.take_over_dead("torn", "crash")
    assert w is not None
    assert w.total_bytes == 3 * cap
    assert w.write(pattern_at(3 * cap, 10))
    # After the take-over, the first available offset must not point into bytes the dead
    # producer half overwrote.
    assert _read_all_checked(seg, "torn", "crash") == 3 * cap + 10


@pytest.mark.timeout(120)
def test_concurrent_take_over_has_exactly_one_winner(seg_path: str, run_python) -> None:
    seg = ringcast.Segment.create(seg_path, max_sessions=4, session_bytes=64 * KiB)
    n = 8
    for round_ in range(scaled(3)):
        conv = f"orphan-{round_}"
        proc = run_python(
            "import sys, ringcast\n"
            "w = ringcast.Segment.open(sys.argv[1]).create_or_replace(sys.argv[2], 'crash')\n"
            "w.write(b'left behind')\n",
            60,
            seg_path,
            conv,
        )
        assert proc.returncode == 0, proc.stderr
        barrier, out = CTX.Barrier(n), CTX.Queue()
        procs = [
            CTX.Process(target=children.take_over_racer, args=(seg_path, conv, i, barrier, out))
            for i in range(n)
        ]
        for p in procs:
            p.start()
        results = []
        for _ in range(n):
            msg = out.get(timeout=60)
            if msg[0] == "error":
                pytest.fail(f"child {msg[1]} failed:\n{msg[2]}")
            results.append(msg)
        winners = [m for m in results if m[2]]
        assert len(winners) == 1, results
        assert winners[0][3] is True
        info = seg.get(conv, "crash")
        assert info is not None and info.producer_alive
        r = seg.reader(conv, 0, "crash")
        assert r.read_nowait() == b"left behind" + f"<{winners[0][1]}>".encode()
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0] * n
        seg.evict(conv, "crash")


def test_sweep_candidates_are_the_dead_producers_and_the_anonymous(
    seg_path: str, run_python
) -> None:
    """``Segment.sweep_candidates``: of every live session, the running ones whose producer
    died and every one of the anonymous owner, none of the skipped prefix; the sessions of a
    live producer and the finished ones are left out."""
    seg = ringcast.Segment.create(seg_path, max_sessions=16, session_bytes=64 * KiB)
    proc = run_python(
        "import sys, ringcast\n"
        "seg = ringcast.Segment.open(sys.argv[1])\n"
        "seg.create_or_replace('dead', 'o')\n"
        "seg.create_or_replace('dead-ds', 'ds:x')\n"
        "print('made')\n",
        60,
        seg.path,
    )
    assert proc.returncode == 0 and proc.stdout == "made\n", proc.stderr
    alive = seg.create_or_replace("alive", "o")
    assert seg.create_or_replace("done", "o").finalize()
    anon = seg.create_or_replace("anon", "~anon")
    assert anon.finalize()

    def names(skip: str) -> set[str]:
        return {i.conversation_id for i in seg.sweep_candidates("~anon", skip)}

    assert names("ds:") == {"dead", "anon"}
    assert names("") == {"dead", "dead-ds", "anon"}
    listed = {i.conversation_id: i for i in seg.list()}
    for info in seg.sweep_candidates("~anon", ""):
        twin = listed[info.conversation_id]
        assert (info.slot, info.generation, info.state, info.producer_alive) == (
            twin.slot,
            twin.generation,
            twin.state,
            twin.producer_alive,
        )
    assert alive.write(b"x")
