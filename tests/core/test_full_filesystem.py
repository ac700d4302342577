"""A full shared-memory filesystem is an error for the one stream that needed more, never a
crash: on a real 2 MiB tmpfs, a segment many times its size is written until the filesystem is
full; each writer that finds it full gets ``SegmentError`` (nothing written), can still append
a short error event and finalize, and every process lives on (no ``SIGBUS``), while readers of
every session still read what was written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ringcast

pytestmark = pytest.mark.timeout(120)

KiB = 1024
MiB = 1024 * KiB
ERROR_EVENT = b'event: error\ndata: {"error": "out of shared memory"}\n\n'

# A producer in its own process: writes `total` bytes of its byte value in 16 KiB appends
# until done or refused for want of memory; then, if refused, the error event and a failed
# finalize. Prints what happened as JSON.
_FILLER = """
import json, sys, ringcast
path, conv, total = sys.argv[1], sys.argv[2], int(sys.argv[3])
seg = ringcast.Segment.open(path)
w = seg.create_or_replace(conv)
chunk = bytes([int(conv.rsplit("-", 1)[1])]) * (16 * 1024)
written, error = 0, None
while written < total:
    try:
        assert w.write(chunk)
    except ringcast.SegmentError as e:
        error = str(e)
        break
    written += len(chunk)
if error is not None:
    assert w.write(sys.argv[4].encode()), "the error event fits the reserve"
    assert w.finalize("failed")
else:
    assert w.finalize("done")
print(json.dumps({"written": written, "error": error}))
"""


def _read_all(seg: ringcast.Segment, conv: str) -> bytes:
    info = seg.get(conv)
    assert info is not None
    r = seg.reader(conv, info.first_available)
    out = b""
    while chunk := r.read(timeout=10):
        out += chunk
    assert r.at_end
    return out


def test_a_segment_without_room_for_one_full_ring_is_refused(small_shm: Path) -> None:
    path = str(small_shm / "seg")
    with pytest.raises(ringcast.SegmentError) as ei:
        ringcast.Segment.create(path, max_sessions=4, session_bytes=4 * MiB)
    msg = str(ei.value)
    assert "bytes free" in msg and "--shm-size" in msg and path in msg
    assert not os.path.exists(path), "the refused file is removed"


def test_a_full_filesystem_fails_one_stream_at_a_time_and_no_process_dies(
    small_shm: Path,
) -> None:
    path = str(small_shm / "seg")
    # 16 rings of 1 MiB on 2 MiB: eight times what the filesystem holds.
    seg = ringcast.Segment.create(path, max_sessions=16, session_bytes=1 * MiB)
    steady = seg.create_or_replace("steady")
    first = b"s" * (8 * KiB)
    assert steady.write(first)
    # A reader of that session in its own process, reading until the end while the others
    # fill the filesystem.
    reader = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, ringcast\n"
            "r = ringcast.Segment.open(sys.argv[1]).reader('steady')\n"
            "n = 0\n"
            "while chunk := r.read(timeout=60):\n"
            "    assert set(chunk) == {ord('s')}, chunk[:20]\n"
            "    n += len(chunk)\n"
            "print(n)\n",
            path,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    fillers = [
        subprocess.Popen(
            [sys.executable, "-c", _FILLER, path, f"fill-{i}", str(2 * MiB), ERROR_EVENT.decode()],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(1, 5)
    ]
    results = {}
    for i, p in enumerate(fillers, 1):
        out, err = p.communicate(timeout=100)
        assert p.returncode == 0, (p.returncode, err[-2000:])  # -7 would be SIGBUS
        results[f"fill-{i}"] = json.loads(out)
    refused = {conv: r for conv, r in results.items() if r["error"] is not None}
    assert refused, f"the filesystem never filled: {results}"
    for conv, r in refused.items():
        assert "no memory left" in r["error"] and "--shm-size" in r["error"], r["error"]
        info = seg.get(conv)
        assert info is not None and info.state == "failed"
        data = _read_all(seg, conv)
        assert data.endswith(ERROR_EVENT)
        body = data[: -len(ERROR_EVENT)]
        assert body == bytes([int(conv[-1])]) * len(body) and len(body) == min(
            r["written"], 1 * MiB
        )
    for conv, r in results.items():
        if r["error"] is None:
            assert seg.get(conv).state == "done"  # type: ignore[union-attr]
    # The steady stream goes on appending what fits in what was backed for it (a full
    # filesystem fails its appends past that, as any stream's), and its reader, in another
    # process, gets every byte it wrote.
    written = len(first)
    for _ in range(16):
        try:
            assert steady.write(b"s" * 256)
        except ringcast.SegmentError:
            break
        written += 256
    assert written > len(first), "an append inside the backed pages fails"
    assert steady.finalize("done")
    out, _ = reader.communicate(timeout=60)
    assert reader.returncode == 0 and int(out) == written
    # Memory given back by evicted sessions is usable again at once.
    for conv in refused:
        assert seg.evict(conv)
    fresh = seg.create_or_replace("fresh")
    assert fresh.write(b"f" * (256 * KiB))
    assert _read_all(seg, "fresh") if fresh.finalize("done") else False
    seg.close()
