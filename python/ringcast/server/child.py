"""The runtime of a child process of ``ringcast serve`` (an HTTP process or a worker): read the
configuration, die with the supervisor, run the main coroutine on the chosen event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from ringcast.server.config import ServeConfig, load_config


def die_with_parent() -> None:
    """Ask the kernel to SIGTERM this process when the manager dies (Linux only)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    manager = os.environ.get("RINGCAST_MANAGER_PID")
    if manager and os.getppid() != int(manager):
        # The manager died before prctl took effect.
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
    run_loop(cfg, serve(cfg, index))


def run_loop(cfg: ServeConfig, main: Coroutine[Any, Any, None]) -> None:
    """Run a child's main coroutine on uvloop (default) or the stdlib asyncio loop."""
    if cfg.event_loop == "asyncio":
        asyncio.run(main)
    else:
        import uvloop

        uvloop.run(main)
