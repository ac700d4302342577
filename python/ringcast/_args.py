"""Command-line helpers shared by every ``ringcast`` subcommand: byte sizes with suffixes
(``4M``, ``1G``, ``4KiB``) and a help formatter that shows every option's default.

Below the server and the tools (both use it), above nothing but the standard library.
"""

from __future__ import annotations

import argparse
import re
from typing import NoReturn

_SIZE = re.compile(r"^\s*([0-9]+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}
_UNIT_NAMES = ("", "KiB", "MiB", "GiB", "TiB")


def parse_size(text: str) -> int:
    """A byte count: digits, optionally followed by ``K``, ``M``, ``G`` or ``T`` (powers of
    1024, with or without ``B`` / ``iB``: ``4M``, ``4MB`` and ``4MiB`` are all 4,194,304).
    ``ValueError`` with a message saying what is accepted otherwise."""
    m = _SIZE.match(text)
    if m is None or (m.group(3) and m.group(3).lower() == "ib" and not m.group(2)):
        raise ValueError(
            f"{text!r} is not a size: give a number of bytes (4194304) or a number with "
            "K, M, G or T (binary: 4M = 4MiB = 4194304)"
        )
    return int(m.group(1)) << (10 * _UNITS[m.group(2).lower()])


def format_size(n: int) -> str:
    """``n`` bytes in the largest binary unit that divides it (``4MiB``, ``1536KiB``, ``100``)."""
    exp = 0
    while n and exp < len(_UNIT_NAMES) - 1 and n % (1 << (10 * (exp + 1))) == 0:
        exp += 1
    return f"{n >> (10 * exp)}{_UNIT_NAMES[exp]}"


def size_arg(text: str) -> int:
    """argparse ``type`` of a size option (see :func:`parse_size`)."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are the error and where to look, not its whole usage
    first (``ringcast serve``'s usage is 25 lines, and the one line that matters was the
    last): ``ringcast serve: error: ...`` then ``Run 'ringcast serve --help' for its
    options.``, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\nRun '{self.prog} --help' for its options.\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs kept as written; every option with a default value says it
    (``(default: 300.0)``, sizes as ``4MiB``), unless its help already says its default
    (``%(default)s``, or in words). Flags (``store_true``) and options without a default
    say nothing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = shown_default(action)
        if shown is None or "%(default)" in text or "default" in text:
            return text
        return f"{text} (default: {shown})"


def shown_default(action: argparse.Action) -> str | None:
    """How the help shows ``action``'s default, or None if it shows none."""
    d = action.default
    if d is None or d is False or d is argparse.SUPPRESS or d == [] or d == "":
        return None
    if isinstance(action, argparse._StoreConstAction | argparse._HelpAction):
        return None
    if action.type is size_arg and isinstance(d, int):
        return format_size(d)
    return str(d).replace("%", "%%")
