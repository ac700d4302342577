"""The core across real processes: fan-out, concurrent replacement, cancellation, reader counts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

import children
import multiprocess
import pytest
import ringcast
from children import scaled

MiB = 1024 * 1024
CTX = multiprocess.get_context("spawn")


def _collect(q: Any, n: int, kind: str, timeout: float = 120) -> list[tuple[Any, ...]]:
    """``n`` messages of ``kind`` from ``q``; a child's error message fails the test at once."""
    got = []
    while len(got) < n:
        msg = q.get(timeout=timeout)
        if msg[0] == "error":
            pytest.fail(f"child {msg[1]} failed:\n{msg[2]}")
        assert msg[0] == kind, msg
        got.append(msg)
    return got


def _join_all(procs: list[Any], timeout: float = 60) -> None:
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert [p.exitcode for p in procs] == [0] * len(procs)


# --- 1 producer, 16 reader processes --------------------------------------------------------


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("total", "ring", "allow_loss"),
    [
        pytest.param(scaled(50 * MiB, 4 * MiB), 64 * MiB, False, id="50MB-ring-holds-all"),
        pytest.param(scaled(20 * MiB, 4 * MiB), 256 * 1024, True, id="20MB-small-ring"),
        # A ring of one page: nearly every read races an overwrite of the bytes it copies.
        pytest.param(scaled(8 * MiB, 2 * MiB), 4096, True, id="8MB-one-page-ring"),
    ],
)
def test_fanout_16_reader_processes(seg_path: str, total: int, ring: int, allow_loss: bool) -> None:
    """Every reader gets exactly the pattern bytes of its range; with a ring smaller than the
    stream, readers that fall behind skip forward and still never see a wrong byte."""
    seg = ringcast.Segment.create(seg_path, max_sessions=4, session_bytes=ring)
    conv = "fan-out"
    created, start, out = CTX.Event(), CTX.Event(), CTX.Queue()
    producer = CTX.Process(
        target=children.fanout_producer, args=(seg_path, conv, total, 7, created, start, out)
    )
    producer.start()
    assert created.wait(60)
    offsets = [
        0,
        0,
        0,
        1,
        4095,
        65_537,
        MiB + 7,
        total // 4,
        total // 3,
        total // 2,
        total // 2 + 1,
        2 * total // 3,
        total - 300_000,
        total - 1,
        total,
        0,
    ]
    readers = [
        CTX.Process(
            target=children.fanout_reader,
            args=(seg_path, conv, i, off, allow_loss, start, out),
        )
        for i, off in enumerate(offsets)
    ]
    for p in readers:
        p.start()
    attached = _collect(out, len(readers), "attached")
    assert sorted(m[2] for m in attached) == sorted(offsets)
    info = seg.get(conv, "fan")
    assert info is not None and info.readers == len(readers)
    start.set()

    done: list[tuple[Any, ...]] = []
    prod: list[tuple[Any, ...]] = []
    while len(done) + len(prod) < len(readers) + 1:
        msg = out.get(timeout=200)
        if msg[0] == "error":
            pytest.fail(f"child {msg[1]} failed:\n{msg[2]}")
        (prod if msg[0] == "producer" else done).append(msg)
    _join_all([producer, *readers])
    assert prod == [("producer", total, total)]
    for _, idx, offset, got, end, lost, losses, _chunks in done:
        assert end == total, (idx, offset, end)
        assert got + lost == total - offset, (idx, offset, got, lost)
        if not allow_loss:
            assert (lost, losses) == (0, 0)
    info = seg.get(conv, "fan")
    assert info is not None
    assert (info.state, info.total_bytes, info.readers) == ("done", total, 0)
    assert info.first_available == max(0, total - ring)


# --- concurrent create_or_replace -----------------------------------------------------------


@pytest.mark.timeout(120)
def test_concurrent_replace_leaves_exactly_one_live_session(seg_path: str) -> None:
    seg = ringcast.Segment.create(seg_path, max_sessions=32, session_bytes=64 * 1024)
    n = 8
    for round_ in range(scaled(3)):
        conv = f"race-{round_}"
        barrier, check, release, out = CTX.Barrier(n), CTX.Event(), CTX.Event(), CTX.Queue()
        procs = [
            CTX.Process(
                target=children.replace_racer,
                args=(seg_path, conv, i, barrier, check, release, out),
            )
            for i in range(n)
        ]
        for p in procs:
            p.start()
        created = {m[1]: (m[2], m[3]) for m in _collect(out, n, "created")}
        live = [i for i in seg.list("race") if i.conversation_id == conv]
        assert len(live) == 1, live
        winner = live[0]
        assert winner.state == "running"
        winners = [i for i, sg in created.items() if sg == (winner.slot, winner.generation)]
        assert len(winners) == 1, (created, winner.slot, winner.generation)
        assert len(set(created.values())) == n, "two creations got the same (slot, generation)"
        assert winner.producer_alive
        check.set()
        flags = {m[1]: (m[2], m[3]) for m in _collect(out, n, "cancelled")}
        release.set()
        _join_all(procs)
        for i, (cancelled, wrote) in flags.items():
            if i == winners[0]:
                assert (cancelled, wrote) == (False, True)
            else:
                assert (cancelled, wrote) == (True, False), i
    # Only the winners' sessions remain: every replaced session gave its slot back.
    assert seg.stats().sessions_used == scaled(3)


# --- cancellation and ends across processes -------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["evict_and_cancel", "evict", "replace"])
def test_cancel_reaches_a_producer_blocked_in_wait_cancelled(seg_path: str, how: str) -> None:
    seg = ringcast.Segment.create(seg_path, max_sessions=8, session_bytes=64 * 1024)
    out = CTX.Queue()
    p = CTX.Process(target=children.wait_cancelled_child, args=(seg_path, "c", "o", out))
    p.start()
    _collect(out, 1, "created")
    if how == "evict_and_cancel":
        assert seg.evict_and_cancel("c", "o")
    elif how == "evict":
        assert seg.evict("c", "o")
    else:
        seg.create_or_replace("c", "o")
    assert _collect(out, 1, "woke") == [("woke", True, True, False)]
    _join_all([p])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["replaced", "evicted", "cancelled", "data", "done"])
def test_reader_blocked_in_another_process_sees_the_end(seg_path: str, how: str) -> None:
    seg = ringcast.Segment.create(seg_path, max_sessions=8, session_bytes=64 * 1024)
    w = seg.create_or_replace("c", "o")
    w.write(b"data: old\n\n")
    out = CTX.Queue()
    p = CTX.Process(target=children.blocked_reader_child, args=(seg_path, "c", "o", out))
    p.start()
    assert _collect(out, 1, "attached") == [("attached", 11)]
    if how == "replaced":
        seg.create_or_replace("c", "o")
    elif how == "evicted":
        seg.evict("c", "o")
    elif how == "cancelled":
        seg.evict_and_cancel("c", "o")
    elif how == "data":
        w.write(b"data: new\n\n")
    else:
        w.finalize()
    msg = out.get(timeout=30)
    if how == "data":
        assert msg == ("data", b"data: new\n\n", False)
    elif how == "done":
        assert msg == ("data", b"", True)
    else:
        assert msg == ("ended", how, how)
    _join_all([p])


# --- reader counts across processes ---------------------------------------------------------


@pytest.mark.timeout(60)
def test_readers_count_across_live_processes_only(seg_path: str) -> None:
    seg = ringcast.Segment.create(seg_path, max_sessions=8, session_bytes=64 * 1024)
    seg.create_or_replace("c", "o").write(b"x")
    procs, releases = [], []
    for _ in range(2):
        ready, release = CTX.Event(), CTX.Event()
        p = CTX.Process(
            target=children.hold_readers_child, args=(seg_path, "c", "o", 3, ready, release)
        )
        p.start()
        assert ready.wait(30)
        procs.append(p)
        releases.append(release)
    mine = [seg.reader("c", 0, "o") for _ in range(2)]

    def readers() -> int:
        info = seg.get("c", "o")
        assert info is not None
        return info.readers

    assert readers() == 8
    releases[0].set()  # closes its 3 readers and exits
    procs[0].join(30)
    assert procs[0].exitcode == 0
    assert readers() == 5
    os.kill(procs[1].pid, signal.SIGKILL)  # its 3 readers are never closed
    procs[1].join(30)
    assert readers() == 2
    mine[0].close()
    assert readers() == 1


_HOLD_SCRIPT = """
import sys, ringcast
seg = ringcast.Segment.open(sys.argv[1])
r = seg.reader("c", 0, "o")
n = seg.notifier()
n.subscribe(r.slot, r.generation)
print("held", flush=True)
sys.stdin.read()
"""


@pytest.mark.timeout(120)
def test_process_entries_of_dead_processes_are_reused(seg_path: str, child_env) -> None:
    """More processes than MAX_PROCESSES attach a reader and a notifier one after another and
    die by SIGKILL without cleaning up; a new process can still attach both."""
    seg = ringcast.Segment.create(seg_path, max_sessions=8, session_bytes=64 * 1024)
    seg.create_or_replace("c", "o").write(b"x")
    env = child_env
    total = ringcast.MAX_PROCESSES + 4
    batch = 8
    started = 0
    while started < total:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _HOLD_SCRIPT, seg_path],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
            )
            for _ in range(min(batch, total - started))
        ]
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            if line != b"held\n":
                p.kill()
                _, err = p.communicate(timeout=30)
                pytest.fail(f"process {started} could not attach: {err.decode()}")
        for p in procs:
            p.kill()
            p.communicate(timeout=30)
        started += len(procs)
    info = seg.get("c", "o")
    assert info is not None and info.readers == 0
    r = seg.reader("c", 0, "o")
    seg.notifier().subscribe(r.slot, r.generation)
    assert r.read_nowait() == b"x"


@pytest.mark.timeout(120)
def test_two_writers_after_adopt_never_tear_records(seg_path: str) -> None:
    """The creator keeps its Writer while another process adopts the session. Whatever the
    core decides about the old handle (refuse its appends, or serialize both), the stream must
    be a sequence of whole records: no interleaved bytes, no lost or duplicated record."""
    seg = ringcast.Segment.create(seg_path, max_sessions=4, session_bytes=64 * MiB)
    n = scaled(3000, 300)
    barrier, out = CTX.Barrier(2), CTX.Queue()
    first = CTX.Process(
        target=children.concurrent_writer, args=(seg_path, "dual", 0, None, n, barrier, out)
    )
    first.start()
    generation = _collect(out, 1, "created")[0][2]
    second = CTX.Process(
        target=children.concurrent_writer,
        args=(seg_path, "dual", 1, generation, n, barrier, out),
    )
    second.start()
    accepted = {m[1]: m[2] for m in _collect(out, 2, "wrote")}
    _join_all([first, second])
    info = seg.get("dual", "dual")
    assert info is not None
    data = seg.reader("dual", 0, "dual").read_nowait(info.total_bytes + 1) or b""
    assert len(data) == info.total_bytes
    seen = {0: 0, 1: 0}
    at = 0
    while at < len(data):
        writer = data[at]
        assert writer in seen, f"garbage writer id {writer} at {at}"
        seq = int.from_bytes(data[at + 1 : at + 5], "little")
        size = int.from_bytes(data[at + 5 : at + 9], "little")
        rec = children.record(writer, seq, size)
        assert data[at : at + len(rec)] == rec, f"torn record at {at}"
        assert seq == seen[writer], f"writer {writer}: record {seq} after {seen[writer]}"
        seen[writer] += 1
        at += len(rec)
    assert seen == accepted


@pytest.mark.timeout(120)
def test_concurrent_open_or_create_agrees_on_one_segment(seg_path: str) -> None:
    """Processes racing to open_or_create one path all end up on the same segment: a process
    that finds the file half-created waits for it rather than failing."""
    n = 8
    for round_ in range(scaled(3)):
        path = f"{seg_path}-{round_}"
        barrier, out = CTX.Barrier(n), CTX.Queue()
        procs = [
            CTX.Process(target=children.open_or_create_racer, args=(path, i, barrier, out))
            for i in range(n)
        ]
        for p in procs:
            p.start()
        try:
            epochs = {m[1]: m[2] for m in _collect(out, n, "opened")}
            _join_all(procs)
            assert len(set(epochs.values())) == 1, epochs
            assert ringcast.Segment.open(path).epoch == epochs[0]
        finally:
            if os.path.exists(path):
                os.unlink(path)


@pytest.mark.timeout(120)
def test_registry_snapshots_are_consistent_under_churn(seg_path: str) -> None:
    """While another process reuses slots as fast as it can, every SessionInfo that list(),
    get() and lookup_prefix() return is one session's entry, never a mix of two."""
    seg = ringcast.Segment.create(seg_path, max_sessions=8, session_bytes=64 * 1024)
    ready, stop = CTX.Event(), CTX.Event()
    p = CTX.Process(target=children.churn_sessions, args=(seg_path, ready, stop))
    p.start()
    assert ready.wait(60)
    checked = 0
    try:
        while checked < scaled(5000):
            for info in seg.list():
                k = int(info.owner[1:])
                assert info.conversation_id == f"s{k}-" + "x" * (k % 200), info
                # Caught between create, write and finalize, or after: never anything else.
                assert info.total_bytes in (0, k % 50), info
                assert info.state in (("running", "done") if k % 3 else ("running",)), info
                assert info.state == "running" or info.total_bytes == k % 50, info
                again = seg.get(info.conversation_id, info.owner)
                if again is not None:
                    assert (again.conversation_id, again.owner) == (
                        info.conversation_id,
                        info.owner,
                    )
                    assert again.total_bytes >= info.total_bytes
                checked += 1
    finally:
        stop.set()
        p.join(30)
    assert p.exitcode == 0
