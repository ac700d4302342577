"""``--spread adaptive``: new connections go to as few HTTP processes as keep up.

The kernel spreads the connections of a ``SO_REUSEPORT`` port over every process that
listens on it, so with one process per core every process wakes for its share of the
events even when one could serve them all; on 2 cores, two processes serving 1,000 streams
cost ~1.4x the CPU per event of one (``bench/RESULTS.md``). One process alone, though,
saturates under a load two would carry, and its tail latency grows without bound.

So the manager measures the HTTP processes' load and decides how many of them take new
connections (``among``): their CPU time together, in cores, every ``SAMPLE_S``, and
whether any of them is behind (its adaptive coalescing lingers: its loop ran late, whether
from work or from waiting for a CPU that others hold; checked every turn of the manager's
loop, so a burst of connections widens the spread within ~0.1 s). One process takes new
connections while the load stays under ``UP_LOAD`` cores per accepting process and none is
behind; twice as many (at most every ``SAMPLE_S``) when it reaches that or one falls
behind; one fewer after ``DOWN_HOLD_S`` seconds under ``DOWN_LOAD`` cores per process that
would be left. It stores the number in the shared counters
(``ManagerCounter.SPREAD_AMONG``) and sends every listening HTTP process ``SIGUSR1``; each
applies it (and the number there when it starts) to the port's ``SO_REUSEPORT`` group
(``ringcast._core.steer_accepts``, a classic BPF program the kernel runs per new
connection; the group's sockets are ordered by when they started listening, so "the first
n" is whichever processes listened first). Connections already accepted stay where they
are: a process that no longer takes new ones serves its old ones to their end, and the
connections of a burst that arrived before the spread widened stay on the process that
took them.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable

from ringcast._core import steer_accepts
from ringcast.server.counters import HttpCounter, ManagerCounter, SharedCounters, http_row

SAMPLE_S = 0.25
UP_LOAD = 0.8
"""Cores of CPU per accepting HTTP process at which more processes take new connections."""
DOWN_LOAD = 0.5
"""Cores per process, for the processes that would be left, under which one fewer takes
new connections, once the load has stayed under it for ``DOWN_HOLD_S``."""
DOWN_HOLD_S = 5.0
BUSY_BEHIND = 0.25
"""A process behind (its loop late) counts only while it also used this much of a core in
the last sample: an idle process on a machine busy with other work runs late too, and
more processes taking connections would not help it."""
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
log = logging.getLogger("ringcast.server")


class SpreadPolicy:
    """How many of ``procs`` HTTP processes take new connections, from their load."""

    def __init__(self, procs: int) -> None:
        self.procs = procs
        self.among = 1
        self.calm_since: float | None = None

    def feed(self, load: float, now: float, behind: bool = False) -> int:
        """The number of processes for the load (cores of CPU) measured until ``now``
        (seconds, monotonic); ``behind``: a process is falling behind."""
        among = self.among
        if among < self.procs and (behind or load >= UP_LOAD * among):
            self.among = min(self.procs, among * 2)
            self.calm_since = None
        elif among > 1 and not behind and load < DOWN_LOAD * (among - 1):
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
    """The manager's side: samples the HTTP processes' load and publishes ``among``."""

    def __init__(self, procs: int, counters: SharedCounters, lag_signal: bool) -> None:
        self.policy = SpreadPolicy(procs)
        self.counters = counters
        self.lag_signal = lag_signal
        """The HTTP processes coalesce adaptively: a lingering one is behind."""
        self.last_sample = 0.0
        self.last_widened = 0.0
        self.cpu: dict[int, float] = {}
        """CPU seconds of each HTTP process (by pid) at the last sample."""
        self.busy: list[int] = []
        """The HTTP processes (by index) that used ``BUSY_BEHIND`` of a core or more in the
        last sample."""
        self.told: set[int] = set()
        """The pids that were listening when ``among`` was last sent to them."""
        self.blind = False
        """No process's CPU could be read (``/proc`` hidden): every process takes new
        connections from then on."""
        counters.set(ManagerCounter.SPREAD_AMONG, self.published(self.policy.among))

    def published(self, among: int) -> int:
        """The counter's value for ``among``: 0 (the kernel's own spread) for all of them."""
        return 0 if among >= self.policy.procs else among

    def behind(self) -> bool:
        """Whether a busy HTTP process's adaptive coalescing lingers now (its loop runs
        late); never without adaptive coalescing (``lag_signal`` False)."""
        return self.lag_signal and any(
            self.counters.read(http_row(i), HttpCounter.COALESCE_US) for i in self.busy
        )

    def tick(self, now: float, processes: Callable[[], dict[int, tuple[int, bool]]]) -> None:
        """Called by the manager's loop; ``processes()`` gives the HTTP processes' pids, each
        with its index and whether it listens yet. Widens at once for a busy process that is
        behind (at most every ``SAMPLE_S``); samples CPU every ``SAMPLE_S``. If ``among``
        changed, or a process started listening since, tells the listening ones to apply it."""
        if self.blind:
            return
        policy = self.policy
        before = policy.among
        may_widen = policy.among < policy.procs and now - self.last_widened >= SAMPLE_S
        if now - self.last_sample < SAMPLE_S:
            if not (may_widen and self.behind()):
                return
            ready = processes()
            policy.feed(0.0, now, True)
        else:
            ready = processes()
            elapsed = now - self.last_sample if self.last_sample else 0.0
            self.last_sample = now
            used, cpu, busy = 0.0, {}, []
            for pid, (index, _) in ready.items():
                t = cpu_seconds(pid)
                if t is not None:
                    cpu[pid] = t
                    own = t - self.cpu.get(pid, t)
                    used += own
                    if elapsed and own >= BUSY_BEHIND * elapsed:
                        busy.append(index)
            self.cpu, self.busy = cpu, busy
            lagging = self.behind()
            if ready and not cpu and cpu_seconds(os.getpid()) is None:
                log.warning(
                    "cannot read the HTTP processes' CPU time in /proc: new connections go "
                    "to every HTTP process from now on (as --spread all)"
                )
                self.blind = True
                policy.among = policy.procs
            elif not lagging or may_widen:  # lagging but widened just now: wait
                policy.feed(used / elapsed if elapsed else 0.0, now, lagging)
        if policy.among > before:
            self.last_widened = now
        listening = {pid for pid, (_, up) in ready.items() if up}
        if policy.among != before or not listening <= self.told:
            self.counters.set(ManagerCounter.SPREAD_AMONG, self.published(policy.among))
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
