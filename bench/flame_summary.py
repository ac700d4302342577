"""Where an event's microseconds go: the folded stacks of ``http_fanout.py --profile`` sorted
into the steps of the per-event path, per process.

    python bench/flame_summary.py /tmp/flame/1000x1-20tps-ringcast-1p-*.pyspy.folded \
        --cpu-us worker0=12.5,http0=25.1

Each stack goes to the first step (in the order of ``STEPS``) one of whose patterns matches
one of its frames, so a ``send`` under an append counts as the wake, not the append. Idle
samples (the loop waiting in ``epoll_wait``) are left out: what remains is the process's busy
time, split into shares. With ``--cpu-us ROLE=US`` (the process's measured CPU per delivered
event, from the run's table) each share is also shown in microseconds per event.

py-spy samples wall-clock time of a thread that is not idle, so on a machine where the
process waits for a CPU its shares are of busy wall time, close to but not exactly CPU time;
perf's ``cpu-clock`` samples are CPU time, but its stacks (frame pointers) lose most Python and
Rust frames, so its file is best read for the kernel's share (``write``/TCP, ``epoll``)."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

IDLE = re.compile(r"^(epoll_pwait|epoll_wait|__GI_epoll_wait|do_epoll_wait)\b")

STEPS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    # (side, step, frame patterns); order matters: the first step that matches wins.
    (
        "http",
        "write: send to the client socket",
        ("UVStream_write", "sock_write_iter", "tcp_sendmsg", "__GI___libc_write", "ksys_write"),
    ),
    (
        "both",
        "wake: notifier datagram send",
        (r"dgram::Senders::send", r"unix_dgram_sendmsg", r"flush_wakes"),
    ),
    ("http", "wake: arm the notifier (sched_yield)", (r"Notifier::arm", r"sched_yield")),
    ("http", "producer checks (/proc/<pid>/stat)", (r"_check_producers", r"stat_of")),
    # Before the drain: since the pumps became standing watches (978e7a4) they run inside
    # the notifier's readiness callback, whose own work stays the drain's.
    (
        "http",
        "pump: read the ring, frame, fan out",
        (r"Pump\.", r"FanOut\.relay", r"\baread\b", r"_LoopHub\.wait"),
    ),
    (
        "http",
        "drain: notifier fd -> futures",
        (
            r"_LoopHub\._on_ready",
            r"Notifier::drain",
            r"Notifier::scan",
            r"__pymethod_scan__",
            r"_LoopHub\._wake",
        ),
    ),
    ("http", "coalescing timer", (r"Coalescing\.run",)),
    (
        "http",
        "requests: parse, POST, hand-off",
        (
            r"Connection\._run",
            r"App\.handle",
            r"Dispatcher",
            r"data_received",
            r"connection_made",
            r"_accept",
        ),
    ),
    (
        "worker",
        "append: Rust ring write",
        (
            r"Writer::append",
            r"Writer::write",
            r"Emitter\._append",
            r"Writer\.write",
            r"__pymethod_write__",
            r"__pymethod_get_total_bytes__",
            r"fallocate",  # backing the ring's next pages (py-spy may lose the Rust frame)
        ),
    ),
    (
        "worker",
        "framing: JSON chunk + SSE id",
        (r"frame_event", r"Emitter\._chunk", r"msgspec", r"JSONEncoder"),
    ),
    ("worker", "counters", (r"SharedCounters\.inc",)),
    (
        "both",
        "generator: the model (timestamps, its sleeps)",
        (r"\btimestamps\b", r"\btimestamped\b", r"sleep \(asyncio", r"timestamp_events"),
    ),
    (
        "worker",
        "jobs: adopt, start, finish, cancel poll",
        (r"WorkerApp\.handle", r"watch_cancel", r"finalize", r"Emitter\.(__init__|finish)"),
    ),
    (
        "baseline",
        "broadcast: frame + write to readers",
        (
            r"BroadcastStore\.send",
            r"Broadcast",
        ),
    ),
    (
        "baseline",
        "requests: parse, attach",
        (r"_handle \(", r"BroadcastStore\.attach", r"MemoryStore", r"Session\.tail"),
    ),
    ("both", "gc", (r"gc_collect",)),
    ("both", "event loop, task switches, other", (r".",)),
)


def load(path: Path) -> list[tuple[list[str], int]]:
    """Folded stacks (``a;b;c N``, root first) with line numbers and hashes dropped."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = [
            re.sub(r"::h[0-9a-f]{16}", "", re.sub(r":\d+\)", ")", f)) for f in stack.split(";")
        ]
        out.append((frames, int(n)))
    return out


def step_of(frames: list[str]) -> str:
    for _, step, patterns in STEPS:
        for p in patterns:
            rx = re.compile(p)
            if any(rx.search(f) for f in frames):
                return step
    return "other"


def summarise(path: Path, cpu_us: float | None) -> str:
    stacks = load(path)
    busy = [(f, n) for f, n in stacks if not IDLE.match(f[-1])]
    total = sum(n for _, n in stacks)
    busy_n = sum(n for _, n in busy)
    shares: dict[str, int] = {}
    for frames, n in busy:
        step = step_of(frames)
        shares[step] = shares.get(step, 0) + n
    lines = [f"{path.name}: {busy_n} busy samples of {total}"]
    for step, n in sorted(shares.items(), key=lambda kv: -kv[1]):
        share = n / max(busy_n, 1)
        us = f"{share * cpu_us:6.1f} us/event" if cpu_us is not None else ""
        lines.append(f"  {100 * share:5.1f}%  {us}  {step}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folded", nargs="+", type=Path)
    ap.add_argument(
        "--cpu-us",
        default="",
        help="comma-separated ROLE=US: a process's CPU per delivered event, to turn shares "
        "into microseconds (ROLE as in the file name: worker0, http0, server)",
    )
    args = ap.parse_args(argv)
    cpu: dict[str, float] = {}
    for item in filter(None, args.cpu_us.split(",")):
        role, _, us = item.partition("=")
        try:
            cpu[role.strip()] = float(us)
        except ValueError:
            ap.error(f"--cpu-us wants ROLE=MICROSECONDS, got {item!r}")
    for path in args.folded:
        if not path.exists():
            ap.error(f"{path}: no such file")
        m = re.search(r"-([a-z]+\d*)\.[a-z-]+\.folded$", path.name)
        print(summarise(path, cpu.get(m.group(1)) if m else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
