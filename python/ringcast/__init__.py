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

import operator

from ringcast._core import (
    LAYOUT_VERSION,
    MAX_PROCESSES,
    InvalidArgument,
    Notifier,
    OffsetLost,
    QuotaExceeded,
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
    __version__,
)
from ringcast._resume import reader_at_event

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing adds ~15 ms to `import ringcast`
if TYPE_CHECKING:
    from collections.abc import Coroutine
    from typing import Any


def _reader_aread(self: Reader, max_bytes: int = 1 << 20) -> "Coroutine[Any, Any, bytes]":
    """Awaitable ``read``: waits through this process's ``Notifier`` without blocking the
    event loop or holding a thread. Returns ``b""`` only at the end of a finished stream.
    Bad arguments and a closed reader or segment fail when this is called, not when awaited.
    """
    # Here, not at the top: asyncio (~0.1 s to import) loads on the first aread, not with
    # ringcast; later calls find the module loaded.
    from ringcast import _aio

    max_bytes = operator.index(max_bytes)
    if max_bytes < 1:
        raise ValueError("max_bytes must be at least 1")
    return _aio.aread(self, self.notifier(), max_bytes)


# The extension imports no Python code, so the awaitable read, which needs asyncio, is written
# in Python and installed on the extension's Reader class here: every Reader has it.
_reader_aread.__name__ = "aread"
_reader_aread.__qualname__ = "Reader.aread"
Reader.aread = _reader_aread  # type: ignore[method-assign]

__all__ = [
    "LAYOUT_VERSION",
    "MAX_PROCESSES",
    "InvalidArgument",
    "Notifier",
    "OffsetLost",
    "QuotaExceeded",
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
    "__version__",
    "reader_at_event",
]
