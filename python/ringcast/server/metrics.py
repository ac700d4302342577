"""``GET /metrics``: Prometheus text from the shared counters of every process and the
store's figures (see docs/SERVER.md, "Metrics").

``prometheus-client`` renders it, through a custom collector that reads the shared counters
(``ringcast.server.counters``) at scrape time: not its multiprocess mode, which keeps a file
per process and metric and sums them itself, where ringcast already has one 256-byte row per
process that its owner writes with plain stores.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from ringcast.server.config import ServeConfig
from ringcast.server.counters import (
    HttpCounter,
    ManagerCounter,
    MirrorCounter,
    SharedCounters,
    WorkerCounter,
    http_row,
    loop_of,
    read_mirrors,
    worker_row,
)
from ringcast.server.store import StoreStats, StreamStore, StreamView

Samples = Sequence[tuple[Sequence[str], float]]
"""(label values, value) of each sample of a family."""


def _family(kind: str, name: str, help_: str, labels: Sequence[str], samples: Samples) -> Metric:
    """A counter (``name`` without its ``_total``: the exposition adds it) or a gauge."""
    family: CounterMetricFamily | GaugeMetricFamily
    if kind == "counter":
        family = CounterMetricFamily(f"ringcast_{name}", help_, labels=labels)
    else:
        family = GaugeMetricFamily(f"ringcast_{name}", help_, labels=labels)
    for values, value in samples:
        family.add_metric(values, value)
    return family


class SharedCountersCollector(Collector):
    """Every ringcast metric, from the counter rows of all processes and a snapshot of the
    store taken just before the scrape (the store is read with ``await``; a collector is
    called synchronously)."""

    def __init__(self, cfg: ServeConfig, counters: SharedCounters) -> None:
        self.cfg = cfg
        self.counters = counters
        self.snapshot: tuple[Sequence[StreamView], StoreStats] | None = None

    def describe(self) -> list[Metric]:
        return []  # no name checks at registration: the metrics exist only at a scrape

    def collect(self) -> Iterator[Metric]:
        assert self.snapshot is not None, "set the store snapshot before collecting"
        infos, stats = self.snapshot
        cfg, counters = self.cfg, self.counters
        by_state = {"running": 0, "done": 0, "cancelled": 0, "failed": 0}
        readers = 0
        for i in infos:
            by_state[i.state] = by_state.get(i.state, 0) + 1
            readers += i.readers
        http = [counters.read_row(http_row(i)) for i in range(cfg.http_procs)]
        workers = [counters.read_row(worker_row(cfg, i)) for i in range(cfg.job_rows)]
        mgr = counters.read_row(0)

        def total(rows: list[tuple[int, ...]], idx: int) -> int:
            return sum(r[idx] for r in rows)

        def per_http(idx: int, scale: float = 1.0) -> Samples:
            return [([str(i)], r[idx] * scale) for i, r in enumerate(http)]

        yield _family(
            "gauge",
            "sessions",
            "Sessions in the segment by state.",
            ["state"],
            [([s], n) for s, n in sorted(by_state.items())],
        )
        yield _family(
            "gauge", "session_slots", "Size of the session table.", [], [([], stats.max_sessions)]
        )
        yield _family(
            "gauge",
            "bytes_buffered",
            "Bytes held in live sessions' rings.",
            [],
            [([], stats.bytes_buffered)],
        )
        yield _family(
            "gauge",
            "segment_resident_bytes",
            "Memory the segment file really uses.",
            [],
            [([], stats.resident_bytes)],
        )
        yield _family(
            "gauge", "readers", "Readers attached across all processes.", [], [([], readers)]
        )
        yield _family(
            "counter",
            "resumes",
            "Stream reads from an offset above 0.",
            [],
            [([], total(http, HttpCounter.RESUMES))],
        )
        yield _family(
            "counter",
            "offsets_lost",
            "Reads refused (410) or ended because the offset was dropped.",
            [],
            [([], total(http, HttpCounter.OFFSETS_LOST))],
        )
        yield _family(
            "counter",
            "evictions",
            "Sessions evicted, by reason.",
            ["reason"],
            [
                (["ttl"], mgr[ManagerCounter.EVICTIONS_TTL]),
                (["idle"], mgr[ManagerCounter.EVICTIONS_IDLE]),
                (
                    ["lru"],
                    # The manager's sweep, --evict-running's creates, and the segment's own
                    # count of finished sessions its creates evicted.
                    mgr[ManagerCounter.EVICTIONS_LRU]
                    + total(http, HttpCounter.EVICTIONS_LRU)
                    + stats.lru_evictions,
                ),
            ],
        )
        yield _family(
            "counter",
            "dead_producers",
            "Sessions failed because their producer process died.",
            [],
            [([], mgr[ManagerCounter.DEAD_PRODUCERS])],
        )
        yield _family(
            "counter",
            "restarts",
            "Child processes restarted by the manager.",
            ["role"],
            [
                (["http"], mgr[ManagerCounter.RESTARTS_HTTP]),
                (["worker"], mgr[ManagerCounter.RESTARTS_WORKER]),
                (["mirror"], mgr[ManagerCounter.RESTARTS_MIRROR]),
            ],
        )
        yield _family(
            "gauge",
            "http_processes_accepting",
            "HTTP processes that new connections go to (--spread adaptive: as many as keep "
            "up; --spread all: every one).",
            [],
            [
                (
                    [],
                    cfg.http_procs
                    if any(r[HttpCounter.STEER_REFUSED] for r in http)
                    else mgr[ManagerCounter.SPREAD_AMONG] or cfg.http_procs,
                )
            ],
        )
        yield _family(
            "counter",
            "http_requests",
            "Requests per HTTP process.",
            ["process"],
            per_http(HttpCounter.REQUESTS),
        )
        yield _family(
            "counter",
            "http_connections_passed",
            "GET /v1/stream connections this process passed to the HTTP process producing "
            "their stream.",
            ["process"],
            per_http(HttpCounter.PASSED),
        )
        yield _family(
            "counter",
            "http_connection_passes_failed",
            "GET /v1/stream connections this process could not pass to their producer (gone, "
            "or its queue full) and served itself.",
            ["process"],
            per_http(HttpCounter.PASS_FAILED),
        )
        yield _family(
            "counter",
            "http_errors",
            "Error responses per HTTP process and class.",
            ["process", "class"],
            [
                ([str(i), c], r[idx])
                for i, r in enumerate(http)
                for c, idx in (("4xx", HttpCounter.ERRORS_4XX), ("5xx", HttpCounter.ERRORS_5XX))
            ],
        )
        yield _family(
            "counter",
            "http_streams_started",
            "Completion requests accepted.",
            ["process"],
            per_http(HttpCounter.STREAMS_STARTED),
        )
        yield _family(
            "counter",
            "http_bytes_sent",
            "Stream body bytes sent.",
            ["process"],
            per_http(HttpCounter.BYTES_SENT),
        )
        yield _family(
            "gauge",
            "http_readers_active",
            "Streaming responses in progress.",
            ["process"],
            per_http(HttpCounter.READERS_ACTIVE),
        )
        yield _family(
            "gauge",
            "http_coalesce_seconds",
            "How long this process's pumps now wait after a pass (adaptive coalescing).",
            ["process"],
            per_http(HttpCounter.COALESCE_US, 1e-6),
        )
        yield _family(
            "counter",
            "slow_readers_detached",
            "Clients whose full write buffer detached them from the live fan-out.",
            [],
            [([], total(http, HttpCounter.DETACHED))],
        )
        yield _family(
            "counter",
            "write_timeouts",
            "Connections reset because their client read nothing for --write-timeout.",
            [],
            [([], total(http, HttpCounter.WRITE_TIMEOUTS))],
        )
        yield _family(
            "counter",
            "handoff_failures",
            "Jobs no worker adopted.",
            [],
            [([], total(http, HttpCounter.HANDOFF_FAILED))],
        )
        yield _family(
            "counter",
            "worker_jobs",
            "Jobs per worker (with --workers 0: per HTTP process) and outcome.",
            ["worker", "outcome"],
            [
                ([str(i), o], r[idx])
                for i, r in enumerate(workers)
                for o, idx in (
                    ("started", WorkerCounter.JOBS_STARTED),
                    ("done", WorkerCounter.JOBS_DONE),
                    ("failed", WorkerCounter.JOBS_FAILED),
                    ("cancelled", WorkerCounter.JOBS_CANCELLED),
                )
            ],
        )
        yield _family(
            "gauge",
            "worker_jobs_active",
            "Jobs generating right now, per worker (with --workers 0: per HTTP process).",
            ["worker"],
            [([str(i)], r[WorkerCounter.ACTIVE]) for i, r in enumerate(workers)],
        )
        yield _family(
            "counter",
            "worker_tokens",
            "Tokens (events) produced, per worker (with --workers 0: per HTTP process).",
            ["worker"],
            [([str(i)], r[WorkerCounter.TOKENS]) for i, r in enumerate(workers)],
        )
        yield _family(
            "gauge",
            "event_loop_info",
            "The event loop each child process runs (1 on its line; --event-loop).",
            ["role", "index", "loop"],
            [
                ([role, str(i), loop_of(r)], 1)
                for role, rows in (("http", http), ("worker", workers[: cfg.workers]))
                for i, r in enumerate(rows)
            ],
        )
        if cfg.clustered:
            yield from _mirror_metrics(
                read_mirrors(counters, cfg), total(http, HttpCounter.REDIS_ERRORS)
            )


def _mirror_metrics(row: tuple[int, ...], http_redis_errors: int) -> Iterator[Metric]:
    """The figures of a node with ``--redis``: its mirror processes' (their counter rows,
    combined) and the HTTP processes' failed calls to Redis."""
    m = MirrorCounter
    for name, kind, help_, value in (
        ("mirror_connected", "gauge",
         "1 while the last call to Redis of every mirror process succeeded.",
         row[m.CONNECTED]),
        ("mirror_lag_bytes", "gauge", "Bytes produced here and not yet in Redis.",
         row[m.LAG_BYTES]),
        ("mirror_lag_seconds", "gauge", "Age of the oldest byte not yet in Redis.",
         row[m.LAG_US] / 1e6),
        ("mirror_sessions", "gauge", "Local sessions the mirror processes track.",
         row[m.SESSIONS]),
        ("mirror_windows", "counter", "Flush windows that sent something.", row[m.WINDOWS]),
        ("mirror_entries", "counter", "Stream entries written to Redis.", row[m.ENTRIES]),
        ("mirror_bytes", "counter", "Stream bytes written to Redis.", row[m.BYTES]),
        ("mirror_gaps", "counter",
         "Ranges dropped from a ring before they could be mirrored (remote readers get 410).",
         row[m.GAPS]),
        ("mirror_gap_bytes", "counter", "Bytes in those ranges.", row[m.GAP_BYTES]),
        ("mirror_controls", "counter",
         "Cancels and replaces from other nodes carried out here.", row[m.CONTROLS]),
        ("redis_reconnects", "counter", "Times the mirror found Redis back after errors.",
         row[m.RECONNECTS]),
    ):  # fmt: skip
        yield _family(kind, name, help_, [], [([], value)])
    yield _family(
        "counter",
        "redis_errors",
        "Failed calls to Redis, by process role.",
        ["role"],
        [(["mirror"], row[m.REDIS_ERRORS]), (["http"], http_redis_errors)],
    )


class Metrics:
    """``/metrics`` of one HTTP process."""

    def __init__(self, cfg: ServeConfig, store: StreamStore, counters: SharedCounters) -> None:
        self.store = store
        self.collector = SharedCountersCollector(cfg, counters)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)

    async def render(self) -> bytes:
        """The Prometheus text format (0.0.4)."""
        self.collector.snapshot = (await self.store.list(), self.store.stats())
        try:
            return generate_latest(self.registry)
        finally:
            self.collector.snapshot = None
