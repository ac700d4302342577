"""Optional dependencies, checked before a command starts any work.

A command that needs a package only some installs have (``matplotlib`` for ``--png``, the
``redis`` client for ``--compare redis``) calls :func:`require` while it checks its
arguments, and imports the package where it uses it. A missing package then ends the command
at once with one line naming the extra that installs it, instead of a ``ModuleNotFoundError``
after minutes of work.
"""

from __future__ import annotations

import importlib

EXTRA_OF = {"matplotlib": "plot", "redis": "redis"}
"""Optional module -> the extra of ``pyproject.toml`` that installs it."""


class MissingExtra(RuntimeError):
    """An optional package a command needs is not installed; the message says what to run."""


def require(module: str, needed_for: str) -> None:
    """Import ``module`` or raise :class:`MissingExtra`: ``"<needed_for> needs <module>,
    which is not installed: pip install 'ringcast[<extra>]'"``."""
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtra(
            f"{needed_for} needs {module}, which is not installed "
            f"({exc}): pip install 'ringcast[{EXTRA_OF[module]}]'"
        ) from None
