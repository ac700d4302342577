"""The runtime of a child process of ``ringcast serve`` (an HTTP process or a worker): read the
configuration, die with the supervisor, run the main coroutine on the chosen event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from ringcast.http.logs import log_failure
from ringcast.server.config import ServeConfig, load_config

_loop_log = logging.getLogger("ringcast.loop")

GC_THRESHOLDS = (20_000, 20, 20)
"""The children's cyclic garbage collector: a young collection every 20,000 net allocations
instead of Python's 700 (a serving process allocates a few objects per event and keeps
thousands of connections, futures and readers alive, which every older collection walks),
an older one every 20 of those, a full one every 20 of those (and only when a quarter of
the long-lived objects are new, as Python decides), with the objects of start-up frozen
(``gc.freeze``). The collector's whole share is ~2 µs of an event at 1,000 streams x 1
reader (with it disabled, 22.0 against 24.4 µs); what these settings save of it was within
this VM's noise (bench/RESULTS.md, Dec 5)."""

STARTUP_REFUSED = 2
"""Exit status of a child that could not start for a reason it has already printed as one
line (a ``--generator`` that cannot be loaded): the manager adds nothing and exits with it."""


def die_with_parent(parent: int | None = None) -> None:
    """Ask the kernel to SIGTERM this process when its parent dies (Linux only): the
    manager (``$RINGCAST_MANAGER_PID``), or the process ``parent``."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if parent is None:
        manager = os.environ.get("RINGCAST_MANAGER_PID")
        parent = int(manager) if manager else None
    if parent is not None and os.getppid() != parent:
        # The parent died before prctl took effect.
        os.kill(os.getpid(), signal.SIGTERM)


def child_main(
    role: str,
    serve: Callable[[ServeConfig, int], Coroutine[Any, Any, None]],
    argv: list[str] | None,
) -> None:
    """Entry point of a child process, run as ``python -m ringcast.<module> CONFIG INDEX``."""
    args = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the manager orchestrates shutdown
    die_with_parent()
    cfg = load_config(args[0])
    index = int(args[1])
    logging.basicConfig(
        level=cfg.log_level, format=f"%(asctime)s ringcast.{role}[{index}] %(message)s"
    )
    tune_gc()
    run_loop(cfg, serve(cfg, index))


def tune_gc() -> None:
    """Freezes what start-up made (modules, classes, the configuration: never garbage, no
    longer walked by collections) and sets :data:`GC_THRESHOLDS`."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def run_loop(cfg: ServeConfig, main: Coroutine[Any, Any, None]) -> None:
    """Run a child's main coroutine on uvloop (default) or the stdlib asyncio loop, with
    :func:`log_loop_error` as the loop's exception handler."""
    if cfg.event_loop == "asyncio":
        asyncio.run(_guarded(main))
    else:
        import uvloop

        uvloop.run(_guarded(main))


async def _guarded(main: Coroutine[Any, Any, None]) -> None:
    asyncio.get_running_loop().set_exception_handler(log_loop_error)
    await main


def log_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The event loop's report of an exception nobody handled (a callback's, a task's never
    retrieved). The default handler logs the context's message, the task or callback with
    its arguments, and the traceback at ERROR, any of which may hold a conversation id; this
    one logs the exception's type and raising line at ERROR and the rest at DEBUG."""
    exc = context.get("exception")
    if isinstance(exc, asyncio.CancelledError):
        # A connection's handler cancelled at shutdown (a worker's job socket, say): how
        # tasks stop, not a failure.
        pass
    elif isinstance(exc, BaseException):
        log_failure(_loop_log, "an exception nobody handled in the event loop", exc)
    else:
        _loop_log.error("an error in the event loop (details at --log-level DEBUG)")
    _loop_log.debug("event loop context: %r", context)
