"""The command line: every default shown in ``--help``, sizes with suffixes on every size
option, a clear error for a bad one."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator

import pytest
from ringcast._args import format_size, parse_size, shown_default, size_arg
from ringcast.cli import SUBCOMMANDS, build_parser
from ringcast.server.config import config_from_args

pytestmark = pytest.mark.timeout(60)


def _parsers() -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every (sub)command's parser, with its full name."""

    def walk(
        name: str, p: argparse.ArgumentParser
    ) -> Iterator[tuple[str, argparse.ArgumentParser]]:
        yield name, p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, sp in action.choices.items():
                    yield from walk(f"{name} {sub}", sp)

    for command in SUBCOMMANDS:
        top = build_parser([command])
        sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
        yield from walk(f"ringcast {command}", sub.choices[command])


@pytest.mark.parametrize(
    ("text", "n"),
    [
        ("4096", 4096),
        ("4K", 4096),
        ("4k", 4096),
        ("4KiB", 4096),
        ("4KB", 4096),
        ("4M", 4 << 20),
        ("4MiB", 4 << 20),
        ("1G", 1 << 30),
        ("1g", 1 << 30),
        ("2T", 2 << 40),
        ("0", 0),
        (" 16 M ", 16 << 20),
    ],
)
def test_sizes(text: str, n: int) -> None:
    assert parse_size(text) == n
    assert parse_size(format_size(n)) == n


@pytest.mark.parametrize("text", ["", "4X", "M", "-1", "4.5M", "4iB", "4 M B", "1e6", "4MiBs"])
def test_bad_sizes_say_what_is_accepted(text: str) -> None:
    with pytest.raises(ValueError, match="not a size: give a number of bytes"):
        parse_size(text)


def test_format_size() -> None:
    assert format_size(4 << 20) == "4MiB"
    assert format_size(1536 << 10) == "1536KiB"
    assert format_size(100) == "100"
    assert format_size(0) == "0"


def test_every_default_is_shown_in_help() -> None:
    checked = 0
    for name, parser in _parsers():
        formatter = parser._get_formatter()
        for action in parser._actions:
            shown = shown_default(action)
            if shown is None:
                continue
            text = formatter._expand_help(action)
            assert shown.replace("%%", "%") in text or "default" in text, (
                f"{name} {action.option_strings}: help does not show its default ({text!r})"
            )
            checked += 1
    assert checked > 30


def test_every_size_option_takes_suffixes() -> None:
    """An option whose value is a number of bytes is parsed by size_arg (a plain int would
    refuse 4M)."""
    size_words = ("bytes", "memory", "body", "size")
    found = []
    for name, parser in _parsers():
        for action in parser._actions:
            flag = " ".join(action.option_strings)
            if any(w in flag for w in size_words):
                assert action.type is size_arg, f"{name} {flag} does not take sizes like 4M"
                found.append(flag)
    assert {"--session-bytes", "--max-memory", "--max-body"} <= set(found)


def test_serve_takes_sizes_with_suffixes() -> None:
    argv = ["serve", "--session-bytes", "4M", "--max-memory", "1G", "--max-body", "64KiB"]
    args = build_parser(argv).parse_args(argv)
    cfg = config_from_args(args)
    assert (cfg.session_bytes, cfg.max_memory, cfg.max_body) == (4 << 20, 1 << 30, 64 << 10)


def test_a_bad_size_is_refused_with_one_clear_line() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "ringcast.cli", "serve", "--session-bytes", "4X"],
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert res.returncode == 2
    assert "argument --session-bytes: '4X' is not a size" in res.stderr
    assert "4M = 4MiB" in res.stderr


def test_help_shows_sizes_in_units() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "ringcast.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert res.returncode == 0
    text = " ".join(res.stdout.split())
    assert "older bytes are dropped (default: 4MiB)" in text
    assert "(default: 1MiB)" in text  # --max-body
    assert "first token, at most 3600 (default: 0.0)" in text  # --prefill-s, missing before


def test_version_prints_the_package_version() -> None:
    import ringcast

    res = subprocess.run(
        [sys.executable, "-m", "ringcast.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"ringcast {ringcast.__version__}\n"
