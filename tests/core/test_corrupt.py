"""Nothing read from the segment is trusted: a damaged header is refused with SegmentError, and
garbage in the slot area yields errors, never a crash or a hang.

The scribbling runs in a subprocess that must exit normally: a segfault, an abort, a Rust panic
(PanicException is not a RingcastError) or a hang all fail the test.
"""

from __future__ import annotations

import os
import struct

import pytest
import ringcast
from children import scaled

pytestmark = pytest.mark.timeout(120)

KiB = 1024
# Header field offsets of layout version 1 (rust/ringcast-core/src/layout.rs, HeaderConsts).
MAGIC_AT = 0
VERSION_AT = 8
MAX_SESSIONS_AT = 12
SESSION_BYTES_AT = 24
SLOTS_OFFSET_AT = 64
RINGS_OFFSET_AT = 72
READY_AT = 104  # written last at creation: a creator that died mid-way leaves it 0


def _make(path: str) -> None:
    s = ringcast.Segment.create(path, max_sessions=8, session_bytes=64 * KiB)
    w = s.create_or_replace("c", "o")
    w.write(b"data: x\n\n" * 100)
    s.close()


def _poke(path: str, at: int, data: bytes) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, data, at)
    finally:
        os.close(fd)


def test_the_layout_version_of_this_build_is_where_the_tests_poke(seg_path: str) -> None:
    _make(seg_path)
    with open(seg_path, "rb") as f:
        head = f.read(16)
    assert head[:8] == b"RINGCAST"
    assert struct.unpack_from("<I", head, VERSION_AT)[0] == ringcast.LAYOUT_VERSION


@pytest.mark.parametrize(
    ("at", "data", "words"),
    [
        pytest.param(MAGIC_AT, b"RINGCASX", "magic", id="magic"),
        pytest.param(MAGIC_AT, b"\0" * 8, "magic", id="zero-magic"),
        pytest.param(VERSION_AT, None, "version", id="layout-version"),
        pytest.param(MAX_SESSIONS_AT, struct.pack("<I", 1 << 30), "", id="max-sessions"),
        pytest.param(MAX_SESSIONS_AT, struct.pack("<I", 0), "", id="zero-sessions"),
        pytest.param(SESSION_BYTES_AT, struct.pack("<Q", 1 << 62), "", id="session-bytes"),
        pytest.param(SLOTS_OFFSET_AT, struct.pack("<Q", 1 << 40), "", id="slots-offset"),
        pytest.param(RINGS_OFFSET_AT, struct.pack("<Q", 12345), "", id="rings-offset"),
        pytest.param(READY_AT, struct.pack("<I", 0), "", id="creation-never-finished"),
    ],
)
def test_damaged_header_is_refused(seg_path: str, at: int, data: bytes | None, words: str) -> None:
    _make(seg_path)
    if data is None:
        data = struct.pack("<I", ringcast.LAYOUT_VERSION + 1)
    _poke(seg_path, at, data)
    with pytest.raises(ringcast.SegmentError) as ei:
        ringcast.Segment.open(seg_path)
    assert words in str(ei.value).lower()
    with pytest.raises(ringcast.SegmentError):
        ringcast.Segment.open_or_create(seg_path, max_sessions=8, session_bytes=64 * KiB)


@pytest.mark.parametrize("keep", [0, 7, 100, 4096, -1])
def test_truncated_file_is_refused(seg_path: str, keep: int) -> None:
    _make(seg_path)
    size = os.stat(seg_path).st_size
    os.truncate(seg_path, size - 1 if keep < 0 else keep)
    with pytest.raises(ringcast.SegmentError):
        ringcast.Segment.open(seg_path)


def test_directory_and_empty_file_are_refused(seg_path: str) -> None:
    open(seg_path, "wb").close()
    with pytest.raises(ringcast.SegmentError):
        ringcast.Segment.open(seg_path)
    with pytest.raises(ringcast.SegmentError):
        ringcast.Segment.open("/dev/shm")


# Runs in a subprocess: scribble over the slot area (metadata, ids, counts, process rows) of a live
# mapping, then drive every operation. Only ringcast errors are allowed out of them.
_SCRIBBLE_SCRIPT = r"""
import os, random, struct, sys
import ringcast

path, seed, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rng = random.Random(seed)
seg = ringcast.Segment.create(path, max_sessions=8, session_bytes=64 * 1024)
writers = []
for i in range(6):
    w = seg.create_or_replace(f"conv-{i}", "o")
    w.write(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 100_000))))
    writers.append(w)
    if i % 2:
        w.finalize()
readers = [seg.reader(f"conv-{i}", seg.get(f"conv-{i}", "o").first_available, "o")
           for i in range(6)]
with open(path, "rb") as f:
    head = f.read(4096)
slots_offset, rings_offset = struct.unpack_from("<QQ", head, 64)
slot_stride = struct.unpack_from("<Q", head, 32)[0]
fd = os.open(path, os.O_RDWR)

def scribble():
    if mode == "random":
        # Anywhere past the header and before the rings.
        for _ in range(rng.randrange(1, 50)):
            at = rng.randrange(4096, rings_offset)
            os.pwrite(fd, rng.randbytes(rng.randrange(1, 64)), at)
    else:
        # Field by field over the slot metadata (layout v2: 384-byte SlotMeta, id bytes after).
        slot = rng.randrange(8)
        at = slots_offset + slot * slot_stride + rng.randrange(0, 400) // 4 * 4
        value = rng.choice([0, 1, 2, 3, 4, 5, 6, 255, 2**31, 2**32 - 1, 2**63, 2**64 - 1,
                            rng.randrange(2**64)])
        os.pwrite(fd, struct.pack("<Q", value), at)

def attempt(fn, *args):
    try:
        return fn(*args)
    except ringcast.RingcastError:
        return None

for round_ in range(int(sys.argv[4])):
    scribble()
    attempt(seg.stats)
    infos = attempt(seg.list) or []
    for info in infos[:8]:
        (info.conversation_id, info.owner, info.state, info.total_bytes, info.first_available,
         info.readers, info.producer_alive, info.is_done)
    for i in range(6):
        conv = f"conv-{i}"
        attempt(seg.get, conv, "o")
        attempt(seg.lookup_prefix, conv, "o")
        r = attempt(seg.reader, conv, rng.randrange(0, 200_000), "o")
        for rr in (r, readers[i]):
            if rr is None:
                continue
            attempt(rr.read_nowait, rng.randrange(1, 200_000))
            attempt(rr.read, 1000, 0.001)
            attempt(rr.read_into, bytearray(100), 0.001)
            attempt(rr.ready)
            attempt(rr.state)
            rr.at_end
        w = writers[i]
        attempt(w.write, b"x" * rng.randrange(0, 70_000))
        attempt(w.wait_cancelled, 0.001)
        w.cancelled; w.total_bytes
        attempt(seg.take_over_dead, conv, "o")
    if rng.random() < 0.3:
        attempt(seg.evict, f"conv-{rng.randrange(6)}", "o")
    if rng.random() < 0.3:
        attempt(seg.evict_slot, rng.randrange(8), rng.randrange(4))
    nw = attempt(seg.create_or_replace, f"conv-{rng.randrange(8)}", "o")
    if nw is not None:
        attempt(nw.write, b"fresh")
    n = attempt(seg.notifier)
    if n is not None:
        attempt(n.subscribe, rng.randrange(8), rng.randrange(4))
        attempt(n.drain)
print("survived", flush=True)
"""


@pytest.mark.parametrize("mode", ["random", "fields"])
@pytest.mark.parametrize("seed", range(scaled(4)))
def test_scribbled_slot_area_gives_errors_not_crashes(
    seg_path: str, mode: str, seed: int, run_python
) -> None:
    proc = run_python(_SCRIBBLE_SCRIPT, 90, seg_path, str(seed), mode, str(scaled(40)))
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    assert proc.stdout == "survived\n"


_REOPEN_SCRIPT = r"""
import os, random, sys
import ringcast
path, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)
with open(path, "r+b") as f:
    size = os.fstat(f.fileno()).st_size
    for _ in range(200):
        f.seek(rng.randrange(4096, min(size, 4096 + 512 * 1024)))
        f.write(rng.randbytes(rng.randrange(1, 32)))
try:
    seg = ringcast.Segment.open(path)
except ringcast.SegmentError:
    print("refused", flush=True)
    sys.exit(0)
for info in seg.list():
    try:
        seg.reader(info.conversation_id, info.first_available, info.owner).read_nowait()
    except ringcast.RingcastError:
        pass
try:
    seg.create_or_replace("after", "o").write(b"ok")
except ringcast.RingcastError:
    pass
print("survived", flush=True)
"""


@pytest.mark.parametrize("seed", range(scaled(3)))
def test_segment_scribbled_while_closed_opens_or_is_refused(
    seg_path: str, seed: int, run_python
) -> None:
    _make(seg_path)
    proc = run_python(_REOPEN_SCRIPT, 60, seg_path, str(seed))
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    assert proc.stdout in ("survived\n", "refused\n")


def test_a_symbolic_link_at_the_segment_path_is_refused(seg_path: str) -> None:
    target = seg_path + "-target"
    os.symlink(target, seg_path)
    try:
        for call in (
            lambda: ringcast.Segment.open_or_create(
                seg_path, max_sessions=8, session_bytes=64 * KiB
            ),
            lambda: ringcast.Segment.create(seg_path, max_sessions=8, session_bytes=64 * KiB),
            lambda: ringcast.Segment.open(seg_path),
        ):
            with pytest.raises(ringcast.SegmentError, match="symbolic link"):
                call()
        assert not os.path.exists(target)
        # To a real segment: refused, and the segment is left as it was.
        _make(target)
        with pytest.raises(ringcast.SegmentError, match="symbolic link"):
            ringcast.Segment.open(seg_path)
        ringcast.Segment.open(target).close()
    finally:
        os.unlink(seg_path)
        if os.path.exists(target):
            os.unlink(target)
