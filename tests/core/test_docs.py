"""The library documents itself: docstrings compiled into the extension (``help()`` and IDEs
show them), ``__version__``, and the README's library snippet, run as written."""

from __future__ import annotations

import importlib.metadata
import os
import pydoc
import re
import subprocess
import sys
from pathlib import Path

import pytest
import ringcast

pytestmark = pytest.mark.timeout(60)

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_version_is_the_installed_one() -> None:
    assert ringcast.__version__ == importlib.metadata.version("ringcast")
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", ringcast.__version__)


def test_help_shows_docstrings() -> None:
    text = pydoc.render_doc(ringcast.Segment, renderer=pydoc.plaintext)
    assert "Attach a reader at an absolute byte offset" in text
    assert "Create a new segment file" in text
    # Every default shows its value (a default written as an expression showed as Ellipsis).
    assert "Ellipsis" not in text
    for method in ("create", "open_or_create"):
        assert f"{method}(path, *, max_sessions=1024, session_bytes=4194304, max_id_len=256)" in (
            text
        )


@pytest.mark.parametrize(
    "name", [n for n in ringcast.__all__ if isinstance(getattr(ringcast, n), type)]
)
def test_every_public_class_and_method_has_a_docstring(name: str) -> None:
    cls = getattr(ringcast, name)
    assert (cls.__doc__ or "").strip(), name
    for attr, value in vars(cls).items():
        if attr.startswith("_") or not callable(value):
            continue
        assert (getattr(value, "__doc__", None) or "").strip(), f"{name}.{attr}"


def test_the_readme_snippet_runs_twice_and_cleans_up() -> None:
    (snippet,) = re.findall(r"## The library\n\n```python\n(.*?)```", README, re.S)
    path = re.search(r'"(/dev/shm/[^"]+)"', snippet)
    assert path is not None
    assert not os.path.exists(path.group(1))
    for _ in range(2):
        res = subprocess.run(
            [sys.executable, "-c", snippet], capture_output=True, text=True, timeout=30
        )
        assert res.returncode == 0, res.stderr
        assert res.stdout == "b'data: hello\\n\\n'\n"
        assert not os.path.exists(path.group(1))  # nothing left behind
