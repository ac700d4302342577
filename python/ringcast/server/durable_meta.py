"""The side metadata of Durable Streams: what a stream has besides its bytes.

A Durable Stream is a session in the segment (its bytes are the appended payloads, in the
ring), in the owner namespace ``ds:<owner>`` so it never meets a conversation of the same
name. What the ring cannot hold lives here, in one SQLite database next to the segment file
(``<segment>.ds.sqlite``, mode 0600, WAL): the content type, TTL or expiry, the last
``Stream-Seq``, each idempotent producer's epoch and sequence, the tuple that closed the
stream, how a fork was made, and tombstones of deleted sources that forks still read.

Why here and not in the segment: a slot's metadata is fixed-size and shared with the Rust
registry, and a record at the start of a ring would be dropped with the ring's oldest bytes;
producer state changes on every append, which an append-only ring cannot update in place.
SQLite gives every HTTP process the same view, transactions that survive ``kill -9`` at any
instruction, and a lock that serializes validation plus append per stream across processes
(the protocol requires that per producer).

**Binding to the session.** A row names the incarnation it describes (``slot``,
``generation``). A row whose session is gone or was re-created (evicted under pressure,
collected) is stale: readers treat the stream as absent and the next create replaces the
row. So the segment stays the authority on whether a stream exists, and no crash between
the two stores can resurrect a stream. The database records the segment's epoch; a segment
created anew (another epoch) starts with an empty database.

**Bounds.** One row per stream plus at most :data:`MAX_PRODUCERS` producer rows per stream
(the least recently used beyond that are forgotten: such a producer is treated as new, as
the protocol allows for expired producer state); rows go with their stream (delete, expiry,
the manager's sweep of stale rows).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

DURABLE_OWNER_PREFIX = "ds:"
"""Owner namespace prefix of Durable Streams sessions in the segment."""

MAX_PRODUCERS = 1024
"""Producer states kept per stream (least recently used forgotten beyond)."""

BUSY_TIMEOUT_MS = 5000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS streams (
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    slot INTEGER NOT NULL,
    generation INTEGER NOT NULL,
    content_type TEXT NOT NULL,
    ttl INTEGER,
    expires_at TEXT,
    expires_ts REAL,
    touched_at REAL NOT NULL,
    stream_seq TEXT,
    closed_by TEXT,
    fork TEXT,
    deleted INTEGER NOT NULL DEFAULT 0,
    forks INTEGER NOT NULL DEFAULT 0,
    source TEXT,
    PRIMARY KEY (owner, name)
);
CREATE TABLE IF NOT EXISTS producers (
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    producer TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    used_at REAL NOT NULL,
    PRIMARY KEY (owner, name, producer)
);
"""


def durable_owner(owner: str) -> str:
    """The segment owner of ``owner``'s Durable Streams."""
    return DURABLE_OWNER_PREFIX + owner


def is_durable_owner(owner: str) -> bool:
    """Whether a session belongs to a Durable Stream (the GC's sweeps leave those to
    :func:`expired_streams`: they have no producer process and no end of their own)."""
    return owner.startswith(DURABLE_OWNER_PREFIX)


def meta_path(segment_path: str) -> str:
    """The database file that goes with a segment file."""
    return segment_path + ".ds.sqlite"


@dataclass
class StreamMeta:
    """One stream's row."""

    owner: str
    name: str
    slot: int
    generation: int
    content_type: str
    ttl: int | None
    expires_at: str | None
    expires_ts: float | None
    touched_at: float
    stream_seq: str | None
    closed_by: str | None
    fork: str | None
    deleted: bool
    forks: int
    source: str | None

    def expiry(self) -> float | None:
        """Unix time the stream expires: ``Stream-Expires-At``, or the last read or write
        plus ``Stream-TTL`` (a sliding window); None without either."""
        if self.expires_ts is not None:
            return self.expires_ts
        if self.ttl is not None:
            return self.touched_at + self.ttl
        return None

    def expired(self, now: float) -> bool:
        e = self.expiry()
        return e is not None and now >= e


@dataclass
class RemoteStream:
    """A generic stream that another node holds (``--redis``), as Redis has it: its
    metadata, bound (``slot``, ``generation``) to the incarnation the store shows for it on
    this node, and where to forward what only that node can do."""

    meta: StreamMeta
    node: str
    url: str
    """The owning node's ``--advertise-url``: appends, closes, deletes and creates of this
    stream are forwarded there."""
    acked: int = 0
    """Bytes the owning node had answered a writer with that Redis did not hold yet when the
    lookup stopped waiting for them (0: it held them all). A read here serves what Redis
    holds and is not up to date below this offset."""


class StreamPeers(Protocol):
    """The other nodes of a ``--redis`` server, as the Durable Streams routes see them
    (:mod:`ringcast.server.cluster.ds`). Without Redis there is none."""

    @property
    def node_id(self) -> str: ...

    async def publish(
        self, m: StreamMeta, acked: tuple[int, bool] | None = None, **fields: object
    ) -> None:
        """Copy the read side of ``m`` (with ``fields`` applied) beside its stream in Redis,
        so other nodes can serve it; ``acked``: (total, closed) this node is answering its
        creator with, as :meth:`acknowledge`. Never raises: Redis trouble is counted and
        logged."""
        ...

    async def acknowledge(self, m: StreamMeta, total: int, closed: bool) -> None:
        """Before this node answers a writer of ``m`` with ``total`` bytes (and ``closed``):
        record it, so other nodes do not call a read up to date that has less. Never
        raises."""
        ...

    async def lookup(self, name: str, owner: str, read: bool = False) -> RemoteStream | None:
        """The stream ``name`` of ``owner`` if another node holds it, else None. ``read``:
        for a read, which first waits a moment for Redis to hold what that node acknowledged
        (:attr:`RemoteStream.acked`); a write is forwarded to it, which needs no such wait.
        Raises :class:`~ringcast.server.store.StoreUnavailable` if Redis cannot be reached."""
        ...


@dataclass
class ProducerState:
    epoch: int
    seq: int


class DurableMeta:
    """The metadata database of one segment, opened by every process of one server."""

    def __init__(self, path: str, epoch: int) -> None:
        """``path`` ``":memory:"``: a database of this process only (a store without a
        segment file, as the route tests' in-process fake)."""
        self.path = path
        if path != ":memory:":
            # Created here with O_NOFOLLOW and 0600 before SQLite opens it (SQLite gives its
            # WAL and shared-memory files the same mode): the default directory is /dev/shm.
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            os.close(fd)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        self.db.execute("PRAGMA journal_mode = WAL")
        # Durability beyond a crash of the machine is not wanted: the segment lives in
        # memory too. NORMAL keeps every commit atomic across process crashes.
        self.db.execute("PRAGMA synchronous = NORMAL")
        with self.transaction():
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    self.db.execute(stmt)
            row = self.db.execute("SELECT value FROM info WHERE key = 'epoch'").fetchone()
            if row is None or row[0] != str(epoch):
                # Another segment (or a new one): every row describes streams that are gone.
                self.db.execute("DELETE FROM streams")
                self.db.execute("DELETE FROM producers")
                self.db.execute(
                    "INSERT OR REPLACE INTO info (key, value) VALUES ('epoch', ?)", (str(epoch),)
                )

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (``BEGIN IMMEDIATE``: the database's write lock is taken at
        once, so what is read inside cannot change before the commit)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- streams

    def get(self, owner: str, name: str) -> StreamMeta | None:
        row = self.db.execute(
            "SELECT owner, name, slot, generation, content_type, ttl, expires_at, expires_ts, "
            "touched_at, stream_seq, closed_by, fork, deleted, forks, source "
            "FROM streams WHERE owner = ? AND name = ?",
            (owner, name),
        ).fetchone()
        if row is None:
            return None
        return _meta(row)

    def put(self, m: StreamMeta) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO streams (owner, name, slot, generation, content_type, ttl, "
            "expires_at, expires_ts, touched_at, stream_seq, closed_by, fork, deleted, forks, "
            "source) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                m.owner,
                m.name,
                m.slot,
                m.generation,
                m.content_type,
                m.ttl,
                m.expires_at,
                m.expires_ts,
                m.touched_at,
                m.stream_seq,
                m.closed_by,
                m.fork,
                int(m.deleted),
                m.forks,
                m.source,
            ),
        )

    def remove(self, owner: str, name: str) -> None:
        self.db.execute("DELETE FROM streams WHERE owner = ? AND name = ?", (owner, name))
        self.db.execute("DELETE FROM producers WHERE owner = ? AND name = ?", (owner, name))

    def drop(self, m: StreamMeta) -> None:
        """Remove a stream's row (inside a transaction); a fork releases its source, and a
        deleted source with no fork left goes too."""
        self.remove(m.owner, m.name)
        if m.source is not None:
            src = self.get(m.owner, m.source)
            if src is not None:
                if src.deleted and src.forks <= 1:
                    self.drop(src)  # the tombstone's own source is released in turn
                else:
                    self.set_fields(src.owner, src.name, forks=max(0, src.forks - 1))

    def touch(self, owner: str, name: str, now: float) -> None:
        self.db.execute(
            "UPDATE streams SET touched_at = ? WHERE owner = ? AND name = ?", (now, owner, name)
        )

    def set_fields(self, owner: str, name: str, **fields: object) -> None:
        cols = ", ".join(f"{k} = ?" for k in fields)
        self.db.execute(
            f"UPDATE streams SET {cols} WHERE owner = ? AND name = ?",
            (*fields.values(), owner, name),
        )

    def all_streams(self) -> list[StreamMeta]:
        rows = self.db.execute(
            "SELECT owner, name, slot, generation, content_type, ttl, expires_at, expires_ts, "
            "touched_at, stream_seq, closed_by, fork, deleted, forks, source FROM streams"
        ).fetchall()
        return [_meta(r) for r in rows]

    # -- producers

    def producer(self, owner: str, name: str, producer: str) -> ProducerState | None:
        row = self.db.execute(
            "SELECT epoch, seq FROM producers WHERE owner = ? AND name = ? AND producer = ?",
            (owner, name, producer),
        ).fetchone()
        return ProducerState(row[0], row[1]) if row is not None else None

    def set_producer(self, owner: str, name: str, producer: str, epoch: int, seq: int) -> None:
        now = time.time()
        self.db.execute(
            "INSERT OR REPLACE INTO producers (owner, name, producer, epoch, seq, used_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (owner, name, producer, epoch, seq, now),
        )
        self.db.execute(
            "DELETE FROM producers WHERE owner = ? AND name = ? AND producer IN ("
            "SELECT producer FROM producers WHERE owner = ? AND name = ? "
            "ORDER BY used_at DESC LIMIT -1 OFFSET ?)",
            (owner, name, owner, name, MAX_PRODUCERS),
        )


def _meta(r: tuple[object, ...]) -> StreamMeta:
    """A row of ``streams`` (columns in :data:`_FIELDS` order) as a :class:`StreamMeta`."""
    m = StreamMeta.__new__(StreamMeta)
    for name, value in zip(_FIELDS, r, strict=True):
        setattr(m, name, value)
    m.deleted = bool(m.deleted)
    return m


_FIELDS = (
    "owner",
    "name",
    "slot",
    "generation",
    "content_type",
    "ttl",
    "expires_at",
    "expires_ts",
    "touched_at",
    "stream_seq",
    "closed_by",
    "fork",
    "deleted",
    "forks",
    "source",
)
