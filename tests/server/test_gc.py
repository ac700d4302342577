"""The manager's collection (``ringcast.server.gc.collect``) on a real segment and Durable
Streams database: what it evicts, and that it never lists every session (a segment holds up
to a hundred thousand finished ones: the candidates are chosen in Rust)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ringcast import Segment
from ringcast.server import gc
from ringcast.server.config import ServeConfig
from ringcast.server.counters import SharedCounters, counter_rows
from ringcast.server.durable_meta import DurableMeta, StreamMeta, durable_owner


class CountedLists:
    """The segment, with its listings counted (the rest passed through)."""

    def __init__(self, seg: Segment) -> None:
        self.seg = seg
        self.lists_of_all = 0
        self.prefixed: list[str] = []
        self.expiry_scans = 0

    def list(self, owner: str | None = None, *, owner_prefix: str | None = None) -> Any:
        if owner_prefix is not None:
            self.prefixed.append(owner_prefix)
        elif owner is None:
            self.lists_of_all += 1
        return self.seg.list(owner, owner_prefix=owner_prefix)

    def expiry_candidates(self, *args: Any) -> Any:
        self.expiry_scans += 1
        return self.seg.expiry_candidates(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.seg, name)


def test_ttl_and_durable_expiry_without_a_listing_of_every_session(tmp_path: Path) -> None:
    cfg = ServeConfig(segment=str(tmp_path / "seg"), run_dir=str(tmp_path), ttl=0)
    seg = Segment.create(cfg.segment, max_sessions=16, session_bytes=4096)
    counters = SharedCounters(str(tmp_path / "counters"), counter_rows(cfg), create=True)
    counters.bind_row(0)
    meta = DurableMeta(str(tmp_path / "meta.sqlite"), seg.epoch)
    try:
        seg.create_or_replace("done", "k").finalize("done")
        seg.create_or_replace("running", "k")
        downer = durable_owner("k")
        seg.create_or_replace("old", downer)
        seg.create_or_replace("fresh", downer)
        for name, ttl in (("old", 1), ("fresh", 3600)):
            info = seg.get(name, downer)
            assert info is not None
            meta.put(
                StreamMeta(
                    *(downer, name, info.slot, info.generation, "text/plain", ttl, None, None),
                    *(time.time() - 10, None, None, None, False, 0, None),
                )
            )
        counted = CountedLists(seg)
        gc.collect(counted, cfg, counters, meta)  # type: ignore[arg-type]
        assert counted.lists_of_all == 0
        assert counted.prefixed == ["ds:"] and counted.expiry_scans == 1
        left = sorted((i.owner, i.conversation_id) for i in seg.list())
        assert left == [(downer, "fresh"), ("k", "running")]
        assert [m.name for m in meta.all_streams()] == ["fresh"]
    finally:
        meta.close()
        seg.unlink()


class StaleScan:
    """The segment, with an expiry scan that answers what a scan racing a change of the
    slots could: every session, whatever its state and age."""

    def __init__(self, seg: Segment) -> None:
        self.seg = seg

    def expiry_candidates(self, *args: Any) -> Any:
        return self.seg.list()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.seg, name)


def test_expiry_checks_each_candidate_again(tmp_path: Path) -> None:
    """A scan reads the slots without the registry lock: what it hands back is checked again
    on its snapshot, so a running session, a fresh finished one and a Durable Stream that a
    stale read let through are all left alone."""
    cfg = ServeConfig(segment=str(tmp_path / "seg"), run_dir=str(tmp_path), ttl=3600)
    seg = Segment.create(cfg.segment, max_sessions=16, session_bytes=4096)
    counters = SharedCounters(str(tmp_path / "counters"), counter_rows(cfg), create=True)
    counters.bind_row(0)
    try:
        seg.create_or_replace("running", "k").write(b"data: x\n\n")
        seg.create_or_replace("fresh", "k").finalize("done")
        seg.create_or_replace("stream", durable_owner("k"))
        gc.collect(StaleScan(seg), cfg, counters)  # type: ignore[arg-type]
        left = sorted(i.conversation_id for i in seg.list())
        assert left == ["fresh", "running", "stream"]
    finally:
        seg.unlink()


class ScanThenDelete:
    """The segment, with a dead-producer scan after which the first candidate is deleted:
    what a ``DELETE /v1/stream`` landing between the manager's scan (no registry lock) and
    its take-over does."""

    def __init__(self, seg: Segment) -> None:
        self.seg = seg

    def sweep_candidates(self, *args: Any) -> Any:
        found = self.seg.sweep_candidates(*args)
        assert found, "the scan found no candidate"
        assert self.seg.evict(found[0].conversation_id, found[0].owner)
        return found

    def __getattr__(self, name: str) -> Any:
        return getattr(self.seg, name)


def test_dead_producer_sweep_passes_over_a_stream_deleted_since_its_scan(tmp_path: Path) -> None:
    """Before, the take-over of the deleted candidate raised ``SessionNotFound`` out of the
    sweep, and out of the manager's loop."""
    path = str(tmp_path / "seg")
    seg = Segment.create(path, max_sessions=16, session_bytes=4096)
    try:
        # Two running streams whose producer exits (a worker killed mid-generation).
        made = subprocess.run(
            [sys.executable, "-c", _MAKE_ORPHANS, path], capture_output=True, text=True, timeout=60
        )
        assert made.returncode == 0, made.stderr
        assert [i.producer_alive for i in seg.list()] == [False, False]
        assert gc.sweep_dead_producers(ScanThenDelete(seg), time.time()) == 1  # type: ignore[arg-type]
        (left,) = seg.list()
        assert left.conversation_id == "second" and left.state == "failed"
        body = seg.reader("second", 0, "k").read_nowait()
        assert b"producer_died" in body, body
        # And the plain call for a stream that is gone says so.
        assert gc.fail_dead_producer(seg, "first", "k") is False
    finally:
        seg.unlink()


_MAKE_ORPHANS = """
import sys, time
from ringcast import Segment
seg = Segment.open(sys.argv[1])
for conv in ("first", "second"):
    seg.create_or_replace(conv, "k").write(b"data: x\\n\\n")
    time.sleep(0.001)  # distinct start times: the scan lists oldest first
"""
