"""``ringcast serve`` on the command line: check the arguments, build the config, start the
supervisor."""

from __future__ import annotations

import argparse
import math
import sys
import urllib.parse

from ringcast._core import MAX_PROCESSES
from ringcast.server.cluster.client import check_cluster_args
from ringcast.server.config import (
    SERVE_DESCRIPTION,
    SERVE_EPILOG,
    ServeConfig,
    config_from_args,
    configure,
)
from ringcast.server.plugin import check_generator
from ringcast.server.upstream import check_upstream, upstream_is_self
from ringcast.trace import check_trace

MIN_SESSION_BYTES = 4096
"""The smallest ``--session-bytes`` the server takes: room for some events of a stream."""
MAX_SESSIONS = 1 << 20
"""The most slots a segment's table holds (the core's ``MAX_SESSIONS``)."""
MAX_SESSION_BYTES = 1 << 40
"""The largest ring a segment takes."""
MAX_TOKENS = 1 << 31
"""The largest ``--default-max-tokens``."""
MIN_MAX_BODY = 1024
"""The smallest ``--max-body`` the server takes."""


MAX_TTL_S = 10 * 365 * 86400
"""The longest ``--ttl`` (10 years): with ``--redis`` a stream's keys expire ``--ttl`` + 60 s
after a sync, and Redis refuses an expiry whose milliseconds pass 2^63 from now (a ``--ttl``
of 1e16 failed every sync and flooded the log)."""
MAX_WAIT_S = 3600.0
"""The longest ``--ds-long-poll-timeout``, ``--prefill-s`` and ``--sse-ping-interval``: a
long-poll held, a first token awaited, or a stream silent for longer than an hour is a
stalled client to every proxy on the way."""


def check_args(args: argparse.Namespace) -> str | None:
    """What is wrong with parsed ``ringcast serve`` arguments (a message naming the option),
    or None. Checked before anything starts."""
    for name, value in vars(args).items():
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str) and not _utf8(text):
                # Bytes the locale could not decode (kept as surrogates): the children's
                # JSON configuration cannot carry them, and they started nothing but a
                # traceback.
                return (
                    f"--{name.replace('_', '-')}: the value has bytes that are not UTF-8; "
                    "give it in UTF-8"
                )
    for name in (
        "workers",
        "max_sessions",
        "max_sessions_per_key",
        "session_bytes",
        "max_body",
        "max_conns_per_client",
        "mirror_procs",
    ):
        value = getattr(args, name)  # None: not given, a default applies
        if value is not None and value < 0:
            return f"--{name.replace('_', '-')} must be >= 0"
    for flag, count, limit, limit_text in (
        ("--max-sessions", args.max_sessions, MAX_SESSIONS, f"{MAX_SESSIONS}"),
        ("--max-sessions-per-key", args.max_sessions_per_key, MAX_SESSIONS, f"{MAX_SESSIONS}"),
        ("--session-bytes", args.session_bytes, MAX_SESSION_BYTES, "1TiB"),
        ("--default-max-tokens", args.default_max_tokens, MAX_TOKENS, f"{MAX_TOKENS}"),
    ):
        if count is not None and count > limit:
            # (Past what the segment's table or a ring can hold: an OverflowError's traceback
            # where the segment is made.)
            return f"{flag} must be at most {limit_text} (got {count})"
    if args.default_max_tokens < 1:
        return f"--default-max-tokens must be at least 1 (got {args.default_max_tokens})"
    if args.max_body < MIN_MAX_BODY:
        # Every request would be refused with 413: a chat request is a few hundred bytes.
        return (
            f"--max-body {args.max_body} is too small: give at least {MIN_MAX_BODY} bytes "
            "(1KiB; a chat request is a few hundred; default 1MiB)"
        )
    if args.session_bytes is not None and args.session_bytes < MIN_SESSION_BYTES:
        # A ring smaller than a few events drops each one as it is written: every reader
        # got 410 offset_lost at once.
        return (
            f"--session-bytes {args.session_bytes} is too small: a stream's ring must hold "
            f"at least {MIN_SESSION_BYTES} bytes (a chunk's SSE event is ~250; default 4MiB)"
        )
    for name, most, said in (
        ("ttl", MAX_TTL_S, "10 years"),
        ("idle_timeout", MAX_TTL_S, "10 years"),
        ("tokens_per_s", math.inf, ""),
        ("prefill_s", MAX_WAIT_S, "an hour"),
        ("sse_ping_interval", MAX_WAIT_S, "an hour"),
    ):
        value = getattr(args, name)
        flag = "--" + name.replace("_", "-")
        if not 0 <= value < math.inf:  # also NaN; infinity does not survive the children's
            # JSON configuration (0 is the way to say "never" where there is one)
            return f"{flag} must be a finite number >= 0 (got {value})"
        if value > most:
            # Beyond sense, and beyond what some of their uses can hold (a --prefill-s of
            # 1e300 started a server whose streams never began).
            return f"{flag} must be at most {most:.0f} seconds ({said}; got {value:g})"
    if not 0 < args.ds_long_poll_timeout <= MAX_WAIT_S:
        return (
            f"--ds-long-poll-timeout must be a number of seconds > 0 and at most "
            f"{MAX_WAIT_S:g} (got {args.ds_long_poll_timeout})"
        )
    if not 0 < args.write_timeout < math.inf:
        return f"--write-timeout must be a number of seconds > 0 (got {args.write_timeout})"
    if not 0 <= args.coalesce_ms <= 1000:
        return "--coalesce-ms must be between 0 and 1000"
    if args.speed != 1.0 and not args.replay:
        return "--speed only applies with --replay TRACE"
    if args.upstream and args.generator:
        return "--upstream and --generator both choose what the workers run; give one"
    if args.upstream or args.upstream_ca_file:
        if (problem := check_upstream(args.upstream or "", args.upstream_ca_file)) is not None:
            return problem
        if args.upstream and upstream_is_self(args.upstream, args.host, args.port):
            # Easy to do now that the default port is llama-server's: every job would proxy
            # to this server again, each one a new request.
            return (
                f"--upstream {args.upstream} is this server's own address "
                f"(--port {args.port}); run the model server on another port (e.g. "
                "llama-server --port 8081) or give ringcast another --port"
            )
    if args.generator and (problem := check_generator(args.generator)) is not None:
        return problem
    if args.replay and (problem := check_trace(args.replay)) is not None:
        return f"--replay: {problem}"
    return check_cluster_args(args)


PROCESS_ROWS_RESERVED = 4
"""Process rows of the segment a server leaves to others: library readers and tools that
attach to it (``ringcast trace``, a user's script)."""


def check_process_rows(cfg: ServeConfig) -> str | None:
    """Why the server's processes would not fit the segment's process table, or None. Every
    process that attaches takes a row (``ringcast.MAX_PROCESSES`` in all); one too many would
    fail to start and take the whole server down with a vaguer message."""
    mirrors = cfg.mirror_procs if cfg.clustered else 0
    needed = 1 + cfg.http_procs + cfg.workers + mirrors
    available = MAX_PROCESSES - PROCESS_ROWS_RESERVED
    if needed <= available:
        return None
    parts = f"1 manager + {cfg.http_procs} HTTP"
    if cfg.workers:
        parts += f" + {cfg.workers} worker"
    if mirrors:
        parts += f" + {mirrors} mirror"
    return (
        f"{parts} processes make {needed}, more than the {available} the segment's process "
        f"table offers a server ({MAX_PROCESSES} rows, {PROCESS_ROWS_RESERVED} left to library "
        "readers); lower --http-procs or --workers" + (" or --mirror-procs" if mirrors else "")
    )


def _redis_password(url: str | None) -> str | None:
    """The password in a ``--redis`` URL, if it holds one."""
    try:
        return urllib.parse.urlsplit(url).password if url else None
    except ValueError:  # not a URL: config_from_args said why
        return None


def run(args: argparse.Namespace) -> int:
    if (problem := check_args(args)) is not None:
        print(f"ringcast serve: {problem}", file=sys.stderr)
        return 2
    try:
        cfg = config_from_args(args)
    except OSError as e:
        print(f"ringcast serve: cannot read --api-key-file: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"ringcast serve: {e}", file=sys.stderr)
        return 2
    if (problem := check_process_rows(cfg)) is not None:
        print(f"ringcast serve: {problem}", file=sys.stderr)
        return 2
    for flag, secret, safe in (
        ("api_key", args.api_key, "$RINGCAST_API_KEY or --api-key-file (mode 0600)"),
        ("upstream_api_key", args.upstream_api_key, "$RINGCAST_UPSTREAM_KEY"),
        ("redis", _redis_password(args.redis), "$RINGCAST_REDIS_URL"),
    ):
        if secret:
            what = "a password in --redis" if flag == "redis" else "--" + flag.replace("_", "-")
            print(
                f"ringcast serve: warning: {what} on the command line is "
                "readable by every local user (/proc/<pid>/cmdline, ps); pass it in "
                f"{safe} instead",
                file=sys.stderr,
            )
    from ringcast.server.supervisor import serve

    return serve(cfg)


def register(p: argparse.ArgumentParser) -> None:
    """``ringcast serve`` (see ``ringcast.cli``)."""
    p.description = SERVE_DESCRIPTION
    p.epilog = SERVE_EPILOG
    configure(p)
    p.set_defaults(func=run)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
