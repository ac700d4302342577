"""ringcast: resumable, fan-out token streaming for LLM serving.

Sessions are byte rings in one shared-memory segment, keyed by conversation id. One producer
appends SSE bytes; any number of readers, in any process, read from any absolute offset.

>>> import ringcast, tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "seg")
>>> seg = ringcast.Segment.create(path, max_sessions=8, session_bytes=65536)
>>> w = seg.create_or_replace("conv-1")
>>> w.write(b"data: hello\\n\\n")
True
>>> w.finalize()
True
>>> seg.reader("conv-1", offset=6).read()
b'hello\\n\\n'
>>> seg.unlink()
"""

from ringcast._core import (
    LAYOUT_VERSION,
    MAX_PROCESSES,
    InvalidArgument,
    Notifier,
    OffsetLost,
    Reader,
    RegistryFull,
    RingcastError,
    Segment,
    SegmentError,
    SegmentStats,
    SessionEnded,
    SessionInfo,
    SessionNotFound,
    Writer,
)

__all__ = [
    "LAYOUT_VERSION",
    "MAX_PROCESSES",
    "InvalidArgument",
    "Notifier",
    "OffsetLost",
    "Reader",
    "RegistryFull",
    "RingcastError",
    "Segment",
    "SegmentError",
    "SegmentStats",
    "SessionEnded",
    "SessionInfo",
    "SessionNotFound",
    "Writer",
]
