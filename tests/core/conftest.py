"""Fixtures of the core tests (``tests/core``): segments, event loops, fresh interpreters."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
import ringcast
from children import shm_path

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
LOOP_KINDS = ("asyncio", "uvloop")


@pytest.fixture
def seg_path() -> Iterator[str]:
    """A unique, not yet existing path under /dev/shm, removed after the test, with its
    notifier directory (a child killed by the test leaves its socket file in it)."""
    path = shm_path()
    yield path
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    shutil.rmtree(path + ".wake", ignore_errors=True)


@pytest.fixture
def seg(seg_path: str) -> Iterator[ringcast.Segment]:
    """A small segment: 64 sessions of 64 KiB."""
    s = ringcast.Segment.create(seg_path, max_sessions=64, session_bytes=64 * 1024, max_id_len=256)
    yield s
    with contextlib.suppress(Exception):
        s.close()


@pytest.fixture(params=LOOP_KINDS)
def loop_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _run_python(code: str, timeout: float = 60.0, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (with this directory importable: ``children``);
    never raises on failure."""
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


@pytest.fixture
def run_python() -> Callable[..., subprocess.CompletedProcess[str]]:
    """``run_python(code, timeout, *args)``: ``code`` in a fresh interpreter."""
    return _run_python


@pytest.fixture
def child_env() -> dict[str, str]:
    """The environment of a child interpreter that imports ``children``."""
    return dict(os.environ, PYTHONPATH=TESTS_DIR + os.pathsep + os.environ.get("PYTHONPATH", ""))


@pytest.fixture
def thread_count() -> Callable[[], int]:
    """Threads of this process right now, as the kernel sees them."""
    return lambda: len(os.listdir("/proc/self/task"))


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def _run_async(kind: str, main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
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


@pytest.fixture
def run_async() -> Callable[[str, Callable[[], Coroutine[Any, Any, Any]]], Any]:
    """``run_async(kind, main)``: ``main()`` on a fresh loop of ``kind`` ("asyncio" or
    "uvloop"); an exception the loop reports as unhandled (a callback that raised, a task
    destroyed while pending, a never-retrieved task exception) fails the test."""
    return _run_async
