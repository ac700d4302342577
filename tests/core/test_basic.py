"""Single-process behaviour of the core: segment lifecycle, sessions, readers, errors, stats."""

from __future__ import annotations

import os
import threading
import time

import pytest
import ringcast
from children import pattern_at

pytestmark = pytest.mark.timeout(60)

KiB = 1024
MiB = 1024 * 1024


# --- segment lifecycle ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o666, 0o640, 0o604, 0o660])
def test_a_segment_others_may_read_or_write_is_refused(seg_path: str, mode: int) -> None:
    """A segment is mode 0600 when ringcast makes it; a file at the path that other users may
    read or write (planted in /dev/shm, say) is refused at open, with the reason."""
    ringcast.Segment.create(seg_path, max_sessions=4, session_bytes=64 * KiB).close()
    os.chmod(seg_path, mode)
    with pytest.raises(ringcast.SegmentError, match=f"mode {mode:04o}.*must be mode 0600"):
        ringcast.Segment.open(seg_path)
    with pytest.raises(ringcast.SegmentError, match="must be mode 0600"):
        ringcast.Segment.open_or_create(seg_path, max_sessions=4, session_bytes=64 * KiB)
    os.chmod(seg_path, 0o600)
    ringcast.Segment.open(seg_path).close()


def test_keepalive_bytes_are_bytes_but_not_progress(seg: ringcast.Segment) -> None:
    """``write(progress=False)`` (an SSE ping) appends like any write, for readers too, but
    leaves the session's last write time, which idle detection reads."""
    w = seg.create_or_replace("pinged")
    w.write(b"data: 1\n\n")
    before = seg.get("pinged")
    assert before is not None
    time.sleep(0.05)
    assert w.write(b": ping\n\n", progress=False)
    after = seg.get("pinged")
    assert after is not None
    assert after.total_bytes == before.total_bytes + len(b": ping\n\n")
    assert after.last_write_at == before.last_write_at
    assert seg.reader("pinged").read_nowait() == b"data: 1\n\n: ping\n\n"
    time.sleep(0.05)
    w.write(b"data: 2\n\n")
    later = seg.get("pinged")
    assert later is not None and later.last_write_at > after.last_write_at


def test_create_sets_sizes_mode_and_a_fresh_epoch(seg_path: str) -> None:
    s = ringcast.Segment.create(seg_path, max_sessions=8, session_bytes=64 * KiB, max_id_len=300)
    assert os.stat(seg_path).st_mode & 0o777 == 0o600
    assert (s.path, s.max_sessions, s.session_bytes, s.max_id_len) == (seg_path, 8, 64 * KiB, 300)
    st = s.stats()
    assert (st.max_sessions, st.session_bytes, st.max_id_len, st.epoch) == (
        8,
        64 * KiB,
        300,
        s.epoch,
    )
    assert st.sessions_used == 0
    assert st.bytes_buffered == 0
    assert st.file_bytes == os.stat(seg_path).st_size
    other_path = seg_path + "-2"
    try:
        other = ringcast.Segment.create(other_path, max_sessions=8, session_bytes=64 * KiB)
        assert other.epoch != s.epoch
    finally:
        os.unlink(other_path)


def test_create_refuses_an_existing_path(seg_path: str) -> None:
    ringcast.Segment.create(seg_path, max_sessions=4, session_bytes=64 * KiB)
    with pytest.raises((ringcast.SegmentError, FileExistsError)):
        ringcast.Segment.create(seg_path, max_sessions=4, session_bytes=64 * KiB)


def test_open_missing_file_is_segment_error(seg_path: str) -> None:
    with pytest.raises(ringcast.SegmentError):
        ringcast.Segment.open(seg_path)


@pytest.mark.parametrize("bad", [{"max_sessions": 0}, {"session_bytes": 0}, {"max_id_len": 0}])
def test_zero_sizes_are_invalid(seg_path: str, bad: dict[str, int]) -> None:
    sizes = {"max_sessions": 4, "session_bytes": 64 * KiB, "max_id_len": 256} | bad
    with pytest.raises(ringcast.InvalidArgument):
        ringcast.Segment.create(seg_path, **sizes)
    assert not os.path.exists(seg_path)


def test_open_shares_sessions_with_the_creator(seg: ringcast.Segment) -> None:
    other = ringcast.Segment.open(seg.path)
    assert other.epoch == seg.epoch
    assert (other.max_sessions, other.session_bytes, other.max_id_len) == (
        seg.max_sessions,
        seg.session_bytes,
        seg.max_id_len,
    )
    w = seg.create_or_replace("c")
    w.write(b"hello")
    assert other.reader("c").read_nowait() == b"hello"
    info = other.get("c")
    assert info is not None and info.total_bytes == 5


def test_open_or_create(seg_path: str) -> None:
    a = ringcast.Segment.open_or_create(seg_path, max_sessions=8, session_bytes=64 * KiB)
    b = ringcast.Segment.open_or_create(seg_path, max_sessions=8, session_bytes=64 * KiB)
    assert a.epoch == b.epoch
    with pytest.raises(ringcast.SegmentError):
        ringcast.Segment.open_or_create(seg_path, max_sessions=16, session_bytes=64 * KiB)
    assert ringcast.Segment.open(seg_path).epoch == a.epoch


def test_open_or_create_never_replaces_a_foreign_file(seg_path: str) -> None:
    junk = b"not a ringcast segment\n" * 1000
    with open(seg_path, "wb") as f:
        f.write(junk)
    with pytest.raises(ringcast.SegmentError):
        ringcast.Segment.open_or_create(seg_path, max_sessions=8, session_bytes=64 * KiB)
    with open(seg_path, "rb") as f:
        assert f.read() == junk


def test_close_makes_handles_raise_segment_error(seg: ringcast.Segment) -> None:
    w = seg.create_or_replace("c")
    w.write(b"abc")
    r = seg.reader("c")
    seg.close()
    with pytest.raises(ringcast.SegmentError):
        seg.stats()
    with pytest.raises(ringcast.SegmentError):
        r.read_nowait()
    with pytest.raises(ringcast.SegmentError):
        w.write(b"more")
    with pytest.raises(ringcast.SegmentError):
        seg.create_or_replace("d")


def test_unlink_removes_the_file_but_keeps_the_mapping(seg: ringcast.Segment) -> None:
    w = seg.create_or_replace("c")
    seg.unlink()
    assert not os.path.exists(seg.path)
    w.write(b"still here")
    assert seg.reader("c").read_nowait() == b"still here"


# --- ids, owners, registry ------------------------------------------------------------------


def test_invalid_ids(seg: ringcast.Segment) -> None:
    with pytest.raises(ringcast.InvalidArgument):
        seg.create_or_replace("")
    with pytest.raises(ValueError):
        seg.create_or_replace("x" * (seg.max_id_len + 1))
    w = seg.create_or_replace("x" * seg.max_id_len)
    assert w.conversation_id == "x" * seg.max_id_len


def test_llama_server_style_ids_are_accepted(seg: ringcast.Segment) -> None:
    conv = "conv-1::ggml-org/tinygemma3-GGUF:Q8_0"
    w = seg.create_or_replace(conv, "key-1")
    w.write(b"x")
    info = seg.get(conv, "key-1")
    assert info is not None
    assert (info.conversation_id, info.owner) == (conv, "key-1")


def test_sessions_are_keyed_by_owner_and_id(seg: ringcast.Segment) -> None:
    wa = seg.create_or_replace("c", "alice")
    wb = seg.create_or_replace("c", "bob")
    wa.write(b"alice's")
    wb.write(b"bob's")
    assert not wa.cancelled and not wb.cancelled
    assert seg.reader("c", 0, "alice").read_nowait() == b"alice's"
    assert seg.reader("c", 0, "bob").read_nowait() == b"bob's"
    assert seg.get("c") is None
    with pytest.raises(ringcast.SessionNotFound):
        seg.reader("c", 0, "mallory")
    assert {i.owner for i in seg.list()} == {"alice", "bob"}
    assert [i.owner for i in seg.list("alice")] == ["alice"]
    assert seg.list("mallory") == []
    assert not seg.evict("c", "mallory")
    assert seg.evict("c", "alice")
    assert seg.get("c", "bob") is not None


def test_session_not_found_is_a_key_error(seg: ringcast.Segment) -> None:
    with pytest.raises(KeyError):
        seg.reader("nope")
    assert seg.get("nope") is None
    assert not seg.evict("nope")
    assert not seg.evict_and_cancel("nope")


def test_registry_full_then_evict_frees_a_slot(seg_path: str) -> None:
    s = ringcast.Segment.create(seg_path, max_sessions=4, session_bytes=64 * KiB)
    writers = [s.create_or_replace(f"c{i}") for i in range(4)]
    with pytest.raises(ringcast.RegistryFull):
        s.create_or_replace("c4")
    # Replacing a live id needs no new slot.
    writers[0] = s.create_or_replace("c0")
    assert s.stats().sessions_used == 4
    assert s.evict("c1")
    assert s.stats().sessions_used == 3
    w = s.create_or_replace("c4")
    assert w.write(b"ok")


def test_evict_slot_checks_the_generation(seg: ringcast.Segment) -> None:
    w1 = seg.create_or_replace("c")
    w2 = seg.create_or_replace("c")
    assert w2.slot != w1.slot or w2.generation != w1.generation
    assert not seg.evict_slot(w1.slot, w1.generation)
    assert seg.get("c") is not None
    assert seg.evict_slot(w2.slot, w2.generation)
    assert seg.get("c") is None
    assert w2.cancelled
    assert not seg.evict_slot(w2.slot, w2.generation)


def test_silent_among_names_the_running_writers_without_progress_for_that_long(
    seg: ringcast.Segment,
) -> None:
    ws = [seg.create_or_replace(f"c{i}") for i in range(4)]
    time.sleep(0.06)
    assert ws[0].write(b"data: progress\n\n")
    assert ws[1].write(b": ping\n\n", progress=False)  # not progress: still silent
    assert ws[2].finalize()  # finished: nothing to keep alive
    assert ringcast.Writer.silent_among(ws, 0.05) == [1, 3]
    assert ringcast.Writer.silent_among(ws, 0) == [0, 1, 3]
    assert ringcast.Writer.silent_among(ws, 3600) == []
    seg.evict_and_cancel("c3")
    assert ringcast.Writer.silent_among(ws, 0.05) == [1]
    assert ringcast.Writer.silent_among([], 1.0) == []
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite number"):
            ringcast.Writer.silent_among(ws, bad)


def test_cancelled_among_names_the_writers_whose_session_ended_under_them(
    seg: ringcast.Segment,
) -> None:
    ws = [seg.create_or_replace(f"c{i}") for i in range(6)]
    assert ringcast.Writer.cancelled_among(ws) == []
    seg.evict_and_cancel("c1")  # cancelled
    seg.create_or_replace("c3")  # replaced
    seg.evict("c4")  # evicted
    assert ws[5].finalize()  # finished by its own producer: not cancelled
    assert ringcast.Writer.cancelled_among(ws) == [1, 3, 4]
    assert ringcast.Writer.cancelled_among(ws) == [i for i, w in enumerate(ws) if w.cancelled]
    assert ringcast.Writer.cancelled_among([]) == []
    with pytest.raises(TypeError):
        ringcast.Writer.cancelled_among([ws[0], "not a writer"])  # type: ignore[list-item]


def test_adopt_needs_the_right_generation(seg: ringcast.Segment) -> None:
    w = seg.create_or_replace("c", "o")
    with pytest.raises((ringcast.SessionEnded, ringcast.SessionNotFound)):
        seg.adopt("c", "o", w.generation + 1)
    with pytest.raises(ringcast.SessionNotFound):
        seg.adopt("other", "o", w.generation)
    adopted = seg.adopt("c", "o", w.generation)
    assert (adopted.slot, adopted.generation) == (w.slot, w.generation)
    assert adopted.write(b"from the adopter")
    assert seg.reader("c", 0, "o").read_nowait() == b"from the adopter"
    seg.create_or_replace("c", "o")  # a newer generation: the old one can no longer be adopted
    with pytest.raises((ringcast.SessionEnded, ringcast.SessionNotFound)):
        seg.adopt("c", "o", w.generation)


def test_take_over_dead_refuses_a_live_producer(seg: ringcast.Segment) -> None:
    seg.create_or_replace("c")
    info = seg.get("c")
    assert info is not None
    assert info.producer_pid == os.getpid()
    assert info.producer_alive
    assert seg.take_over_dead("c") is None


# --- writing and reading --------------------------------------------------------------------


def test_write_read_roundtrip_and_offsets(seg: ringcast.Segment) -> None:
    w = seg.create_or_replace("c")
    assert w.write(b"data: one\n\n")
    assert w.write(memoryview(b"data: two\n\n"))
    assert w.write(bytearray(b""))
    assert w.total_bytes == 22
    r = seg.reader("c")
    assert r.offset == 0
    assert r.read(4) == b"data"
    assert r.offset == 4
    assert r.read_nowait() == b": one\n\ndata: two\n\n"
    assert r.offset == 22
    assert r.read_nowait() is None
    assert not r.ready()
    assert r.read(timeout=0.01) == b""
    assert not r.at_end
    mid = seg.reader("c", 17)
    assert mid.read_nowait() == b"two\n\n"
    assert w.finalize()
    assert r.ready()
    assert r.read_nowait() == b""
    assert r.at_end
    assert r.read(timeout=None) == b""


def test_reader_beyond_the_end_waits_for_its_offset(seg: ringcast.Segment) -> None:
    w = seg.create_or_replace("c")
    w.write(b"0123456789")
    r = seg.reader("c", 15)
    assert r.read_nowait() is None
    w.write(b"abcde")
    assert r.read_nowait() is None
    w.write(b"fghij")
    assert r.read_nowait() == b"fghij"


def test_reader_blocked_in_read_wakes_on_write(seg: ringcast.Segment) -> None:
    w = seg.create_or_replace("c")
    r = seg.reader("c")
    got: list[bytes] = []
    t = threading.Thread(target=lambda: got.append(r.read(100, timeout=None)))
    t.start()
    w.write(b"wake up")
    t.join(30)
    assert not t.is_alive()
    assert got == [b"wake up"]


def test_finalize(seg: ringcast.Segment) -> None:
    w = seg.create_or_replace("c")
    w.write(b"abc")
    with pytest.raises(ValueError):
        w.finalize("bogus")
    assert w.finalize("done")
    assert not w.finalize("done")
    assert not w.finalize("failed")
    assert not w.write(b"late")
    assert w.total_bytes == 3
    info = seg.get("c")
    assert info is not None
    assert info.state == "done" and info.is_done
    r = seg.reader("c")
    assert r.read_nowait() == b"abc"
    assert r.read_nowait() == b""
    assert r.at_end


def test_finalize_failed_keeps_the_bytes_readable(seg: ringcast.Segment) -> None:
    w = seg.create_or_replace("c")
    w.write(b"partial")
    assert w.finalize("failed")
    info = seg.get("c")
    assert info is not None
    assert info.state == "failed" and info.is_done
    r = seg.reader("c")
    assert r.read_nowait() == b"partial"
    # The end of a failed stream is either an empty read at the end or SessionEnded("failed").
    try:
        tail = r.read_nowait()
    except ringcast.SessionEnded as exc:
        assert exc.reason == "failed"
    else:
        assert tail == b""
        assert r.at_end


def test_read_into_fills_writable_buffers(seg: ringcast.Segment) -> None:
    w = seg.create_or_replace("c")
    w.write(b"hello, world")
    r = seg.reader("c")
    buf = bytearray(5)
    assert r.read_into(buf) == 5
    assert buf == b"hello"
    big = bytearray(b"#" * 16)
    view = memoryview(big)[4:12]
    assert r.read_into(view) == 7
    assert big == b"####, world#####"
    assert r.offset == 12
    assert r.read_into(bytearray(4), timeout=0.01) == 0
    with pytest.raises((TypeError, BufferError, ValueError)):
        r.read_into(b"read-only bytes")


def test_large_writes_wrap_the_ring(seg: ringcast.Segment) -> None:
    cap = seg.session_bytes
    w = seg.create_or_replace("c")
    r = seg.reader("c")
    off = 0
    for n in (cap // 3, cap - 1, 1, cap, 7):
        # Write at most one ring's worth ahead of the reader, then read it all back.
        assert w.write(pattern_at(off, n))
        off += n
        got = bytearray()
        while r.offset < off:
            got += r.read_nowait(cap) or b""
        assert bytes(got) == pattern_at(off - n, n)
    assert w.total_bytes == off


def test_write_larger_than_the_ring_keeps_its_tail(seg: ringcast.Segment) -> None:
    cap = seg.session_bytes
    w = seg.create_or_replace("c")
    assert w.write(pattern_at(0, 3 * cap + 5))
    info = seg.get("c")
    assert info is not None
    assert info.total_bytes == 3 * cap + 5
    assert info.first_available == 2 * cap + 5
    r = seg.reader("c", info.first_available)
    got = bytearray()
    while len(got) < cap:
        got += r.read_nowait(cap) or b""
    assert bytes(got) == pattern_at(2 * cap + 5, cap)


# --- offset lost ----------------------------------------------------------------------------


def test_offset_lost_at_attach(seg: ringcast.Segment) -> None:
    cap = seg.session_bytes
    w = seg.create_or_replace("c")
    w.write(pattern_at(0, cap + 1000))
    with pytest.raises(ringcast.OffsetLost) as ei:
        seg.reader("c", 999)
    assert ei.value.first_available == 1000
    assert ei.value.requested == 999
    info = seg.get("c")
    assert info is not None and info.first_available == 1000
    r = seg.reader("c", 1000)
    assert r.read_nowait(10) == pattern_at(1000, 10)


def test_offset_lost_mid_stream_for_a_slow_reader(seg: ringcast.Segment) -> None:
    cap = seg.session_bytes
    w = seg.create_or_replace("c")
    w.write(pattern_at(0, 100))
    slow = seg.reader("c")
    assert slow.read_nowait(10) == pattern_at(0, 10)
    w.write(pattern_at(100, cap))
    with pytest.raises(ringcast.OffsetLost) as ei:
        slow.read_nowait()
    assert ei.value.requested == 10
    assert ei.value.first_available == 100
    with pytest.raises(ringcast.OffsetLost):
        slow.read(timeout=0.01)
    with pytest.raises(ringcast.OffsetLost):
        slow.read_into(bytearray(10))


def test_a_reader_at_the_end_survives_one_full_ring(seg: ringcast.Segment) -> None:
    """A reader at the exact end is never lost by a write, however big."""
    cap = seg.session_bytes
    w = seg.create_or_replace("c")
    w.write(pattern_at(0, 100))
    r = seg.reader("c", 100)
    w.write(pattern_at(100, cap))
    assert r.read_nowait(cap) == pattern_at(100, cap)
    w.write(pattern_at(100 + cap, cap + 1))
    with pytest.raises(ringcast.OffsetLost) as ei:
        r.read_nowait()
    assert ei.value.first_available == 101 + cap


# --- ends: replaced, evicted, cancelled -----------------------------------------------------


@pytest.mark.parametrize("how", ["replaced", "evicted", "cancelled"])
def test_session_ended_reasons(seg: ringcast.Segment, how: str) -> None:
    w = seg.create_or_replace("c", "o")
    w.write(b"abc")
    idle = seg.reader("c", 0, "o")
    blocked = seg.reader("c", 3, "o")
    outcome: list[object] = []

    def block() -> None:
        try:
            outcome.append(blocked.read(timeout=None))
        except ringcast.SessionEnded as exc:
            outcome.append(exc.reason)

    t = threading.Thread(target=block)
    t.start()
    if how == "replaced":
        w2 = seg.create_or_replace("c", "o")
        assert w2.generation != w.generation or w2.slot != w.slot
    elif how == "evicted":
        assert seg.evict("c", "o")
    else:
        assert seg.evict_and_cancel("c", "o")
    t.join(30)
    assert not t.is_alive()
    assert outcome == [how]
    with pytest.raises(ringcast.SessionEnded) as ei:
        idle.read_nowait()
    assert ei.value.reason == how
    assert idle.state() == how
    assert w.cancelled
    assert not w.write(b"more")
    assert w.wait_cancelled(0)


def test_wait_cancelled(seg: ringcast.Segment) -> None:
    w = seg.create_or_replace("c")
    assert not w.cancelled
    assert not w.wait_cancelled(0.01)
    woke: list[bool] = []
    t = threading.Thread(target=lambda: woke.append(w.wait_cancelled(None)))
    t.start()
    assert seg.evict_and_cancel("c")
    t.join(30)
    assert not t.is_alive()
    assert woke == [True]
    assert w.cancelled


def test_finalize_is_not_a_cancellation(seg: ringcast.Segment) -> None:
    w = seg.create_or_replace("c")
    w.finalize()
    assert not w.cancelled
    assert not w.wait_cancelled(0.01)


# --- registry views: get / list / lookup_prefix / stats -------------------------------------


def test_get_reports_progress_state_readers_and_times(seg: ringcast.Segment) -> None:
    cap = seg.session_bytes
    t0 = time.time()
    w = seg.create_or_replace("c", "o")
    t1 = time.time()
    info = seg.get("c", "o")
    assert info is not None
    assert (info.conversation_id, info.owner, info.state) == ("c", "o", "running")
    assert not info.is_done
    assert (info.total_bytes, info.first_available, info.readers) == (0, 0, 0)
    assert (info.slot, info.generation) == (w.slot, w.generation)
    # Allow a second of slack for a coarse clock; this checks the epoch of the value, not speed.
    assert t0 - 1 <= info.started_at <= t1 + 1
    assert info.completed_at == 0.0
    assert info.started_at - 1 <= info.last_write_at <= t1 + 1

    w.write(pattern_at(0, cap + 10))
    readers = [seg.reader("c", cap, "o") for _ in range(3)]
    info = seg.get("c", "o")
    assert info is not None
    assert (info.total_bytes, info.first_available, info.readers) == (cap + 10, 10, 3)
    assert info.last_write_at >= info.started_at
    readers[0].close()
    readers[0].close()  # idempotent
    info = seg.get("c", "o")
    assert info is not None and info.readers == 2

    t2 = time.time()
    w.finalize()
    t3 = time.time()
    info = seg.get("c", "o")
    assert info is not None
    assert info.state == "done" and info.is_done
    assert t2 - 1 <= info.completed_at <= t3 + 1
    assert info.completed_at >= info.started_at


def test_list_and_stats_follow_creations_and_evictions(seg: ringcast.Segment) -> None:
    ws = {f"c{i}": seg.create_or_replace(f"c{i}", "o") for i in range(5)}
    for i, w in enumerate(ws.values()):
        w.write(b"x" * (100 * i))
    ws["c3"].finalize()
    st = seg.stats()
    assert st.sessions_used == 5
    assert st.bytes_buffered == sum(100 * i for i in range(5))
    by_id = {i.conversation_id: i for i in seg.list()}
    assert set(by_id) == set(ws)
    assert by_id["c2"].total_bytes == 200
    assert by_id["c3"].state == "done"
    assert by_id["c4"].state == "running"
    assert len({(i.slot, i.generation) for i in by_id.values()}) == 5
    seg.evict("c4", "o")
    st = seg.stats()
    assert st.sessions_used == 4
    assert st.bytes_buffered == 600
    assert "c4" not in {i.conversation_id for i in seg.list()}


def test_list_by_shard_splits_the_sessions_by_slot(seg: ringcast.Segment) -> None:
    for i in range(10):
        seg.create_or_replace(f"c{i}", "o" if i % 2 else "p")
    seg.create_or_replace("c0", "p")  # replaced: a new generation, maybe another slot
    every = {(i.slot, i.generation) for i in seg.list()}
    shares = [seg.list(shard=(k, 3)) for k in range(3)]
    assert all(i.slot % 3 == k for k, share in enumerate(shares) for i in share)
    got = [(i.slot, i.generation) for share in shares for i in share]
    assert sorted(got) == sorted(every) and len(every) == 10
    assert {i.conversation_id for i in seg.list(shard=(0, 1))} == {f"c{i}" for i in range(10)}
    for bad in ((3, 3), (0, 0)):
        with pytest.raises(ValueError, match="below the count"):
            seg.list(shard=bad)
    with pytest.raises(ValueError, match="owner or shard"):
        seg.list("o", shard=(0, 2))


def test_list_by_owner_prefix_scans_for_those_owners_only(seg: ringcast.Segment) -> None:
    for i, owner in enumerate(["ds:alice", "ds:bob", "alice", "d", "ds:"]):
        seg.create_or_replace(f"c{i}", owner)
    got = seg.list(owner_prefix="ds:")
    assert [(i.conversation_id, i.owner) for i in got] == [
        ("c0", "ds:alice"),
        ("c1", "ds:bob"),
        ("c4", "ds:"),
    ]  # oldest first, as list
    assert {i.owner for i in seg.list(owner_prefix="")} == {
        "ds:alice",
        "ds:bob",
        "alice",
        "d",
        "ds:",
    }
    assert seg.list(owner_prefix="nobody") == []
    with pytest.raises(ValueError, match="owner_prefix alone"):
        seg.list("alice", owner_prefix="ds:")
    with pytest.raises(ValueError, match="owner_prefix alone"):
        seg.list(shard=(0, 2), owner_prefix="ds:")


def test_expiry_candidates_are_the_finished_past_ttl_and_the_idle_running(
    seg: ringcast.Segment,
) -> None:
    done = seg.create_or_replace("done", "o")
    assert done.write(b"x") and done.finalize()
    skipped = seg.create_or_replace("durable", "ds:o")
    assert skipped.finalize()
    running = seg.create_or_replace("running", "o")
    assert running.write(b"y")
    # Finished at least 0 s ago: every finished one, but not the skipped owner's.
    assert [i.conversation_id for i in seg.expiry_candidates(0, 0, "ds:")] == ["done"]
    assert {i.conversation_id for i in seg.expiry_candidates(0, 0)} == {"done", "durable"}
    assert seg.expiry_candidates(3600, 0, "ds:") == []  # not an hour old yet
    time.sleep(0.05)
    # Idle for 10 ms: the running one too; an idle timeout of 0 never picks one.
    idle = seg.expiry_candidates(3600, 0.01, "ds:")
    assert [(i.conversation_id, i.state) for i in idle] == [("running", "running")]
    # Any idle timeout above 0 is one, however small; 0 alone is none.
    assert [i.conversation_id for i in seg.expiry_candidates(3600, 1e-12, "ds:")] == ["running"]
    assert running.write(b"z")
    assert seg.expiry_candidates(3600, 1.0, "ds:") == []
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite number of seconds"):
            seg.expiry_candidates(bad, 0)
        with pytest.raises(ValueError, match="finite number of seconds"):
            seg.expiry_candidates(0, bad)


def test_sweep_candidates_are_the_anonymous_and_the_dead_producers(
    seg: ringcast.Segment, seg_path: str
) -> None:
    seg.create_or_replace("alive", "o")  # produced by this process, which runs
    seg.create_or_replace("anon-1", "anon").finalize()
    seg.create_or_replace("ds-1", "ds:o")
    # A producer that dies without finishing: a child process that creates and exits.
    code = (
        "import sys, os, ringcast\n"
        "seg = ringcast.Segment.open(sys.argv[1])\n"
        "w = seg.create_or_replace('orphan', 'o')\n"
        "w.write(b'x')\n"
        "os._exit(0)\n"
    )
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", code, seg_path], check=True, timeout=60)
    got = seg.sweep_candidates("anon", "ds:")
    assert sorted((i.conversation_id, i.producer_alive) for i in got) == [
        ("anon-1", True),
        ("orphan", False),
    ]
    # With no prefix to skip, the durable one is looked at too, but it runs with a live
    # producer (this process) and is not anonymous: still not a candidate.
    assert sorted(i.conversation_id for i in seg.sweep_candidates("anon", "")) == [
        "anon-1",
        "orphan",
    ]


def test_lookup_prefix_follows_the_llama_server_rule(seg: ringcast.Segment) -> None:
    for conv in [
        "conv-1",
        "conv-1::ggml-org/tinygemma3-GGUF:Q8_0",
        "conv-1::m2",
        "conv-10",
        "conv-1:x",
        "conv-1:",
        "xconv-1::m",
    ]:
        seg.create_or_replace(conv, "o")
    seg.create_or_replace("conv-1::other-owner", "p")
    got = sorted(i.conversation_id for i in seg.lookup_prefix("conv-1", "o"))
    assert got == ["conv-1", "conv-1::ggml-org/tinygemma3-GGUF:Q8_0", "conv-1::m2"]
    assert [i.conversation_id for i in seg.lookup_prefix("conv-1", "p")] == ["conv-1::other-owner"]
    assert seg.lookup_prefix("nothing", "o") == []
    seg.evict("conv-1", "o")
    got = sorted(i.conversation_id for i in seg.lookup_prefix("conv-1", "o"))
    assert got == ["conv-1::ggml-org/tinygemma3-GGUF:Q8_0", "conv-1::m2"]


# --- memory follows bytes -------------------------------------------------------------------


def _allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def test_memory_follows_the_bytes_written(seg_path: str) -> None:
    s = ringcast.Segment.create(seg_path, max_sessions=1000, session_bytes=4 * MiB)
    st = s.stats()
    assert st.file_bytes >= 1000 * 4 * MiB
    writers = [s.create_or_replace(f"c{i}") for i in range(20)]
    for w in writers:
        w.write(b"data: a little\n\n" * 10)
    st = s.stats()
    # 20 sessions holding 170 bytes each: a few pages per session plus the registry, not GiBs.
    assert st.resident_bytes < 32 * MiB, st.resident_bytes
    assert st.resident_bytes <= st.file_bytes // 100
    assert abs(st.resident_bytes - _allocated(seg_path)) <= 4 * MiB

    big = s.create_or_replace("big")
    for k in range(8):
        big.write(pattern_at(k * MiB, MiB))
    full = s.stats().resident_bytes
    assert full >= st.resident_bytes + 3 * MiB
    assert s.evict("big")
    after = s.stats().resident_bytes
    assert after <= full - 3 * MiB, (full, after)
    assert _allocated(seg_path) <= full - 3 * MiB


def test_handles_of_a_reused_slot_never_touch_the_new_session(seg_path: str) -> None:
    s = ringcast.Segment.create(seg_path, max_sessions=1, session_bytes=64 * KiB)
    wa = s.create_or_replace("a")
    wa.write(b"aaa")
    ra = s.reader("a", 1)
    assert s.evict("a")
    wb = s.create_or_replace("b")  # the only slot, reused
    assert wb.slot == wa.slot
    wb.write(b"bbbbbb")
    assert not wa.write(b"stale writer")
    assert not wa.finalize()
    with pytest.raises(ringcast.SessionEnded) as ei:
        ra.read_nowait()
    assert ei.value.reason == "evicted"
    with pytest.raises(ringcast.SessionEnded):
        ra.read_into(bytearray(10), timeout=0)
    info = s.get("b")
    assert info is not None
    assert (info.total_bytes, info.state, info.readers) == (6, "running", 0)
    assert s.reader("b").read_nowait() == b"bbbbbb"
    assert not s.evict_slot(wa.slot, wa.generation)
    assert s.get("b") is not None


def test_ring_keeps_exactly_session_bytes_even_off_page(seg_path: str) -> None:
    s = ringcast.Segment.create(seg_path, max_sessions=2, session_bytes=1000)
    assert s.session_bytes == 1000
    w = s.create_or_replace("c")
    w.write(pattern_at(0, 1500))
    info = s.get("c")
    assert info is not None
    assert (info.total_bytes, info.first_available) == (1500, 500)
    assert s.stats().bytes_buffered == 1000
    with pytest.raises(ringcast.OffsetLost) as ei:
        s.reader("c", 499)
    assert ei.value.first_available == 500
    assert s.reader("c", 500).read_nowait() == pattern_at(500, 1000)


def test_unicode_ids_and_owners_round_trip(seg: ringcast.Segment) -> None:
    conv, owner = "конв-1::модель/Q8_0", "ключ-🔑"
    w = seg.create_or_replace(conv, owner)
    w.write(b"x")
    assert [(i.conversation_id, i.owner) for i in seg.lookup_prefix("конв-1", owner)] == [
        (conv, owner)
    ]
    # Limits count UTF-8 bytes: 2 bytes per character here.
    with pytest.raises(ringcast.InvalidArgument):
        seg.create_or_replace("é" * (seg.max_id_len // 2 + 1))
    seg.create_or_replace("é" * (seg.max_id_len // 2))


def test_owner_length_is_bounded(seg: ringcast.Segment) -> None:
    with pytest.raises(ringcast.InvalidArgument):
        seg.create_or_replace("c", "o" * 10_000)
    assert seg.list() == []


def test_zero_max_bytes_is_refused_not_an_empty_read(seg: ringcast.Segment) -> None:
    seg.create_or_replace("c").write(b"abc")
    r = seg.reader("c")
    for call in (lambda: r.read(0), lambda: r.read_nowait(0)):
        with pytest.raises(ValueError):
            call()
    assert r.offset == 0


def test_reader_beyond_the_end_of_a_finished_stream_is_at_end(seg: ringcast.Segment) -> None:
    w = seg.create_or_replace("c")
    w.write(b"0123456789")
    w.finalize()
    r = seg.reader("c", 50)
    assert r.read_nowait() == b""
    assert r.at_end
    assert r.read(timeout=None) == b""
    assert r.epoch == seg.epoch


def test_notifier_reports_the_slots_that_advanced(seg: ringcast.Segment) -> None:
    import select

    w1, w2 = seg.create_or_replace("a"), seg.create_or_replace("b")
    n = seg.notifier()
    assert seg.notifier().fileno() == n.fileno()  # one per segment handle
    with pytest.raises(ringcast.InvalidArgument):
        n.subscribe(seg.max_sessions + 5, 1)
    n.subscribe(w1.slot, w1.generation)
    n.subscribe(w2.slot, w2.generation)
    w2.write(b"x")
    readable, _, _ = select.select([n.fileno()], [], [], 30)
    assert readable
    assert n.drain() == [w2.slot]
    assert n.drain() == []
    # The datagram disarmed the notifier: until it is re-armed, producers send nothing ...
    w2.write(b"y")
    assert select.select([n.fileno()], [], [], 0.2)[0] == []
    # ... and re-arming says so, so that the caller scans what came meanwhile.
    assert n.arm() is True
    assert n.arm(yield_first=True) is False  # already armed
    assert n.drain() == [w2.slot]
    seg.evict("a")  # an end is an advance too
    readable, _, _ = select.select([n.fileno()], [], [], 30)
    assert readable
    assert n.drain() == [w1.slot]
    assert n.arm(yield_first=True) is True
    n.unsubscribe(w1.slot, w1.generation)
    n.unsubscribe(w2.slot, w2.generation)


def test_a_scan_takes_at_most_one_datagram_and_a_datagram_after_an_arm_stays(
    seg: ringcast.Segment,
) -> None:
    """``scan(take_one=True)`` takes the datagram a readiness callback was woken by, and no
    more; a plain ``scan()`` takes none, so a publish right after an ``arm()`` leaves the
    socket readable, whatever scan follows (what lets ``_aio`` arm once, not until armed)."""
    import select

    w = seg.create_or_replace("a")
    n = seg.notifier()
    n.subscribe(w.slot, w.generation)
    w.write(b"x")
    assert select.select([n.fileno()], [], [], 30)[0]
    assert n.scan() == [w.slot]
    assert select.select([n.fileno()], [], [], 0)[0], "the datagram is still there"
    assert n.scan(take_one=True) == []
    assert select.select([n.fileno()], [], [], 0)[0] == []
    # Two datagrams (an arm, a publish, another arm, another publish): one taken per call.
    assert n.arm() is True
    w.write(b"y")
    assert n.arm() is True
    w.write(b"z")
    assert n.scan(take_one=True) == [w.slot]
    assert select.select([n.fileno()], [], [], 0)[0], "the second datagram keeps it readable"
    assert n.scan(take_one=True) == []
    assert select.select([n.fileno()], [], [], 0)[0] == []
    assert n.scan(take_one=True) == []  # an empty socket: nothing to take, no error
    # A publish right after an arm: its datagram outlives the scan that follows the arm.
    assert n.arm() is True
    w.write(b"after the arm")
    assert n.scan() == [w.slot]
    assert select.select([n.fileno()], [], [], 0)[0]
    n.unsubscribe(w.slot, w.generation)


def test_dead_producers_reads_each_producer_once_and_answers_per_reader(
    seg: ringcast.Segment,
) -> None:
    """``Reader.dead_producers`` answers what ``dead_producer`` answers, reader by reader (a
    live producer: None; a closed reader: None)."""
    ws = [seg.create_or_replace(f"p{i}") for i in range(5)]
    rs = [seg.reader(f"p{i}") for i in range(5)]
    rs[3].close()
    assert ringcast.Reader.dead_producers(rs) == [None] * 5
    assert ringcast.Reader.dead_producers([]) == []
    assert [r.dead_producer() for i, r in enumerate(rs) if i != 3] == [None] * 4
    del ws


def test_non_contiguous_buffers_are_refused_without_side_effects(seg: ringcast.Segment) -> None:
    w = seg.create_or_replace("c")
    with pytest.raises((ValueError, BufferError, TypeError)):
        w.write(memoryview(b"abcdef")[::2])
    with pytest.raises(TypeError):
        w.write("text")  # type: ignore[arg-type]
    assert w.total_bytes == 0
    w.write(b"0123456789")
    r = seg.reader("c")
    target = bytearray(b"." * 10)
    with pytest.raises((ValueError, BufferError, TypeError)):
        r.read_into(memoryview(target)[::2])
    assert target == b"." * 10
    assert r.offset == 0
    assert r.read_nowait() == b"0123456789"


def test_an_uncounted_reader_reads_but_is_not_listed(seg: ringcast.Segment) -> None:
    """``counted=False`` (an HTTP process's fan-out reader) reads like any reader but stays out
    of ``SessionInfo.readers``, also after it closes."""
    w = seg.create_or_replace("fan")
    w.write(b"data: x\n\n")
    counted = seg.reader("fan")
    pump = seg.reader("fan", counted=False)
    info = seg.get("fan")
    assert info is not None and info.readers == 1
    assert pump.read_nowait() == counted.read_nowait() == b"data: x\n\n"
    pump.close()
    info = seg.get("fan")
    assert info is not None and info.readers == 1
    counted.close()
    info = seg.get("fan")
    assert info is not None and info.readers == 0
