"""The configuration of ``ringcast serve``, defined once: :class:`ServeConfig` holds every
setting and its default; the command line (:func:`configure`) takes its defaults from it, and
:func:`config_from_args` builds it from the parsed arguments. The supervisor writes it to the
run directory (``config.json``, mode 0600) and every child reads it from there.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import resource
import secrets

import msgspec

from ringcast._args import size_arg
from ringcast.trace import parse_speed

ANON_OWNER = "~anon"
"""Owner namespace of requests without ``X-Conversation-Id``: never listed, never addressable
by clients (their ids are random), cancelled when the client disconnects."""

KEEPALIVE_TIMEOUT = 75.0
"""Seconds an idle keep-alive connection stays open (nginx's default). Not an option: no
client has needed another value."""


def key_digest(key: str) -> str:
    """The SHA-256 of an API key, as the config carries it (the key itself never leaves the
    supervisor); a key's owner namespace is the first 16 hex digits."""
    return hashlib.sha256(key.encode()).hexdigest()


# Hours of resumable sessions at a busy node (a million at 300 streams/s is ~58 min): the
# registry's cost does not grow with the table, and the segment is sparse (memory follows the
# sessions held, ~5 KiB per small finished one; see docs/ARCHITECTURE.md).
DEFAULT_MAX_SESSIONS = 1 << 20
# The file is sparse, but its apparent size still meets limits (16 TiB per file on ext4, the
# address space of every process that maps it): a default table keeps it within this.
DEFAULT_SEGMENT_LIMIT = 4 << 40


AUTO_HTTP_PROCS_MAX = 32
"""The most HTTP processes ``--http-procs auto`` starts: half the segment's process rows
(``ringcast.MAX_PROCESSES``), the rest left to the manager, the workers and the processes of
users of the library that attach to the segment."""


CGROUP_ROOT = "/sys/fs/cgroup"


def _cpu_quota(directory: str) -> float | None:
    """CPUs the quota files in one cgroup directory allow (v2 ``cpu.max``: ``QUOTA PERIOD`` or
    ``max PERIOD``; v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``, -1 for none), None when
    there is no quota there."""
    try:
        with open(os.path.join(directory, "cpu.max"), encoding="ascii") as f:
            quota, period = f.read().split()
        if quota == "max":
            return None
        q, p = int(quota), int(period)
        return q / p if q > 0 and p > 0 else None  # "0 0" was a ZeroDivisionError at start
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(directory, "cpu.cfs_quota_us"), encoding="ascii") as f:
            quota_us = int(f.read())
        with open(os.path.join(directory, "cpu.cfs_period_us"), encoding="ascii") as f:
            period_us = int(f.read())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def cgroup_cpu_limit(proc_cgroup: str = "/proc/self/cgroup") -> float | None:
    """The tightest CPU quota over this process's cgroup and its ancestors, in CPUs (cgroup
    v2, and v1's ``cpu`` controller where a host still mounts it), None without one."""
    try:
        # A cgroup's name may be any bytes but "/" (``mkdir café``): decoded as file names
        # are, so that the paths built from it open what the kernel named.
        with open(proc_cgroup, "rb") as f:
            lines = os.fsdecode(f.read()).splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and not controllers:  # v2 (unified), or hybrid's unified part
            bases = [CGROUP_ROOT, os.path.join(CGROUP_ROOT, "unified")]
        elif "cpu" in controllers.split(","):  # v1: mounted as cpu, or cpu,cpuacct
            bases = [os.path.join(CGROUP_ROOT, controllers), os.path.join(CGROUP_ROOT, "cpu")]
        else:
            continue
        for base in dict.fromkeys(bases):
            level = path.rstrip("/")
            while True:
                quota = _cpu_quota(base + level)
                if quota is not None:
                    limits.append(quota)
                if not level:
                    break
                level = os.path.dirname(level).rstrip("/")
    return min(limits, default=None)


def usable_cores() -> int:
    """CPUs this process may use: its affinity mask (``taskset``, cpusets), capped by the
    CPU quota of its cgroup (:func:`cgroup_cpu_limit`, rounded up: a container given 1.5
    CPUs on a 64-core host counts 2), at least 1."""
    n = len(os.sched_getaffinity(0))
    limit = cgroup_cpu_limit()
    if limit is not None:
        n = min(n, math.ceil(limit))
    return max(1, n)


def auto_http_procs(cores: int, workers: int) -> int:
    """``--http-procs auto``: one HTTP process per core the workers leave (every core with
    ``--workers 0``), at least one and at most ``AUTO_HTTP_PROCS_MAX``.

    Every process of ``ringcast serve`` is busy in proportion to the events it moves (the
    workers to every event produced, the HTTP processes to every event produced there and
    delivered), so one process per core is the most that can run at once. With ``auto``,
    new connections go to as few of them as keep up (``--spread adaptive``,
    :mod:`ringcast.server.steering`): one while it does, so a small load costs what one
    process costs, and more once the manager measures them saturated, so a large one gets
    every core. On a large machine this is one per core less one per worker."""
    return max(1, min(AUTO_HTTP_PROCS_MAX, cores - workers))


def _whole_number(text: str, low: int, high: int | None, refusal: str) -> int:
    """``text`` as a whole number from ``low`` to ``high`` (None: no upper bound); else the
    argparse error ``'<text>' is not <refusal>``."""
    try:
        n = int(text)
    except ValueError:
        n = None
    if n is None or n < low or (high is not None and n > high):
        raise argparse.ArgumentTypeError(f"{text!r} is not {refusal}")
    return n


def http_procs_arg(text: str) -> int:
    """argparse ``type`` of ``--http-procs``: ``auto`` (0, resolved by
    :func:`config_from_args`) or a number of processes >= 1."""
    if text.strip().lower() == "auto":
        return 0
    return _whole_number(
        text, 1, None, "a number of HTTP processes: give auto or a whole number >= 1"
    )


def port_arg(text: str) -> int:
    """argparse ``type`` of ``--port``: a TCP port, 0 to 65535 (0: pick a free one)."""
    return _whole_number(
        text, 0, 65535, "a TCP port: give a whole number from 0 to 65535 (0 = pick a free one)"
    )


def id_len_arg(text: str) -> int:
    """argparse ``type`` of ``--max-id-len``: bytes, 256 to 65536 (the segment's limits)."""
    return _whole_number(
        text,
        256,
        65536,
        "a conversation id length: give a whole number of bytes from 256 to 65536",
    )


def default_max_sessions(session_bytes: int) -> int:
    """The table size when ``--max-sessions`` is not given: ``DEFAULT_MAX_SESSIONS``, fewer
    for rings so large that the segment file would pass ``DEFAULT_SEGMENT_LIMIT``."""
    return max(1024, min(DEFAULT_MAX_SESSIONS, DEFAULT_SEGMENT_LIMIT // max(session_bytes, 1)))


MAX_DEFAULT_MIRROR_PROCS = 8


def default_mirror_procs(cores: int) -> int:
    """Mirror processes when ``--mirror-procs`` is not given: a quarter of the ``cores``
    (:func:`usable_cores`), at least one and at most ``MAX_DEFAULT_MIRROR_PROCS``.

    A mirror's cost is per stream that changed in a window (~18 us of CPU, measured on a
    loaded VM: ~1,400 streams at 50 tokens/s per core at a 25 ms window; docs/CLUSTER.md,
    "Sizing"), and the streams a node runs grow with its size, so its mirror capacity does
    too, while the mirrors together never take more than a quarter of its CPU from the
    fan-out and the workers. An idle mirror process costs next to nothing (its share of the
    session table listed once a window). Past eight, Redis (each mirror adds its own
    pipeline) is the limit, not the mirror."""
    return max(1, min(MAX_DEFAULT_MIRROR_PROCS, cores // 4))


class ServeConfig(msgspec.Struct, kw_only=True):
    host: str = "127.0.0.1"
    port: int = 8080
    http_procs: int = 0  # 0: auto (auto_http_procs), resolved by config_from_args
    spread: str = "all"  # or "adaptive" (ringcast.server.steering); see config_from_args
    pass_readers: bool = True  # ringcast.server.passing (with --workers 0 only)
    workers: int = 0  # 0: each HTTP process runs the jobs it takes (job_rows)
    segment: str = ""
    max_sessions: int = DEFAULT_MAX_SESSIONS  # from the command line: default_max_sessions()
    max_sessions_per_key: int = 0  # 0: half of max_sessions with 2+ keys (session_quota)
    session_bytes: int = 4 * 1024 * 1024
    max_id_len: int = 256
    ttl: float = 300.0
    idle_timeout: float = 600.0
    max_memory: int = 0
    evict_running: bool = False
    keep_segment: bool = False
    key_digests: list[str] = msgspec.field(default_factory=list)
    resume_secret: str = ""
    """Hex key of the resume tokens' HMAC (ringcast.server.resume_token): random per run,
    made with the keys."""
    model_name: str = "ringcast-synthetic"
    tokens_per_s: float = 50.0
    prefill_s: float = 0.0
    default_max_tokens: int = 64
    upstream: str = ""
    upstream_api_key: str = ""
    upstream_ca_file: str = ""
    generator: str = ""
    replay: str = ""
    replay_speed: float = 1.0  # 0 = as fast as possible
    max_body: int = 1 << 20
    max_conns_per_client: int = 0  # 0: a quarter of the open-file limit (conns_per_client)
    write_timeout: float = 120.0
    ds_long_poll_timeout: float = 20.0
    sse_ping_interval: float = 30.0
    coalesce_ms: float = 40.0
    coalesce: str = "adaptive"  # or "always"
    cors_origins: list[str] = msgspec.field(default_factory=list)
    run_dir: str = ""
    log_level: str = "INFO"
    event_loop: str = "uvloop"
    redis_url: str = ""
    """Mirror every stream to this Redis (``--redis``); empty with ``redis_cluster`` empty:
    no mirror, nothing touches the network."""
    redis_cluster: str = ""
    """Seed nodes ``HOST:PORT[,HOST:PORT...]`` of a Redis Cluster (``--redis-cluster``)."""
    node_id: str = ""
    """This node's name in Redis (default: host name and port, filled in by the supervisor)."""
    advertise_url: str = ""
    """Where the other nodes reach this node's HTTP server: they forward writes of the
    Durable Streams this node holds to it (default ``http://<host>:<port>``, with the
    machine's host name for a wildcard ``--host``; filled in by the supervisor)."""
    node_instance: str = ""
    """Identity of this run of the node, drawn by the supervisor: the sessions a previous run
    left running in Redis are that run's, and end ``node_lost``."""
    mirror_ms: float = 25.0
    node_lease_ms: int = 3000
    mirror_procs: int = 1
    """Mirror processes (``--mirror-procs``; from the command line by default
    :func:`default_mirror_procs`)."""

    @property
    def job_rows(self) -> int:
        """Rows of job counters (``WorkerCounter``): one per worker process, or with
        ``--workers 0`` one per HTTP process (each runs the jobs it takes, counted in the row
        of the worker of its index)."""
        return self.workers or self.http_procs

    @property
    def clustered(self) -> bool:
        """Streams are mirrored to Redis and served from it on other nodes."""
        return bool(self.redis_url or self.redis_cluster)

    @property
    def steered(self) -> bool:
        """New connections go to as few HTTP processes as keep up (``--spread adaptive``
        with more than one: :mod:`ringcast.server.steering`)."""
        return self.spread == "adaptive" and self.http_procs > 1

    @property
    def adaptive_coalescing(self) -> bool:
        """The HTTP processes coalesce while they fall behind (``Coalescing.run``)."""
        return self.coalesce == "adaptive" and self.coalesce_ms > 0

    @property
    def passes_readers(self) -> bool:
        """A GET of a stream a sibling HTTP process produces is passed there
        (``--pass-readers`` with the jobs in several HTTP processes, one node's streams
        only: :mod:`ringcast.server.passing`)."""
        return (
            self.pass_readers and self.workers == 0 and self.http_procs > 1 and not self.clustered
        )

    def session_quota(self) -> int:
        """Running sessions one key may hold at once, 0 for no limit but the table's
        (``--max-sessions-per-key``; by default, with two keys or more, half the table, so
        no one key can fill it and lock the others out; with one key or none there is no
        other key to lock out)."""
        if self.max_sessions_per_key:
            return self.max_sessions_per_key
        return max(1, self.max_sessions // 2) if len(self.key_digests) >= 2 else 0

    def conns_per_client(self) -> int:
        """Connections one remote address may hold open in one HTTP process
        (``--max-conns-per-client``; by default a quarter of the process's open-file limit,
        so one client cannot take every descriptor and lock the others out)."""
        if self.max_conns_per_client:
            return self.max_conns_per_client
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        return max(16, soft // 4) if soft != resource.RLIM_INFINITY else 0


_D = ServeConfig()
config_decoder = msgspec.json.Decoder(ServeConfig)


def load_config(path: str) -> ServeConfig:
    with open(path, "rb") as f:
        return config_decoder.decode(f.read())


def dump_config(cfg: ServeConfig) -> bytes:
    return msgspec.json.encode(cfg)


def speed_arg(text: str) -> float:
    """argparse type of ``ringcast serve --speed``: a positive factor, or 0.0 for ``max``
    (JSON has no infinity, and the value travels to the workers in the config)."""
    try:
        v = parse_speed(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return 0.0 if math.isinf(v) else v


SERVE_DESCRIPTION = """\
Serve OpenAI-compatible streaming completions whose streams survive disconnects.

A request with an X-Conversation-Id header creates a session: its SSE bytes are kept in a
shared-memory ring, generation continues if the client goes away, and any number of clients
can read it from any byte offset through any HTTP process:

  POST   /v1/chat/completions, /v1/completions   (stream true or false)
  GET    /v1/stream?conv_id=ID&from=N            (or /v1/stream/ID?from=N, or Last-Event-ID)
  POST   /v1/streams/lookup   {"conversation_ids": [...]}
  GET    /v1/streams[?conversation_id=X]         (only the caller's key's sessions)
  DELETE /v1/stream?conv_id=ID                   (cancel; 204 also for unknown ids)
  GET    /health, /v1/models, /metrics
  PUT|POST|GET|HEAD|DELETE /ds/v1/stream/NAME    (the Durable Streams protocol)
  GET|HEAD /ds/v1/conversations/ID               (a conversation, read as a Durable Stream)

Without --upstream or --generator the jobs run a synthetic model (deterministic text at
--tokens-per-s), which is handy for testing clients and for benchmarks.
"""

SERVE_EPILOG = """\
examples:
  ringcast serve --port 8080
  ringcast serve --upstream http://127.0.0.1:8081 --workers 2 --api-key-file keys.txt
      (llama-server started with --port 8081, since ringcast takes llama-server's 8080)
  ringcast serve --generator mypkg.model:generate --ttl 600 --keep-segment

Each SSE event carries `id: <byte offset after it>`, so a client resumes with
from=<bytes received> or Last-Event-ID. An offset that was dropped answers 410 with the first
available offset; one past the end of a finished stream, 416 with its length. Sessions belong
to the API key that created them.
"""


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``ringcast serve``."""
    net = parser.add_argument_group("network")
    net.add_argument("--host", default=_D.host, help="address to listen on (default: %(default)s)")
    net.add_argument(
        "--port",
        type=port_arg,
        default=_D.port,
        help="TCP port, shared by all HTTP processes, llama-server's default; 0 = pick a "
        "free one (default: %(default)s)",
    )
    cores = usable_cores()
    net.add_argument(
        "--http-procs",
        type=http_procs_arg,
        default=_D.http_procs,
        metavar="N|auto",
        help="HTTP processes sharing the port via SO_REUSEPORT. auto: one per CPU core "
        "left after the --workers (cores this process may use, by its affinity mask and "
        "cgroup quota), at least 1, at most "
        f"{AUTO_HTTP_PROCS_MAX}; here "
        f"{cores} {'core' if cores == 1 else 'cores'}, so auto is "
        f"{auto_http_procs(cores, _D.workers)} with "
        f"--workers {_D.workers} (docs/SERVER.md, 'How many HTTP processes') (default: auto)",
    )
    net.add_argument(
        "--spread",
        choices=("adaptive", "all"),
        default=None,
        help="how new connections are spread over the HTTP processes. adaptive: to as few "
        "as keep up, one while it does, more while the manager measures them busy (their "
        "CPU, a loop running late), back to fewer after 5 s of less load, so a light load "
        "costs what one process costs; all: over every process, as the kernel hashes them "
        "(docs/SERVER.md, 'Which of them take new connections') (default: adaptive with "
        "--http-procs auto, all with a number)",
    )
    net.add_argument(
        "--pass-readers",
        action=argparse.BooleanOptionalAction,
        default=_D.pass_readers,
        help="with the jobs in the HTTP processes (--workers 0) and more than one of them: "
        "a GET /v1/stream of a running stream that another HTTP process produces is passed "
        "to that process (its socket, before anything is written), so each event is written "
        "to its readers in the turn that produced it instead of crossing processes "
        "(docs/SERVER.md, 'Readers go to their producer') (default: on)",
    )
    net.add_argument(
        "--max-body",
        type=size_arg,
        default=_D.max_body,
        metavar="SIZE",
        help="largest request body accepted, at least 1KiB; larger gets 413",
    )
    net.add_argument(
        "--max-conns-per-client",
        type=int,
        default=_D.max_conns_per_client,
        metavar="N",
        help="open connections one client address may hold per HTTP process; more are "
        "answered 429 and closed; 0: the default (default: a quarter of the open-file limit)",
    )
    net.add_argument(
        "--write-timeout",
        type=float,
        default=_D.write_timeout,
        metavar="S",
        help="close a connection whose client has read nothing for this long while its "
        "write buffer is full, releasing its reader (default: %(default)s)",
    )
    net.add_argument(
        "--ds-long-poll-timeout",
        type=float,
        default=_D.ds_long_poll_timeout,
        metavar="S",
        help="how long a Durable Streams long-poll read (/ds, live=long-poll) waits for data "
        "before it answers 204, more than 0 and at most 3600 (default: %(default)s)",
    )
    net.add_argument(
        "--coalesce-ms",
        type=float,
        default=_D.coalesce_ms,
        metavar="MS",
        help="the most a stream's next write to its readers waits for more bytes to send "
        "along (one send per client per write is the cost of fan-out); only streams whose "
        "events come faster than half the wait are held; adaptive waits up to half of it "
        "while a process is behind and all of it while far behind; 0 = never wait "
        "(default: %(default)s)",
    )
    net.add_argument(
        "--coalesce",
        choices=["adaptive", "always"],
        default=_D.coalesce,
        help="adaptive: wait only while this HTTP process falls behind (event-loop lag), "
        "from 0 when it keeps up to --coalesce-ms; always: wait --coalesce-ms "
        "(default: %(default)s)",
    )
    net.add_argument(
        "--cors-origin",
        action="append",
        metavar="ORIGIN",
        help="allow browser pages from this origin (or '*') to call the API; "
        "repeatable. Default: no CORS headers",
    )
    auth = parser.add_argument_group("authentication")
    auth.add_argument(
        "--api-key",
        action="append",
        metavar="KEY",
        help="accept this key (Bearer or X-Api-Key); repeatable. Sessions are "
        "namespaced per key. Also read from $RINGCAST_API_KEY",
    )
    auth.add_argument(
        "--api-key-file", metavar="PATH", help="file with one key per line (# comments allowed)"
    )
    model = parser.add_argument_group("generation")
    model.add_argument(
        "--workers",
        type=int,
        default=_D.workers,
        metavar="N",
        help="inference worker processes that run the jobs apart from the HTTP processes, "
        "so a generation outlives a crashed HTTP process and a CPU-heavy --generator does not "
        "hold up serving; 0: none, each HTTP process runs the jobs it takes, which costs the "
        "least CPU per event (docs/SERVER.md, 'Where jobs run') (default: %(default)s)",
    )
    model.add_argument(
        "--upstream",
        metavar="URL",
        help="proxy to this OpenAI-compatible server instead of the synthetic model: "
        "http://HOST[:PORT][/PATH] (e.g. llama-server) or https://... (certificates "
        "checked against the system's CAs)",
    )
    model.add_argument(
        "--upstream-ca-file",
        metavar="PEM",
        help="trust the CA certificates in this PEM file (instead of the system's) for an "
        "https upstream, e.g. a private CA or a self-signed server",
    )
    model.add_argument(
        "--upstream-api-key",
        metavar="KEY",
        help="Bearer key sent upstream (or $RINGCAST_UPSTREAM_KEY)",
    )
    model.add_argument(
        "--generator",
        metavar="MODULE:FUNC",
        help="your async generator of text pieces; see ringcast.server.plugin (docs/SERVER.md)",
    )
    model.add_argument(
        "--replay",
        metavar="TRACE",
        help="answer requests by replaying a recorded trace (ringcast record, "
        "ringcast trace synth) at recorded pace; see docs/REPLAY.md",
    )
    model.add_argument(
        "--speed",
        type=speed_arg,
        default=_D.replay_speed,
        metavar="X|max",
        help="with --replay: X times the recorded pace, or max (default: %(default)s)",
    )
    model.add_argument(
        "--model-name",
        metavar="NAME",
        default=_D.model_name,
        help="model id reported by /v1/models (default: %(default)s)",
    )
    model.add_argument(
        "--tokens-per-s",
        metavar="N",
        type=float,
        default=_D.tokens_per_s,
        help="synthetic model speed; 0 = as fast as possible (default: %(default)s)",
    )
    model.add_argument(
        "--prefill-s",
        type=float,
        default=_D.prefill_s,
        metavar="S",
        help="synthetic prompt-processing delay before the first token, at most 3600",
    )
    model.add_argument(
        "--sse-ping-interval",
        type=float,
        default=_D.sse_ping_interval,
        metavar="S",
        help="append ': ping' to a running stream silent for this long, so slow "
        "prefills do not look dead; 0 = never, at most 3600 (default: %(default)s)",
    )
    model.add_argument(
        "--default-max-tokens",
        metavar="N",
        type=int,
        default=_D.default_max_tokens,
        help="synthetic tokens when the request sets no max_tokens",
    )
    store = parser.add_argument_group("sessions and memory")
    store.add_argument(
        "--segment",
        metavar="PATH",
        help="segment file (default /dev/shm/ringcast-<port>.seg); an existing "
        "segment with the same sizes is re-attached",
    )
    store.add_argument(
        "--max-sessions",
        metavar="N",
        type=int,
        default=None,
        help=f"session table slots; 0: the default (default: {DEFAULT_MAX_SESSIONS}, fewer if "
        "--session-bytes would make the sparse segment file larger than "
        f"{DEFAULT_SEGMENT_LIMIT >> 40} TiB)",
    )
    store.add_argument(
        "--max-sessions-per-key",
        type=int,
        default=_D.max_sessions_per_key,
        metavar="N",
        help="running sessions one API key (or, without keys, all clients together) may "
        "hold at once, counted exactly across HTTP processes; a create past it gets 429 "
        "(default: half of --max-sessions when two or more keys are configured, else no "
        "limit but the table)",
    )
    store.add_argument(
        "--session-bytes",
        type=size_arg,
        default=_D.session_bytes,
        metavar="SIZE",
        help="ring size per session, e.g. 4M or 64KiB, at least 4KiB; older bytes are dropped",
    )
    store.add_argument(
        "--max-id-len",
        metavar="BYTES",
        type=id_len_arg,
        default=_D.max_id_len,
        help="longest conversation id in bytes, 256 to 65536 (default: %(default)s)",
    )
    store.add_argument(
        "--ttl",
        metavar="S",
        type=float,
        default=_D.ttl,
        help="seconds a completed session is kept, at most 10 years (default: %(default)s)",
    )
    store.add_argument(
        "--idle-timeout",
        metavar="S",
        type=float,
        default=_D.idle_timeout,
        help="evict a running session without progress for this long; 0 = never, at most "
        "10 years (default: %(default)s)",
    )
    store.add_argument(
        "--max-memory",
        type=size_arg,
        default=_D.max_memory,
        metavar="SIZE",
        help="evict completed sessions (LRU) above this many buffered bytes, e.g. 1G; 0 = no limit",
    )
    store.add_argument(
        "--evict-running",
        action="store_true",
        help="when full, evict running sessions too (after completed ones)",
    )
    store.add_argument(
        "--keep-segment",
        action="store_true",
        help="keep the segment file at shutdown, so a restart re-attaches",
    )
    cluster = parser.add_argument_group(
        "several nodes (Redis Streams; see docs/CLUSTER.md)",
        "Without --redis or --redis-cluster nothing touches the network. Needs the redis "
        "extra: pip install 'ringcast[redis]'.",
    )
    cluster.add_argument(
        "--redis",
        metavar="URL",
        help="mirror every stream to this Redis (redis://[:PASSWORD@]HOST:PORT/DB, rediss://, "
        "unix://), so any node sharing it serves, resumes and cancels it; also "
        "$RINGCAST_REDIS_URL",
    )
    cluster.add_argument(
        "--redis-cluster",
        metavar="HOST:PORT[,...]",
        help="the same on a Redis Cluster, given some of its nodes",
    )
    cluster.add_argument(
        "--node-id",
        metavar="NAME",
        help="this node's name in Redis; unique per node (default: host name and port)",
    )
    cluster.add_argument(
        "--advertise-url",
        metavar="URL",
        help="where the other nodes reach this one: they forward appends, closes and "
        "deletes of the Durable Streams it holds there (default: http://HOST:PORT, the host "
        "name for a wildcard --host)",
    )
    cluster.add_argument(
        "--mirror-ms",
        metavar="MS",
        type=float,
        default=_D.mirror_ms,
        help="flush window of the mirror: what a node's loss can cost (default: %(default)s)",
    )
    cluster.add_argument(
        "--mirror-procs",
        type=int,
        default=0,
        metavar="N",
        help="mirror processes; each copies the streams of its share of the segment's slots "
        "(one core: ~1,400 streams at 50 tokens/s at --mirror-ms 25; docs/CLUSTER.md, "
        f"Sizing); 0: a quarter of the usable cores, 1 to 8; here {cores} "
        f"{'core' if cores == 1 else 'cores'}, so 0 runs {default_mirror_procs(cores)}",
    )
    cluster.add_argument(
        "--node-lease-ms",
        metavar="MS",
        type=int,
        default=_D.node_lease_ms,
        help="a node that has not renewed its lease for this long is lost: its running "
        "streams end node_lost on the other nodes (default: %(default)s)",
    )
    parser.add_argument(
        "--event-loop",
        default=_D.event_loop,
        choices=["uvloop", "asyncio"],
        help="event loop of the HTTP processes and workers (default: %(default)s)",
    )
    parser.add_argument(
        "--log-level",
        default=_D.log_level,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log messages of this level and above",
    )


def _check_key_spaces(key: str, where: str) -> None:
    """ValueError for a key with white space at either end: HTTP strips a header value's, so
    no request could ever send that key, and it would lock out whoever was given it."""
    if key != key.strip():
        raise ValueError(
            f"{where} has white space at its start or end, which no request can send "
            "(HTTP strips it from header values); remove it"
        )


def _read_keys(args: argparse.Namespace) -> list[str]:
    """The API keys; ValueError for an empty key or a key file without one (either would
    start a server with no authentication at all, which the caller evidently did not want)."""
    keys = list(args.api_key or [])
    if any(not k.strip() for k in keys):
        raise ValueError("--api-key is empty")
    for k in keys:
        _check_key_spaces(k, "--api-key")
    if args.api_key_file:
        from_file = []
        with open(args.api_key_file, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line and not line.startswith("#"):
                    from_file.append(line)
        if not from_file:
            raise ValueError(f"--api-key-file {args.api_key_file} holds no key")
        keys += from_file
    env_key = os.environ.get("RINGCAST_API_KEY")
    if env_key is not None:
        if not env_key.strip():
            raise ValueError("$RINGCAST_API_KEY is set but empty")
        _check_key_spaces(env_key, "$RINGCAST_API_KEY")
        keys.append(env_key)
    return keys


_SAME_NAME = (
    "host",
    "port",
    "workers",
    "pass_readers",
    "max_sessions_per_key",
    "session_bytes",
    "max_id_len",
    "ttl",
    "idle_timeout",
    "max_memory",
    "evict_running",
    "keep_segment",
    "model_name",
    "tokens_per_s",
    "prefill_s",
    "default_max_tokens",
    "max_body",
    "max_conns_per_client",
    "log_level",
    "sse_ping_interval",
    "write_timeout",
    "ds_long_poll_timeout",
    "coalesce_ms",
    "coalesce",
    "event_loop",
    "mirror_ms",
    "node_lease_ms",
)
"""Settings whose option has the field's name and is taken as it is."""


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """The config of parsed ``ringcast serve`` arguments; ``OSError`` if the key file cannot
    be read, ``ValueError`` for an empty key."""
    return ServeConfig(
        **{name: getattr(args, name) for name in _SAME_NAME},
        http_procs=args.http_procs or auto_http_procs(usable_cores(), args.workers),
        spread=args.spread or ("all" if args.http_procs else "adaptive"),
        max_sessions=args.max_sessions or default_max_sessions(args.session_bytes),
        mirror_procs=args.mirror_procs or default_mirror_procs(usable_cores()),
        segment=args.segment or "",
        key_digests=(digests := [key_digest(k) for k in _read_keys(args)]),
        resume_secret=secrets.token_hex(32) if digests else "",
        upstream=args.upstream or "",
        upstream_api_key=args.upstream_api_key or os.environ.get("RINGCAST_UPSTREAM_KEY", ""),
        upstream_ca_file=os.path.abspath(args.upstream_ca_file) if args.upstream_ca_file else "",
        generator=args.generator or "",
        cors_origins=args.cors_origin or [],
        replay=os.path.abspath(args.replay) if args.replay else "",
        replay_speed=args.speed,
        redis_url=args.redis or ("" if args.redis_cluster else redis_url_from_env()),
        redis_cluster=args.redis_cluster or "",
        node_id=args.node_id or "",
        advertise_url=(args.advertise_url or "").rstrip("/"),
    )


def redis_url_from_env() -> str:
    return os.environ.get("RINGCAST_REDIS_URL", "")
