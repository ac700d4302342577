"""``--spread adaptive``: new connections go to as few HTTP processes as keep up.

The kernel spreads the connections of a ``SO_REUSEPORT`` port over every process that
listens on it, so with one process per core every process wakes for its share of the
events even when one could serve them all; on 2 cores, two processes serving 1,000 streams
cost ~1.4x the CPU per event of one (``bench/RESULTS.md``). One process alone, though,
saturates under a load two would carry, and its tail latency grows without bound.

So the manager measures the HTTP processes' load (their CPU time, in cores, summed, every
``SAMPLE_S``) and decides how many of them take new connections (``among``): one while
the load stays under ``UP_LOAD`` cores per accepting process, twice as many each time it
reaches it, and one fewer after ``DOWN_HOLD_S`` seconds under ``DOWN_LOAD`` cores per
process that would be left. It stores the number in the shared counters
(``ManagerCounter.SPREAD_AMONG``) and sends every HTTP process ``SIGUSR1``; each applies
it to the port's ``SO_REUSEPORT`` group (``ringcast._core.steer_accepts``, a classic BPF
program the kernel runs per new connection; the group's sockets are ordered by when they
started listening, so "the first n" is whichever processes listened first). Connections
already accepted stay where they are, so a process that takes new ones no longer still
serves its old ones to their end.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

from ringcast._core import steer_accepts
from ringcast.server.counters import ManagerCounter, SharedCounters

SAMPLE_S = 0.25
UP_LOAD = 0.8
"""Cores of CPU per accepting HTTP process at which more processes take new connections."""
DOWN_LOAD = 0.5
"""Cores per process, for the processes that would be left, under which one fewer takes
new connections, once the load has stayed under it for ``DOWN_HOLD_S``."""
DOWN_HOLD_S = 5.0
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class SpreadPolicy:
    """How many of ``procs`` HTTP processes take new connections, from their load."""

    def __init__(self, procs: int) -> None:
        self.procs = procs
        self.among = 1
        self.calm_since: float | None = None

    def feed(self, load: float, now: float) -> int:
        """The number of processes for the load (cores of CPU) measured until ``now``
        (seconds, monotonic)."""
        among = self.among
        if among < self.procs and load >= UP_LOAD * among:
            self.among = min(self.procs, among * 2)
            self.calm_since = None
        elif among > 1 and load < DOWN_LOAD * (among - 1):
            if self.calm_since is None:
                self.calm_since = now
            elif now - self.calm_since >= DOWN_HOLD_S:
                self.among = among - 1
                self.calm_since = now  # the next step down waits as long again
        else:
            self.calm_since = None
        return self.among


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process ``pid`` (all its threads), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count from its end.
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


class Steering:
    """The manager's side: samples the HTTP processes' CPU and publishes ``among``."""

    def __init__(self, procs: int, counters: SharedCounters) -> None:
        self.policy = SpreadPolicy(procs)
        self.counters = counters
        self.last_sample = 0.0
        self.cpu: dict[int, float] = {}
        """CPU seconds of each HTTP process (by pid) at the last sample."""
        self.told: set[int] = set()
        """The pids that were ready when ``among`` was last sent to them."""
        counters.set(ManagerCounter.SPREAD_AMONG, self.published(self.policy.among))

    def published(self, among: int) -> int:
        """The counter's value for ``among``: 0 (the kernel's own spread) for all of them."""
        return 0 if among >= self.policy.procs else among

    def tick(self, now: float, processes: Callable[[], dict[int, bool]]) -> None:
        """Called by the manager's loop; ``processes()`` gives the HTTP processes' pids, each
        with whether it has started listening. Samples their CPU every ``SAMPLE_S``; if
        ``among`` changed, or a process started listening since, tells the listening
        processes to apply it."""
        if now - self.last_sample < SAMPLE_S:
            return
        ready = processes()
        elapsed = now - self.last_sample if self.last_sample else 0.0
        self.last_sample = now
        used = 0.0
        cpu: dict[int, float] = {}
        for pid in ready:
            t = cpu_seconds(pid)
            if t is None:
                continue
            cpu[pid] = t
            before = self.cpu.get(pid)
            if before is not None:
                used += t - before
        self.cpu = cpu
        before_among = self.policy.among
        if elapsed:
            self.policy.feed(used / elapsed, now)
        listening = {pid for pid, up in ready.items() if up}
        if self.policy.among != before_among or not listening <= self.told:
            self.counters.set(ManagerCounter.SPREAD_AMONG, self.published(self.policy.among))
            for pid in listening:
                try:
                    os.kill(pid, signal.SIGUSR1)
                except ProcessLookupError:
                    pass
            self.told = listening


def apply_spread(fd: int, counters: SharedCounters) -> None:
    """An HTTP process's side: steer the port's new connections as the manager's counter
    (row 0) says, at start and on ``SIGUSR1``. ``OSError`` if the kernel refuses."""
    steer_accepts(fd, counters.read(0, ManagerCounter.SPREAD_AMONG))
