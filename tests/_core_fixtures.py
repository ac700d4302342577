"""pytest fixtures for the core tests; test modules import the ones they use.

(Not a conftest.py, so that the core suite does not claim the package-wide conftest.)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest
import ringcast
from _core_support import LOOP_KINDS, shm_path


@pytest.fixture
def seg_path() -> Iterator[str]:
    """A unique, not yet existing path under /dev/shm, removed after the test."""
    path = shm_path()
    yield path
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


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
