"""A ``ringcast serve`` process tree for the benchmarks that drive a server as a user would
(``kill_campaign.py``, ``slow_clients.py``): started on a free port with its segment in a
directory of its own, its processes found by kind, its memory summed, stopped and removed."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile

import psutil

CHILD_MODULE = {"http": "ringcast.server.http_process", "worker": "ringcast.server.worker"}


class ServeProcess:
    """``ringcast serve ARGS --port 0`` with a segment in a fresh directory; :meth:`start`
    again (after the manager died) re-attaches the same segment."""

    def __init__(self, *args: str) -> None:
        self.args = args
        self.dir = tempfile.mkdtemp(prefix="ringcast-bench-")
        self.segment = os.path.join(self.dir, "bench.seg")
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self.start()

    def start(self) -> None:
        cmd = [sys.executable, "-m", "ringcast.cli", "serve", "--port", "0"]
        cmd += ["--segment", self.segment, "--log-level", "ERROR", *self.args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        m = re.search(r"listening on http://[^:]+:(\d+)", line)
        if not m:
            self.proc.kill()
            self.proc.wait()
            raise SystemExit(f"ringcast serve did not start: {line!r}")
        self.port = int(m.group(1))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def pids(self, kind: str) -> list[int]:
        """The live processes of a kind: ``manager``, ``http`` or ``worker``."""
        assert self.proc is not None
        if kind == "manager":
            return [self.proc.pid]
        out = []
        with contextlib.suppress(psutil.NoSuchProcess):
            for c in psutil.Process(self.proc.pid).children():
                with contextlib.suppress(psutil.NoSuchProcess):
                    if CHILD_MODULE[kind] in c.cmdline() and c.status() != psutil.STATUS_ZOMBIE:
                        out.append(c.pid)
        return out

    def rss(self) -> int:
        """Resident bytes of the manager and its children, summed."""
        assert self.proc is not None
        total = 0
        with contextlib.suppress(psutil.NoSuchProcess):
            manager = psutil.Process(self.proc.pid)
            for p in [manager, *manager.children()]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    total += p.memory_info().rss
        return total

    def restart_after_manager_kill(self) -> None:
        """Wait for a killed manager's children to go (the kernel sent them SIGTERM), then
        start a new manager on the same segment."""
        assert self.proc is not None
        children = []
        with contextlib.suppress(psutil.NoSuchProcess):
            children = psutil.Process(self.proc.pid).children()
        self.proc.wait()
        psutil.wait_procs(children, timeout=15)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.start()

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            if self.proc.stdout is not None:
                self.proc.stdout.close()
        shutil.rmtree(self.dir, ignore_errors=True)
