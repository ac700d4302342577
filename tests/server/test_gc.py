"""The manager's collection (``ringcast.server.gc.collect``) on a real segment and Durable
Streams database: what it evicts, and that one listing of the segment serves it all."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ringcast import Segment
from ringcast.server import gc
from ringcast.server.config import ServeConfig
from ringcast.server.counters import SharedCounters, counter_rows
from ringcast.server.durable_meta import DurableMeta, StreamMeta, durable_owner


class CountedLists:
    """The segment, with its ``list`` calls counted (the rest passed through)."""

    def __init__(self, seg: Segment) -> None:
        self.seg = seg
        self.lists = 0

    def list(self, owner: str | None = None) -> Any:
        self.lists += 1
        return self.seg.list(owner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.seg, name)


def test_one_listing_serves_ttl_and_durable_expiry(tmp_path: Path) -> None:
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
        assert counted.lists == 1
        left = sorted((i.owner, i.conversation_id) for i in seg.list())
        assert left == [(downer, "fresh"), ("k", "running")]
        assert [m.name for m in meta.all_streams()] == ["fresh"]
    finally:
        meta.close()
        seg.unlink()
