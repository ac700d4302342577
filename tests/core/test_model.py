"""One session against a model: the whole byte history, of which the ring keeps the last
``session_bytes``. Appends of random sizes, readers attached at random offsets, reads of random
sizes; the model says which bytes must come back and when ``OffsetLost`` must be raised (with
which ``first_available``)."""

from __future__ import annotations

import contextlib
import os

import pytest
import ringcast
from children import scaled, shm_path
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
)

RING = 4096


class RingModel(RuleBasedStateMachine):
    readers = Bundle("readers")

    def __init__(self) -> None:
        super().__init__()
        self.path = shm_path("model")
        self.seg = ringcast.Segment.create(self.path, max_sessions=2, session_bytes=RING)
        self.cap = self.seg.session_bytes
        self.writer = self.seg.create_or_replace("model", "m")
        self.history = bytearray()
        self.done = False
        self.counter = 0
        # Live readers, for the readers-count invariant.
        self.attached: set[int] = set()

    @property
    def total(self) -> int:
        return len(self.history)

    @property
    def first_available(self) -> int:
        return max(0, self.total - self.cap)

    def _next_bytes(self, n: int) -> bytes:
        # Every byte distinct from its neighbours a ring apart: counter-based, period 251 (prime).
        out = bytes((self.counter + i) % 251 for i in range(n))
        self.counter += n
        return out

    @initialize()
    def start(self) -> None:
        assert self.writer.total_bytes == 0

    @precondition(lambda self: not self.done)
    @rule(n=st.one_of(st.integers(0, 64), st.integers(0, 2 * RING + 7)))
    def append(self, n: int) -> None:
        data = self._next_bytes(n)
        assert self.writer.write(data)
        self.history += data
        assert self.writer.total_bytes == self.total

    @precondition(lambda self: not self.done)
    @rule()
    def finalize(self) -> None:
        assert self.writer.finalize()
        self.done = True
        assert not self.writer.write(b"x")

    @rule(target=readers, where=st.integers(0, 3 * RING), past_end=st.integers(0, 20))
    def attach(self, where: int, past_end: int) -> ringcast.Reader:
        offset = min(where, self.total + past_end)
        if offset < self.first_available:
            with pytest.raises(ringcast.OffsetLost) as ei:
                self.seg.reader("model", offset, "m")
            assert (ei.value.requested, ei.value.first_available) == (offset, self.first_available)
            offset = self.first_available
        r = self.seg.reader("model", offset, "m")
        assert r.offset == offset
        self.attached.add(id(r))
        return r

    @rule(
        r=readers,
        max_bytes=st.one_of(st.integers(1, 16), st.integers(1, 3 * RING)),
        how=st.sampled_from(["read_nowait", "read", "read_into"]),
    )
    def read(self, r: ringcast.Reader, max_bytes: int, how: str) -> None:
        offset = r.offset
        if offset < self.first_available:
            with pytest.raises(ringcast.OffsetLost) as ei:
                self._do_read(r, max_bytes, how)
            assert (ei.value.requested, ei.value.first_available) == (offset, self.first_available)
            return
        got = self._do_read(r, max_bytes, how)
        expected = bytes(self.history[offset : offset + max_bytes])
        if expected:
            assert got == expected
        elif self.done and offset >= self.total:
            assert got == b""
            assert r.at_end
        else:
            # Nothing there yet: read_nowait says "would wait", the others time out empty.
            assert got is None if how == "read_nowait" else got == b""
            assert not r.at_end
        assert r.offset == offset + len(expected)

    def _do_read(self, r: ringcast.Reader, max_bytes: int, how: str) -> bytes | None:
        if how == "read_nowait":
            return r.read_nowait(max_bytes)
        if how == "read":
            return r.read(max_bytes, timeout=0)
        buf = bytearray(max_bytes)
        n = r.read_into(buf, timeout=0)
        return bytes(buf[:n])

    @rule(r=consumes(readers))
    def close(self, r: ringcast.Reader) -> None:
        r.close()
        self.attached.discard(id(r))

    @invariant()
    def registry_agrees(self) -> None:
        info = self.seg.get("model", "m")
        assert info is not None
        assert info.total_bytes == self.total
        assert info.first_available == self.first_available
        assert info.state == ("done" if self.done else "running")
        assert info.readers == len(self.attached)
        assert self.seg.stats().bytes_buffered == self.total - self.first_available

    def teardown(self) -> None:
        with contextlib.suppress(Exception):
            self.seg.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


RingModel.TestCase.settings = settings(
    max_examples=scaled(150, 10),
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestRingModel = pytest.mark.timeout(120)(RingModel.TestCase)
