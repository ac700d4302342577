"""Connecting to Redis (one server or a Redis Cluster) and running the scripts.

``redis`` is imported only here, and only when a node is configured to use it: a server without
``--redis``/``--redis-cluster`` never imports it and never touches the network.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

from ringcast._extras import MissingExtra, require

if TYPE_CHECKING:
    import redis.asyncio as aioredis
    import redis.asyncio.cluster as aiocluster

    Client: TypeAlias = aioredis.Redis | aiocluster.RedisCluster
    Pipeline: TypeAlias = aioredis.client.Pipeline | aiocluster.ClusterPipeline
else:
    Client = Any
    Pipeline = Any

SOCKET_TIMEOUT_S = 5.0
"""A command that waits longer than this fails (Redis paused or unreachable); blocking reads
block for less."""
CONNECT_TIMEOUT_S = 2.0
MAX_MIRROR_PROCS = 64


def require_redis(option: str) -> None:
    """:class:`~ringcast._extras.MissingExtra` (one line naming ``option``, the one given, and
    the extra) without ``redis``."""
    require("redis", option)


def check_cluster_args(args: Any) -> str | None:
    """What is wrong with ``ringcast serve``'s Redis options (parsed arguments), or None;
    checked before anything starts, including that the ``redis`` extra is installed."""
    import os
    from urllib.parse import urlsplit

    url = args.redis or ("" if args.redis_cluster else os.environ.get("RINGCAST_REDIS_URL", ""))
    if args.redis and args.redis_cluster:
        return "--redis and --redis-cluster both name the Redis to use; give one"
    # Checked with or without Redis: the children's JSON configuration carries it, and a
    # NaN or an infinity there stopped them at start with a traceback.
    if not 1 <= args.mirror_ms <= 1000:
        return f"--mirror-ms must be between 1 and 1000 (got {args.mirror_ms})"
    if not (url or args.redis_cluster):
        for opt in ("node_id", "advertise_url", "mirror_procs"):
            if getattr(args, opt):
                return f"--{opt.replace('_', '-')} only applies with --redis or --redis-cluster"
        return None
    if url and urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        # Name the scheme only (the rest may hold a password); 'localhost:6379' parses as
        # scheme 'localhost', so a URL without '://' is said to have none.
        source = "--redis" if args.redis else "$RINGCAST_REDIS_URL"
        found = f"scheme {urlsplit(url).scheme}://" if "://" in url else "no scheme"
        return (
            f"{source} has {found}: the URL must be redis://, rediss:// or unix:// "
            "(e.g. redis://127.0.0.1:6379/0)"
        )
    if args.redis_cluster:
        try:
            parse_seeds(args.redis_cluster)
        except ValueError as e:
            return str(e)
    if not 0 <= args.mirror_procs <= MAX_MIRROR_PROCS:
        return f"--mirror-procs must be between 1 and {MAX_MIRROR_PROCS} (got {args.mirror_procs})"
    if args.node_lease_ms < 4 * args.mirror_ms or args.node_lease_ms < 300:
        return (
            f"--node-lease-ms {args.node_lease_ms} is too short: at least 300 and four flush "
            "windows (a node renews its lease every quarter of it)"
        )
    if args.node_id is not None and (
        not args.node_id
        or not args.node_id.isascii()
        or any(ord(c) < 32 or ord(c) == 127 for c in args.node_id)
    ):
        # ASCII: it goes in HTTP headers (X-Ringcast-Node, X-Ringcast-Forwarded-By), whose
        # bytes are Latin-1; a node id beyond it made every forwarded request a 500.
        return f"--node-id {args.node_id!r}: must be non-empty ASCII, without control characters"
    if args.advertise_url is not None:
        parts = urlsplit(args.advertise_url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path.strip("/"):
            return (
                f"--advertise-url {args.advertise_url!r}: give http://HOST:PORT, where the "
                "other nodes reach this one"
            )
    given = "--redis-cluster" if args.redis_cluster else "--redis" if args.redis else ""
    try:
        require_redis(given or "$RINGCAST_REDIS_URL")
    except MissingExtra as e:
        return str(e)
    return None


def parse_seeds(spec: str) -> list[tuple[str, int]]:
    """``HOST:PORT[,HOST:PORT…]`` → seed nodes; ``ValueError`` naming the bad part."""
    seeds: list[tuple[str, int]] = []
    for part in spec.split(","):
        host, sep, port = part.strip().rpartition(":")
        if (
            not sep
            or not host
            or not (port.isascii() and port.isdigit())
            or not 0 < int(port) < 65536
        ):
            raise ValueError(f"--redis-cluster: {part!r} is not HOST:PORT")
        seeds.append((host.strip("[]"), int(port)))
    return seeds


def connect(url: str = "", cluster_seeds: str = "") -> Client:
    """A client for ``url`` (``redis://``, ``rediss://``, ``unix://``; password in the URL) or,
    with ``cluster_seeds``, a Redis Cluster client that discovers the shards from them.
    Connections are made lazily, on the first command."""
    require_redis("--redis-cluster" if cluster_seeds else "--redis")
    import redis.asyncio as aioredis
    from redis.asyncio.cluster import ClusterNode, RedisCluster

    if cluster_seeds:
        nodes = [ClusterNode(h, p) for h, p in parse_seeds(cluster_seeds)]
        return RedisCluster(
            startup_nodes=nodes,
            socket_timeout=SOCKET_TIMEOUT_S,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
        )
    return aioredis.Redis.from_url(
        url, socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=CONNECT_TIMEOUT_S
    )


class Script:
    """One Lua script, called by its SHA1 (``EVALSHA``) and loaded on demand: a Redis that
    restarted, or a cluster shard that never saw it, answers NOSCRIPT once."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(
        self, client: Client, keys: Sequence[str | bytes], args: Sequence[Any]
    ) -> Any:
        from redis.exceptions import NoScriptError

        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await client.eval(self.source, len(keys), *keys, *args)

    def queue(self, pipe: Pipeline, keys: Sequence[str | bytes], args: Sequence[Any]) -> None:
        """Queue a call in a pipeline; a NOSCRIPT reply comes back as that command's result
        (:func:`is_noscript`) and the caller retries it with :meth:`__call__`."""
        pipe.evalsha(self.sha, len(keys), *keys, *args)


def is_cluster(client: Client) -> bool:
    from redis.asyncio.cluster import RedisCluster

    return isinstance(client, RedisCluster)


def is_noscript(result: object) -> bool:
    from redis.exceptions import NoScriptError

    return isinstance(result, NoScriptError)


def redis_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "Redis is unavailable or refused this", not a bug here."""
    from redis.exceptions import RedisError

    return (RedisError, OSError, TimeoutError)


def is_refusal(e: BaseException) -> bool:
    """Whether ``e`` is Redis answering that the command itself is wrong (a plain error reply,
    such as an argument out of range), which sending it again would only repeat; not one of
    the replies that pass (out of memory, cluster down or moved, loading, a read-only
    replica), which have classes of their own."""
    from redis.exceptions import ResponseError

    return type(e) is ResponseError
