"""The ``ringcast`` command line: a thin dispatcher over subcommand modules.

Each module listed in ``SUBCOMMAND_MODULES`` exposes ``register(subparsers)``, which adds
its subcommand(s) with ``subparsers.add_parser(...)`` and sets ``func`` (``args -> int``)
through ``set_defaults``. Adding a subcommand is one line here.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMAND_MODULES: tuple[str, ...] = (
    "ringcast.manager",  # serve
    "ringcast.trace",  # record, trace synth|info
    "ringcast.replay",  # replay
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ringcast",
        description="Resumable, fan-out token streaming for LLM serving.",
        epilog="Run 'ringcast <command> --help' for the options of a command.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    rc = func(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
