"""Shared helpers for the core tests (tests/test_core_*.py).

Kept free of pytest imports at module level so that child processes (spawned through
``multiprocess``) can import the pieces they need cheaply.

``RINGCAST_TEST_SCALE`` (a float, default 1.0) scales iteration counts and stream sizes: set it
below 1 on a loaded machine or under slow tools, above 1 for a soak run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

SCALE = float(os.environ.get("RINGCAST_TEST_SCALE", "1.0"))

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def scaled(n: int, minimum: int = 1) -> int:
    """``n`` times the test scale, never below ``minimum``."""
    return max(minimum, int(n * SCALE))


def shm_path(tag: str = "t") -> str:
    """A fresh, unique segment path under /dev/shm (not created)."""
    return f"/dev/shm/ringcast-test-{tag}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


@contextlib.contextmanager
def temp_segment_path(tag: str = "t") -> Iterator[str]:
    path = shm_path(tag)
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


# A deterministic byte pattern: the byte at absolute offset i is PATTERN[i % PERIOD]. The period is
# prime so that it never lines up with a power-of-two ring: a reader handed bytes from the wrong
# lap of the ring (offset +/- k * session_bytes) sees a mismatch.
PERIOD = 1_000_003
_SEED = 20261129


def _make_pattern() -> bytes:
    import random

    # randbytes is deterministic for a seed within one interpreter version, and every process of
    # a test run uses the same interpreter.
    return random.Random(_SEED).randbytes(PERIOD)


_PATTERN_ONE = _make_pattern()
# Two periods back to back: any slice of length <= PERIOD starting anywhere is one bytes slice.
PATTERN = _PATTERN_ONE + _PATTERN_ONE


def pattern_at(offset: int, length: int) -> bytes:
    """The pattern bytes for absolute offsets ``[offset, offset + length)``."""
    out = bytearray()
    while length > 0:
        start = offset % PERIOD
        n = min(length, PERIOD)
        out += PATTERN[start : start + n]
        offset += n
        length -= n
    return bytes(out)


def run_python(code: str, timeout: float = 60.0, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (with tests/ importable); never raises on failure."""
    env = dict(os.environ)
    env["PYTHONPATH"] = TESTS_DIR + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def thread_count() -> int:
    """Threads of this process right now, as the kernel sees them."""
    return len(os.listdir("/proc/self/task"))


LOOP_KINDS = ("asyncio", "uvloop")


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run_async(kind: str, main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run ``main()`` on a fresh loop of ``kind``; any exception the loop reports as unhandled
    (a callback that raised, a task destroyed while pending, a never-retrieved task exception)
    fails the test after the loop closes."""
    errors: list[dict[str, Any]] = []

    def on_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        errors.append(context)

    def factory() -> asyncio.AbstractEventLoop:
        loop = new_loop(kind)
        loop.set_exception_handler(on_error)
        return loop

    with asyncio.Runner(loop_factory=factory) as runner:
        result = runner.run(main())
    # Tasks that died with an exception nobody retrieved report it when garbage collected.
    import gc

    gc.collect()
    if errors:
        raise AssertionError(f"unhandled exceptions on the {kind} loop: {errors!r}")
    return result
