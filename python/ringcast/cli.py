"""The ``ringcast`` command line: a thin dispatcher over subcommand modules.

A subcommand's module is imported only when that subcommand runs (``ringcast serve`` never
loads the replay tools, ``ringcast trace info`` never loads the server); ``ringcast --help``
lists them from :data:`SUBCOMMANDS` alone. Each module exposes ``register(parser)``, which
gives the subcommand's parser its description, epilog and arguments and sets ``func``
(``args -> int``) through ``set_defaults``. Adding a subcommand is one line here.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ringcast import __version__
from ringcast._args import HelpFormatter, Parser

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("ringcast.server.command", "run the resumable streaming server"),
    "record": (
        "ringcast.replay.record",
        "record streams from an OpenAI-compatible server into a trace",
    ),
    "trace": ("ringcast.replay.synth", "make a synthetic trace, or check one"),
    "replay": (
        "ringcast.replay.loadtest",
        "fan-out load test: replay a trace, check every reader's bytes, report",
    ),
}
"""name: (module that registers it, one-line help)."""


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser for ``argv``: the subcommand it names (its first word) is registered by its
    module, the others only by name and help. The subcommand's parser is its ``chosen``
    attribute (None without one)."""
    parser = Parser(
        prog="ringcast",
        description="Resumable, fan-out token streaming for LLM serving.",
        epilog="Run 'ringcast <command> --help' for the options of a command.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ringcast {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>", parser_class=Parser)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser.set_defaults(chosen=None)
    for name, (module, help_) in SUBCOMMANDS.items():
        p = subparsers.add_parser(name, help=help_, formatter_class=HelpFormatter)
        if name == chosen:
            importlib.import_module(module).register(p)
            parser.chosen = p  # type: ignore[attr-defined]
    return parser


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    parser = build_parser(args_in)
    args, extra = parser.parse_known_args(args_in)
    if extra:
        # Said by the subcommand's parser ("ringcast serve: error: ..."), not the top level's.
        (getattr(parser, "chosen", None) or parser).error(
            f"unrecognized arguments: {' '.join(extra)}"
        )
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    rc = func(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
