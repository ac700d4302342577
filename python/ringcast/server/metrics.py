"""``GET /metrics``: Prometheus text from the shared counters of every process and the
store's figures (see docs/SERVER.md, "Metrics")."""

from __future__ import annotations

from collections.abc import Callable

from ringcast.server.config import ServeConfig
from ringcast.server.counters import (
    HttpCounter,
    ManagerCounter,
    MirrorCounter,
    SharedCounters,
    WorkerCounter,
    http_row,
    loop_of,
    mirror_row,
    worker_row,
)
from ringcast.server.store import StreamStore


async def render(cfg: ServeConfig, store: StreamStore, counters: SharedCounters) -> bytes:
    """The Prometheus text of ``/metrics``."""
    infos = await store.list()
    stats = store.stats()
    by_state = {"running": 0, "done": 0, "cancelled": 0, "failed": 0}
    readers = 0
    for i in infos:
        by_state[i.state] = by_state.get(i.state, 0) + 1
        readers += i.readers
    http = [counters.read_row(http_row(i)) for i in range(cfg.http_procs)]
    workers = [counters.read_row(worker_row(cfg, i)) for i in range(cfg.workers)]
    mgr = counters.read_row(0)
    out: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, int | float]]) -> None:
        out.append(f"# HELP ringcast_{name} {help_}")
        out.append(f"# TYPE ringcast_{name} {kind}")
        out.extend(f"ringcast_{name}{labels} {value}" for labels, value in samples)

    def total(rows: list[tuple[int, ...]], idx: int) -> int:
        return sum(r[idx] for r in rows)

    metric(
        "sessions",
        "gauge",
        "Sessions in the segment by state.",
        [(f'{{state="{s}"}}', n) for s, n in sorted(by_state.items())],
    )
    metric("session_slots", "gauge", "Size of the session table.", [("", stats.max_sessions)])
    metric(
        "bytes_buffered",
        "gauge",
        "Bytes held in live sessions' rings.",
        [("", stats.bytes_buffered)],
    )
    metric(
        "segment_resident_bytes",
        "gauge",
        "Memory the segment file really uses.",
        [("", stats.resident_bytes)],
    )
    metric("readers", "gauge", "Readers attached across all processes.", [("", readers)])
    metric(
        "resumes_total",
        "counter",
        "Stream reads from an offset above 0.",
        [("", total(http, HttpCounter.RESUMES))],
    )
    metric(
        "offsets_lost_total",
        "counter",
        "Reads refused (410) or ended because the offset was dropped.",
        [("", total(http, HttpCounter.OFFSETS_LOST))],
    )
    metric(
        "evictions_total",
        "counter",
        "Sessions evicted, by reason.",
        [
            ('{reason="ttl"}', mgr[ManagerCounter.EVICTIONS_TTL]),
            ('{reason="idle"}', mgr[ManagerCounter.EVICTIONS_IDLE]),
            (
                '{reason="lru"}',
                # The manager's sweep, --evict-running's creates, and the segment's own count
                # of finished sessions its creates evicted.
                mgr[ManagerCounter.EVICTIONS_LRU]
                + total(http, HttpCounter.EVICTIONS_LRU)
                + stats.lru_evictions,
            ),
        ],
    )
    metric(
        "dead_producers_total",
        "counter",
        "Sessions failed because their producer process died.",
        [("", mgr[ManagerCounter.DEAD_PRODUCERS])],
    )
    metric(
        "restarts_total",
        "counter",
        "Child processes restarted by the manager.",
        [
            ('{role="http"}', mgr[ManagerCounter.RESTARTS_HTTP]),
            ('{role="worker"}', mgr[ManagerCounter.RESTARTS_WORKER]),
            ('{role="mirror"}', mgr[ManagerCounter.RESTARTS_MIRROR]),
        ],
    )
    metric(
        "http_requests_total",
        "counter",
        "Requests per HTTP process.",
        [(f'{{process="{i}"}}', r[HttpCounter.REQUESTS]) for i, r in enumerate(http)],
    )
    metric(
        "http_errors_total",
        "counter",
        "Error responses per HTTP process and class.",
        [
            (f'{{process="{i}",class="{c}"}}', r[idx])
            for i, r in enumerate(http)
            for c, idx in (("4xx", HttpCounter.ERRORS_4XX), ("5xx", HttpCounter.ERRORS_5XX))
        ],
    )
    metric(
        "http_streams_started_total",
        "counter",
        "Completion requests accepted.",
        [(f'{{process="{i}"}}', r[HttpCounter.STREAMS_STARTED]) for i, r in enumerate(http)],
    )
    metric(
        "http_bytes_sent_total",
        "counter",
        "Stream body bytes sent.",
        [(f'{{process="{i}"}}', r[HttpCounter.BYTES_SENT]) for i, r in enumerate(http)],
    )
    metric(
        "http_readers_active",
        "gauge",
        "Streaming responses in progress.",
        [(f'{{process="{i}"}}', r[HttpCounter.READERS_ACTIVE]) for i, r in enumerate(http)],
    )
    metric(
        "http_coalesce_seconds",
        "gauge",
        "How long this process's pumps now wait after a pass (adaptive coalescing).",
        [(f'{{process="{i}"}}', r[HttpCounter.COALESCE_US] / 1e6) for i, r in enumerate(http)],
    )
    metric(
        "slow_readers_detached_total",
        "counter",
        "Clients whose full write buffer detached them from the live fan-out.",
        [("", total(http, HttpCounter.DETACHED))],
    )
    metric(
        "write_timeouts_total",
        "counter",
        "Connections reset because their client read nothing for --write-timeout.",
        [("", total(http, HttpCounter.WRITE_TIMEOUTS))],
    )
    metric(
        "handoff_failures_total",
        "counter",
        "Jobs no worker adopted.",
        [("", total(http, HttpCounter.HANDOFF_FAILED))],
    )
    metric(
        "worker_jobs_total",
        "counter",
        "Jobs per worker and outcome.",
        [
            (f'{{worker="{i}",outcome="{o}"}}', r[idx])
            for i, r in enumerate(workers)
            for o, idx in (
                ("started", WorkerCounter.JOBS_STARTED),
                ("done", WorkerCounter.JOBS_DONE),
                ("failed", WorkerCounter.JOBS_FAILED),
                ("cancelled", WorkerCounter.JOBS_CANCELLED),
            )
        ],
    )
    metric(
        "worker_jobs_active",
        "gauge",
        "Jobs generating right now.",
        [(f'{{worker="{i}"}}', r[WorkerCounter.ACTIVE]) for i, r in enumerate(workers)],
    )
    metric(
        "worker_tokens_total",
        "counter",
        "Tokens (events) produced.",
        [("", total(workers, WorkerCounter.TOKENS))],
    )
    metric(
        "event_loop_info",
        "gauge",
        "The event loop each child process runs (1 on its line; --event-loop).",
        [
            (f'{{role="{role}",index="{i}",loop="{loop_of(r)}"}}', 1)
            for role, rows in (("http", http), ("worker", workers))
            for i, r in enumerate(rows)
        ],
    )
    if cfg.clustered:
        mirror_metrics(
            metric, counters.read_row(mirror_row(cfg)), total(http, HttpCounter.REDIS_ERRORS)
        )
    return ("\n".join(out) + "\n").encode()


def mirror_metrics(
    metric: Callable[[str, str, str, list[tuple[str, int | float]]], None],
    row: tuple[int, ...],
    http_redis_errors: int,
) -> None:
    """The figures of a node with ``--redis``: its mirror's (from the mirror's counter row)
    and the HTTP processes' failed calls to Redis."""
    m = MirrorCounter
    for name, kind, help_, value in (
        ("mirror_connected", "gauge", "1 while the mirror's last call to Redis succeeded.",
         row[m.CONNECTED]),
        ("mirror_lag_bytes", "gauge", "Bytes produced here and not yet in Redis.",
         row[m.LAG_BYTES]),
        ("mirror_lag_seconds", "gauge", "Age of the oldest byte not yet in Redis.",
         row[m.LAG_US] / 1e6),
        ("mirror_sessions", "gauge", "Local sessions the mirror tracks.", row[m.SESSIONS]),
        ("mirror_windows_total", "counter", "Flush windows that sent something.",
         row[m.WINDOWS]),
        ("mirror_entries_total", "counter", "Stream entries written to Redis.", row[m.ENTRIES]),
        ("mirror_bytes_total", "counter", "Stream bytes written to Redis.", row[m.BYTES]),
        ("mirror_gaps_total", "counter",
         "Ranges dropped from a ring before they could be mirrored (remote readers get 410).",
         row[m.GAPS]),
        ("mirror_gap_bytes_total", "counter", "Bytes in those ranges.", row[m.GAP_BYTES]),
        ("mirror_controls_total", "counter",
         "Cancels and replaces from other nodes carried out here.", row[m.CONTROLS]),
        ("redis_reconnects_total", "counter", "Times the mirror found Redis back after errors.",
         row[m.RECONNECTS]),
    ):  # fmt: skip
        metric(name, kind, help_, [("", value)])
    metric(
        "redis_errors_total",
        "counter",
        "Failed calls to Redis, by process role.",
        [('{role="mirror"}', row[m.REDIS_ERRORS]), ('{role="http"}', http_redis_errors)],
    )
