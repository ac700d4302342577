"""The Durable Streams protocol under ``/ds``: create, append, read (catch-up, long-poll,
SSE), metadata, delete, close and fork, on the same segment, keys and processes as the rest
of the server (see ``docs/DURABLE_STREAMS.md``).

- ``/ds/v1/stream/<name>``: a generic stream. Its bytes are a session in the segment under
  the owner ``ds:<owner>`` (:mod:`ringcast.server.durable_meta`), its side metadata a row in
  the database next to the segment. Any HTTP process serves any request: an append adopts
  the producer role of the session (the Rust core hands it over) while it holds the
  database's write lock, which serializes validation plus append per stream across processes.
- ``/ds/v1/conversations/<id>``: a conversation started with ``X-Conversation-Id``, read-only,
  content type ``text/event-stream``: its bytes are exactly ``/v1/stream``'s; it is closed
  when the conversation finishes (its ``[DONE]`` or in-ring error event is its last data).

Offsets are tokens ``<16 digits>_<16 digits>`` (the second part is the byte offset; the
first is reserved and 0); clients treat them as opaque. ``-1`` is the beginning and ``now``
the tail.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import math
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import quote, unquote

import msgspec

from ringcast._core import (
    InvalidArgument,
    OffsetLost,
    QuotaExceeded,
    RegistryFull,
    SessionEnded,
    SessionNotFound,
)
from ringcast.http.client import HTTPError as ClientHTTPError
from ringcast.http.client import stream as http_stream
from ringcast.http.parse import HttpError, Request
from ringcast.http.protocol import Connection
from ringcast.server.durable_meta import (
    DurableMeta,
    ProducerState,
    RemoteStream,
    StreamMeta,
    StreamPeers,
    durable_owner,
    meta_path,
)
from ringcast.server.fanout import END_EVENTS, FanOut
from ringcast.server.store import (
    Quota,
    StoreUnavailable,
    StreamReader,
    StreamStore,
    StreamView,
    StreamWriter,
    quota_message,
)
from ringcast.wire.openai import error_json
from ringcast.wire.sse import error_event

log = logging.getLogger("ringcast.durable")

PREFIX = "/ds"
STREAM_PATH = "/v1/stream/"
CONVERSATION_PATH = "/v1/conversations/"
METHODS = ("GET", "HEAD", "PUT", "POST", "DELETE")

DEFAULT_CONTENT_TYPE = "application/octet-stream"
CONVERSATION_CONTENT_TYPE = "text/event-stream"
READ_CHUNK = 1 << 20
"""Most bytes one catch-up response returns (more: the client reads on from its offset)."""
SSE_MAX_S = 60.0
"""An SSE response ends after this long (the protocol asks for ~60 s, for CDN collapsing);
the client reconnects from its last offset."""
CURSOR_EPOCH = 1728432000.0
"""2024-10-09T00:00:00Z: cursors count 20 s intervals from here (the protocol's default)."""
CURSOR_INTERVAL_S = 20.0
MAX_SAFE_INT = 2**53 - 1
FORWARDED = "x-ringcast-forwarded-by"
"""Set (to the forwarding node's id) on a request forwarded to the node that holds the
stream; such a request is never forwarded again."""
FORWARD_TIMEOUT_S = 10.0
"""Most a forwarded request waits for the owning node's whole answer (502 beyond)."""
TOMBSTONE_REFRESH_S = 15.0
"""How often an HTTP process copies its node's tombstones to Redis again: a quarter of their
expiry there (``ringcast.server.cluster.ds.TOMBSTONE_MS``, 60 s)."""
_HOP = frozenset(
    (
        "connection", "keep-alive", "transfer-encoding", "content-length", "host", "te",
        "upgrade", "expect", "proxy-connection",
    )
)  # fmt: skip
_NOT_RELAYED = _HOP | {
    "content-type", "location", "x-content-type-options", "cross-origin-resource-policy",
    "x-ringcast-process", "vary", "date", "server",
}  # fmt: skip

_OFFSET = re.compile(r"0{16}_([0-9]{16})")  # matched with fullmatch: "$" lets "\n" through
_NONNEG = re.compile(r"0|[1-9][0-9]{0,18}")
"""A non-negative decimal of at most 19 digits (matched with fullmatch): a longer one made
``int()`` raise past 4,300 digits, and overflowed SQLite's INTEGER past 2^63 (500s)."""
_SECURITY = [
    ("X-Content-Type-Options", "nosniff"),
    ("Cross-Origin-Resource-Policy", "cross-origin"),
]
_raw_list_decoder = msgspec.json.Decoder(list[msgspec.Raw])
_any_decoder = msgspec.json.Decoder()
_json = msgspec.json.Encoder()


class DsError(Exception):
    """An error answer of a Durable Streams route, with the protocol's headers."""

    def __init__(
        self, status: int, message: str, headers: list[tuple[str, str]] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or []


_ASCII_SAFE = "".join(chr(c) for c in range(0x21, 0x7F))


def ascii_target(text: str) -> str:
    """A request path or query as it may go on the wire (in a request line or a ``Location``,
    which are Latin-1 bytes): its non-ASCII characters as percent-escapes of their UTF-8,
    the rest (``%`` and its escapes included) as they were, so it names the same stream."""
    return text if text.isascii() else quote(text, safe=_ASCII_SAFE)


def format_offset(n: int) -> str:
    return f"{0:016d}_{n:016d}"


def media_type(ct: str) -> str:
    """The essence of a content type (``type/subtype``, lower case, no parameters)."""
    return ct.split(";", 1)[0].strip().lower()


def is_json(ct: str) -> bool:
    return media_type(ct) == "application/json"


def is_text(ct: str) -> bool:
    mt = media_type(ct)
    return mt.startswith("text/") or mt == "application/json"


def cursor_for(client: str | None) -> str:
    """The ``Stream-Cursor`` of a live response: the current 20 s interval, or past the
    client's cursor by a random 1-3600 s when the client is already there."""
    now = int((time.time() - CURSOR_EPOCH) // CURSOR_INTERVAL_S)
    if client is not None and _NONNEG.fullmatch(client) and int(client) >= now:
        jitter = secrets.randbelow(3600) + 1
        return str(int(client) + max(1, math.ceil(jitter / CURSOR_INTERVAL_S)))
    return str(now)


def parse_query(query: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for part in query.split("&") if query else []:
        if not part:
            continue
        name, _, value = part.partition("=")
        try:
            out.setdefault(unquote(name, errors="strict"), []).append(
                unquote(value, errors="strict")
            )
        except UnicodeDecodeError:
            raise DsError(400, "query string is not valid UTF-8") from None
    return out


def json_messages(body: bytes, allow_empty: bool) -> list[bytes]:
    """The messages of a JSON append: an array is flattened one level, anything else is one
    message. 400 for invalid JSON or (unless ``allow_empty``) an empty array."""
    stripped = body.strip()
    if stripped.startswith(b"["):
        try:
            items = _raw_list_decoder.decode(stripped)
        except msgspec.DecodeError as e:
            raise DsError(400, f"invalid JSON: {e}") from None
        except RecursionError:
            raise DsError(400, "JSON nested too deeply") from None
        if not items and not allow_empty:
            raise DsError(400, "an empty JSON array appends nothing")
        return [bytes(i) for i in items]
    try:
        _any_decoder.decode(stripped)
    except msgspec.DecodeError as e:
        raise DsError(400, f"invalid JSON: {e}") from None
    except RecursionError:
        raise DsError(400, "JSON nested too deeply") from None
    return [stripped]


def sse_lines(payload: bytes) -> bytes:
    """``payload`` as the ``data:`` lines of one SSE event (a line that starts with a space
    gets ``data: `` so the parser's one stripped space is not its own)."""
    text = payload.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    out = bytearray()
    for line in text.split(b"\n"):
        out += b"data: " if line.startswith(b" ") else b"data:"
        out += line
        out += b"\n"
    return bytes(out)


@dataclass
class Target:
    """A resolved stream: who owns it in the segment, its row, and its session."""

    name: str
    owner: str
    info: StreamView
    meta: StreamMeta | None
    """None for a conversation (read-only, no side metadata)."""
    remote: RemoteStream | None = None
    """Set for a generic stream another node holds (``--redis``): its metadata came from
    Redis, and what only that node can do is forwarded to it."""

    @property
    def content_type(self) -> str:
        return self.meta.content_type if self.meta is not None else CONVERSATION_CONTENT_TYPE

    @property
    def closed(self) -> bool:
        return self.info.is_done

    @property
    def acked(self) -> int:
        """Bytes its owning node acknowledged that are not readable here yet (another node's
        stream whose mirror is behind; 0 otherwise): no read below it is up to date."""
        return self.remote.acked if self.remote is not None else 0


class DurableStreams:
    """The Durable Streams routes of one HTTP process."""

    def __init__(
        self,
        store: StreamStore,
        segment_path: str,
        check_id: Callable[[str], str],
        quota: Callable[[str], Quota | None],
        long_poll_s: float,
        peers: StreamPeers | None = None,
        fanout: FanOut | None = None,
    ) -> None:
        self.store = store
        self.fanout = fanout
        """The process's fan-out: SSE tails at the live edge share one pump per stream."""
        self.peers = peers
        """The other nodes (``--redis``): None without Redis."""
        self.remote_touched: dict[tuple[str, str], float] = {}
        """When a read here last slid a remote stream's TTL on its node (bounded)."""
        self.meta = DurableMeta(
            meta_path(segment_path) if segment_path else ":memory:", store.epoch
        )
        self.check_id = check_id
        self.quota = quota
        """The server's ``--max-sessions-per-key`` quota of a key (by its owner namespace):
        an open stream counts like a running one."""
        self.long_poll_s = long_poll_s
        self.writers: dict[tuple[str, str, int], StreamWriter] = {}
        self.background: set[asyncio.Future[None]] = set()
        self.tx = asyncio.Lock()
        """Held around each write transaction: the database connection is this process's
        one, and a transaction that awaited (a store whose lookups go over the network)
        must not let another request's statements into it."""

    # -- entry point

    async def handle(self, req: Request, conn: Connection, owner: str) -> None:
        try:
            path = req.path[len(PREFIX) :]
            if path.startswith(STREAM_PATH) and len(path) > len(STREAM_PATH):
                name = self.name_of(path[len(STREAM_PATH) :])
                await self.stream_route(req, conn, owner, name)
            elif path.startswith(CONVERSATION_PATH) and len(path) > len(CONVERSATION_PATH):
                conv = self.name_of(path[len(CONVERSATION_PATH) :])
                if req.method not in ("GET", "HEAD"):
                    raise DsError(
                        405,
                        "a conversation is read-only here; it is written by its completion",
                        [("Allow", "GET, HEAD")],
                    )
                target = await self.conversation(conv, owner)
                await self.read_route(req, conn, target)
            else:
                raise DsError(404, f"no such route; streams are at {PREFIX}{STREAM_PATH}<name>")
        except DsError as e:
            self.send(
                conn,
                e.status,
                error_json(e.status, e.message, _error_type(e.status)),
                "application/json",
                e.headers,
                head=req.method == "HEAD",
            )

    async def stream_route(self, req: Request, conn: Connection, owner: str, name: str) -> None:
        m = req.method
        remote_ok = FORWARDED not in req.headers
        if m == "PUT":
            holder = await self.holder_of_create(req, owner, name)
            if holder is not None and not remote_ok:
                # Forwarded here, yet another node holds it (the holder moved meanwhile), or
                # a client forged the mark: creating it here would give the name two holders.
                raise DsError(
                    409, f"the stream, or the one it forks, is held by node {holder.node!r}"
                )
            if holder is not None:
                await self.forward(req, conn, holder)
            else:
                await self.create(req, conn, owner, name)
            return
        if m == "POST":
            parse_producer(req.headers)  # a malformed producer is a 400 before a 404
        t = await self.resolve(owner, name, remote_ok, read=m in ("GET", "HEAD"))
        if t.remote is not None and m in ("POST", "DELETE"):
            await self.forward(req, conn, t.remote)
        elif m == "POST":
            await self.append(req, conn, t)
        elif m == "DELETE":
            await self.delete(conn, t)
        else:
            await self.read_route(req, conn, t)

    async def read_route(self, req: Request, conn: Connection, t: Target) -> None:
        if req.method == "HEAD":
            self.head(conn, t)
        else:
            await self.read(req, conn, t)

    # -- helpers

    def name_of(self, raw: str) -> str:
        try:
            name = unquote(raw, errors="strict")
        except UnicodeDecodeError:
            raise DsError(400, "stream name is not valid UTF-8") from None
        try:
            return self.check_id(name)
        except HttpError as e:
            raise DsError(400, e.message.replace("conversation id", "stream name")) from None

    def send(
        self,
        conn: Connection,
        status: int,
        body: bytes,
        content_type: str,
        headers: Iterable[tuple[str, str]],
        head: bool = False,
    ) -> None:
        # HEAD, 204 and 304 carry no body (HEAD says what a GET would: its Content-Type).
        no_body = head or status in (204, 304)
        conn.send(status, b"" if no_body else body, content_type, [*_SECURITY, *headers])

    async def resolve(
        self, owner: str, name: str, remote_ok: bool = True, read: bool = False
    ) -> Target:
        """The live stream ``name`` of ``owner``: 404 if absent or expired (an expired one is
        removed at once), 410 if it was deleted while forks of it live. With ``--redis``, a
        stream that is not here may be another node's (``remote_ok``: look there; ``read``:
        for a read, which waits a moment for what that node acknowledged to be mirrored)."""
        downer = durable_owner(owner)
        meta = self.meta.get(downer, name)
        info = await self.store.get(name, downer)
        if meta is not None and meta.deleted:
            raise DsError(410, "the stream was deleted (forks of it are still readable)")
        if (
            meta is None
            or info is None
            or (info.slot, info.generation) != (meta.slot, meta.generation)
        ):
            if remote_ok and self.peers is not None:
                return await self.resolve_remote(downer, name, read)
            raise DsError(404, "Stream not found or expired")
        if meta.expired(time.time()):
            await self.expire(meta)
            raise DsError(404, "Stream not found or expired")
        return Target(name, downer, info, meta)

    async def lookup_remote(
        self, downer: str, name: str, read: bool = False
    ) -> RemoteStream | None:
        assert self.peers is not None
        try:
            return await self.peers.lookup(name, downer, read)
        except StoreUnavailable as e:
            raise DsError(503, str(e)) from None

    async def resolve_remote(self, downer: str, name: str, read: bool) -> Target:
        """A stream another node holds, as Redis has it (its node expires it, not this one)."""
        r = await self.lookup_remote(downer, name, read)
        if r is not None and r.meta.deleted:
            raise DsError(410, "the stream was deleted (forks of it are still readable)")
        info = await self.store.get(name, downer) if r is not None else None
        if (
            r is None
            or info is None
            or (info.slot, info.generation) != (r.meta.slot, r.meta.generation)
            or r.meta.expired(time.time())
        ):
            raise DsError(404, "Stream not found or expired")
        return Target(name, downer, info, r.meta, r)

    async def holder_of_create(self, req: Request, owner: str, name: str) -> RemoteStream | None:
        """The node a ``PUT`` belongs to when it is not this one: the node holding a stream
        of that name (an idempotent create or a conflict is its answer), or, for a fork of a
        stream another node holds, that node (a fork copies its source's ring)."""
        if self.peers is None:
            return None
        downer = durable_owner(owner)
        if not await self.held_here(downer, name):
            r = await self.lookup_remote(downer, name)
            if r is not None:
                return r
        fork_from = req.headers.get("stream-forked-from")
        if fork_from is not None:
            src = self.fork_source_name(fork_from)
            if not await self.held_here(downer, src):
                return await self.lookup_remote(downer, src)
        return None

    async def held_here(self, downer: str, name: str) -> bool:
        """Whether this node answers for the stream: a live row (or a tombstone) here."""
        meta = self.meta.get(downer, name)
        if meta is None:
            return False
        if meta.deleted:
            return True
        info = await self.store.get(name, downer)
        return info is not None and (info.slot, info.generation) == (meta.slot, meta.generation)

    async def forward(self, req: Request, conn: Connection, r: RemoteStream) -> None:
        """Send the request to the node that holds the stream and relay its answer: a
        Durable Streams client sees the same answer from every node."""
        status, hs, body = await self.forward_call(req, r)
        ct = next((v for k, v in hs if k.lower() == "content-type"), "")
        out = [(k, v) for k, v in hs if k.lower() not in _NOT_RELAYED]
        out.append(("X-Ringcast-Node", r.node))
        if status == 201:
            host = req.headers.get("host", "localhost")
            out.append(("Location", f"http://{host}{ascii_target(req.path)}"))
        self.send(conn, status, body, ct, out, head=req.method == "HEAD")

    async def forward_call(
        self, req: Request, r: RemoteStream
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        """The owning node's answer to ``req``: status, headers, body (502 if it gives none
        within :data:`FORWARD_TIMEOUT_S`)."""
        assert self.peers is not None
        if not r.url:
            raise DsError(503, f"the stream is held by node {r.node!r}, whose address is unknown")
        headers = {k: v for k, v in req.headers.items() if k not in _HOP}
        headers[FORWARDED] = self.peers.node_id
        path = ascii_target(req.path) + ("?" + ascii_target(req.query) if req.query else "")
        status, hs, body = 0, [], bytearray()

        async def call() -> None:
            nonlocal status, hs
            async for _, st, got, piece in http_stream(
                r.url, path, method=req.method, headers=headers, body=req.body
            ):
                status, hs = st, got
                body.extend(piece)

        try:
            await asyncio.wait_for(call(), FORWARD_TIMEOUT_S)
        except (OSError, ClientHTTPError, TimeoutError) as e:
            raise DsError(
                502,
                f"the stream is held by node {r.node!r} ({r.url}), which did not answer: "
                f"{e or 'timed out'}",
                [("X-Ringcast-Node", r.node)],
            ) from None
        return status, hs, bytes(body)

    async def expire(self, meta: StreamMeta) -> None:
        async with self.transaction():
            cur = self.meta.get(meta.owner, meta.name)
            if cur is None or (cur.slot, cur.generation) != (meta.slot, meta.generation):
                return
            self.meta.drop(cur)
        info = await self.store.get(meta.name, meta.owner)
        if info is not None and (info.slot, info.generation) == (meta.slot, meta.generation):
            await self.store.cancel(meta.name, meta.owner)

    async def conversation(self, conv: str, owner: str) -> Target:
        info = await self.store.get(conv, owner)
        if info is None:
            raise DsError(404, "Stream not found or expired")
        return Target(conv, owner, info, None)

    def parse_offset(self, raw: str, t: Target) -> int:
        if raw == "-1":
            return t.info.first_available
        if raw == "now":
            return t.info.total_bytes
        m = _OFFSET.fullmatch(raw)
        if m is None:
            raise DsError(
                400, f"malformed offset {raw[:64]!r}: use -1, now or a Stream-Next-Offset"
            )
        n = int(m.group(1))
        if n > max(t.info.total_bytes, t.acked):
            raise DsError(400, f"offset {raw} is beyond the end of the stream")
        return n

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """A write transaction of the metadata database, one at a time in this process."""
        async with self.tx:
            with self.meta.transaction():
                yield

    async def touch(self, req: Request, t: Target) -> None:
        """Slide a ``Stream-TTL`` window: a read or a write counts as use."""
        m = t.meta
        if m is None or m.ttl is None:
            return
        now = time.time()
        # At most a few writes per TTL window, however many reads.
        every = min(1.0, m.ttl / 4)
        if t.remote is not None:
            key = (m.owner, m.name)
            if now - max(m.touched_at, self.remote_touched.get(key, 0.0)) >= every:
                if len(self.remote_touched) > 4096:
                    self.remote_touched.clear()
                self.remote_touched[key] = now
                self.spawn(self.touch_remote(req, t.remote))
            return
        if now - m.touched_at >= every:
            async with self.tx:
                self.meta.touch(m.owner, m.name, now)
            if self.peers is not None:
                await self.peers.publish(m, touched_at=now)

    async def touch_remote(self, req: Request, r: RemoteStream) -> None:
        """A read here is a use of a stream another node holds: tell that node with a read
        of nothing (``offset=now``), under the reader's own credentials."""
        read = Request("GET", req.path, "offset=now", req.version, dict(req.headers))
        with contextlib.suppress(DsError):
            await self.forward_call(read, r)

    async def keep_tombstones(self) -> None:
        """With ``--redis``: copy this node's tombstones (deleted sources that forks still
        read) to Redis again every :data:`TOMBSTONE_REFRESH_S`. A tombstone there expires
        (so that a node gone for good leaves none behind); before this, it expired 60 s after
        the delete while the forks kept it here for good, and another node then created the
        name again (201 there, 410 here), which this node refuses (409)."""
        assert self.peers is not None
        while True:
            await asyncio.sleep(TOMBSTONE_REFRESH_S)
            for m in self.meta.all_streams():
                if m.deleted:
                    await self.peers.publish(m)

    def spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    # -- HEAD

    def head(self, conn: Connection, t: Target) -> None:
        hs = [
            ("Stream-Next-Offset", format_offset(t.info.total_bytes)),
            ("Cache-Control", "no-store"),
        ]
        m = t.meta
        if m is not None and m.ttl is not None:
            hs.append(("Stream-TTL", str(m.ttl)))
        if m is not None and m.expires_at is not None:
            hs.append(("Stream-Expires-At", m.expires_at))
        if t.closed:
            hs.append(("Stream-Closed", "true"))
        self.send(conn, 200, b"", t.content_type, hs, head=True)

    # -- GET

    async def read(self, req: Request, conn: Connection, t: Target) -> None:
        q = parse_query(req.query)
        live = q.get("live", [None])[-1] if "live" in q else None
        if len(q.get("live", [])) > 1 or live not in (None, "long-poll", "sse"):
            raise DsError(400, "live must be long-poll or sse")
        offsets = q.get("offset")
        if offsets is not None and len(offsets) != 1:
            raise DsError(400, "give one offset")
        if offsets is None and live is not None:
            raise DsError(400, f"live={live} needs an offset (-1 for the beginning)")
        raw = offsets[0] if offsets is not None else "-1"
        if raw == "":
            raise DsError(400, "empty offset: use -1 for the beginning")
        start = self.parse_offset(raw, t)
        client_cursor = q.get("cursor", [None])[-1]
        try:
            reader = await self.store.open_reader(t.name, start, t.owner)
        except SessionNotFound:
            raise DsError(404, "Stream not found or expired") from None
        except OffsetLost as e:
            raise DsError(
                410,
                f"offset {raw} was dropped from the stream; the earliest is "
                f"{format_offset(e.first_available)}",
            ) from None
        try:
            await self.touch(req, t)
            if live == "sse":
                await self.sse(req, conn, t, reader, client_cursor)
            elif live == "long-poll":
                await self.long_poll(conn, t, reader, client_cursor)
            else:
                await self.catch_up(req, conn, t, reader, raw == "now")
        finally:
            reader.close()

    async def available(
        self, reader: StreamReader, known: int, acked: int = 0
    ) -> tuple[bytes, bool, bool]:
        """What ``reader`` can read now (up to :data:`READ_CHUNK`): the bytes, whether that is
        all there is (up to date), and whether the stream is closed and fully read. ``known``:
        bytes the stream is known to hold (a remote reader behind them fetches them);
        ``acked``: bytes it holds on its node that are not here yet (:attr:`Target.acked`)."""
        out = bytearray()
        while len(out) < READ_CHUNK:
            try:
                data = reader.read_nowait(READ_CHUNK - len(out))
                if data is None and reader.offset < known:
                    # A reader of another node's stream: these bytes are in Redis, not here.
                    data = await reader.aread(READ_CHUNK - len(out))
            except SessionEnded as e:
                if not out:
                    raise DsError(404, f"the stream ended: {e.reason}") from None
                return bytes(out), False, False
            if data is None:
                return bytes(out), reader.offset >= acked, False
            if data == b"":
                return bytes(out), True, True
            out += data
        return bytes(out), False, False

    def body_of(self, t: Target, data: bytes) -> bytes:
        if is_json(t.content_type):
            return b"[" + data[:-1] + b"]" if data else b"[]"
        return data

    async def catch_up(
        self, req: Request, conn: Connection, t: Target, reader: StreamReader, now: bool
    ) -> None:
        start = reader.offset
        data, closed = b"", t.closed and reader.offset >= t.info.total_bytes
        up_to_date = reader.offset >= t.acked
        if not now:
            data, up_to_date, closed = await self.available(reader, t.info.total_bytes, t.acked)
        end = start + len(data)
        etag = f'"{t.info.slot}.{t.info.generation}:{start}:{end}{":c" if closed else ""}"'
        hs = [("Stream-Next-Offset", format_offset(end))]
        if up_to_date:
            hs.append(("Stream-Up-To-Date", "true"))
        if closed:
            hs.append(("Stream-Closed", "true"))
        if now:
            hs.append(("Cache-Control", "no-store"))
        else:
            hs.append(("ETag", etag))
            # Short of what the stream's node acknowledged (its mirror is behind), the same
            # request soon answers more: revalidate, as at the open tail.
            hs.append(
                ("Cache-Control", "no-cache")
                if (up_to_date and not closed) or end < t.acked
                else ("Cache-Control", "private, max-age=60, stale-while-revalidate=300")
            )
            inm = req.headers.get("if-none-match")
            if inm is not None and etag in [v.strip() for v in inm.split(",")]:
                self.send(conn, 304, b"", t.content_type, hs)
                return
        self.send(conn, 200, self.body_of(t, data), t.content_type, hs)

    async def long_poll(
        self, conn: Connection, t: Target, reader: StreamReader, client_cursor: str | None
    ) -> None:
        data, up_to_date, closed = await self.available(reader, t.info.total_bytes, t.acked)
        if not data and not closed:
            try:
                first = await asyncio.wait_for(reader.aread(READ_CHUNK), self.long_poll_s)
            except TimeoutError:
                first = None
            except SessionEnded as e:
                raise DsError(404, f"the stream ended: {e.reason}") from None
            if first:
                more, up_to_date, closed = await self.available(reader, t.info.total_bytes, t.acked)
                data = first + more
            elif first == b"":
                closed = True
        hs = [
            ("Stream-Next-Offset", format_offset(reader.offset)),
            ("Stream-Cursor", cursor_for(client_cursor)),
            ("Cache-Control", "no-store"),
        ]
        if up_to_date or closed:
            hs.append(("Stream-Up-To-Date", "true"))
        if closed:
            hs.append(("Stream-Closed", "true"))
        if not data:
            self.send(conn, 204, b"", t.content_type, hs)
            return
        self.send(conn, 200, self.body_of(t, data), t.content_type, hs)

    async def sse(
        self,
        req: Request,
        conn: Connection,
        t: Target,
        reader: StreamReader,
        client_cursor: str | None,
    ) -> None:
        binary = not is_text(t.content_type)
        hs = list(_SECURITY)
        if binary:
            hs.append(("Stream-SSE-Data-Encoding", "base64"))
        conn.start_stream(hs, req.version)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SSE_MAX_S
        cursor = cursor_for(client_cursor)
        sent_control = False
        known, acked = t.info.total_bytes, t.acked
        first = reader

        last: list[bytes] = [b"", b""]  # a pass's data, and its data event

        def render(data: bytes, offset: int, cursor: str, closed: bool) -> bytes:
            # Called by the pump once per distinct cursor per pass, with the same ``data``
            # object: its data event is made once. (Clients send back the cursor they got,
            # and one at the live edge gets it jittered at random: past a reconnect, every
            # tail has a cursor of its own, and each pass was encoded once per tail.)
            if data is not last[0]:
                last[:] = data, self.sse_data(t, data, binary) if data else b""
            up_to_date = closed or len(data) < READ_CHUNK
            return last[1] + self.sse_control(offset, cursor, up_to_date, closed)

        try:
            while True:
                data, up_to_date, closed = await self.available(reader, known, acked)
                if data or closed or not sent_control:
                    # A data event and its control event in one write, as the pump writes
                    # them: a client that reads until the control event gets both at once.
                    events = self.sse_data(t, data, binary) if data else b""
                    control = self.sse_control(reader.offset, cursor, up_to_date, closed)
                    conn.write_body(events + control)
                    sent_control = True
                if closed:
                    break
                left = deadline - loop.time()
                if left <= 0:
                    break
                if up_to_date and self.fanout is not None:
                    # At the live edge: the process's pump for this stream reads once per
                    # wake-up and writes every tail's events.
                    joined = await self.fanout.tail_events(
                        conn, reader, t.owner, render, cursor, READ_CHUNK, left
                    )
                    if joined is not None:
                        (kind, value), offset = joined
                        if kind == "done":
                            break  # the pump wrote the closing control event
                        if kind == "ended":
                            if t.meta is None:
                                self.end_conversation(conn, t, str(value), offset, cursor)
                            break
                        # Detached (its buffer filled): drain, then go on from where it was.
                        await conn.drain()
                        if reader is not first:
                            reader.close()
                        reader = await self.store.open_reader(t.name, offset, t.owner)
                        continue
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                try:
                    more = await asyncio.wait_for(reader.aread(READ_CHUNK), left)
                except TimeoutError:
                    break
                if more:
                    rest, up_to_date, closed = await self.available(reader, known, acked)
                    conn.write_body(
                        self.sse_data(t, more + rest, binary)
                        + self.sse_control(reader.offset, cursor, up_to_date, closed)
                    )
                    if closed:
                        break
                else:
                    conn.write_body(self.sse_control(reader.offset, cursor, True, True))
                    break
                await conn.drain()
        except (SessionEnded, DsError) as e:
            if t.meta is None and isinstance(e, SessionEnded):
                self.end_conversation(conn, t, e.reason, reader.offset, cursor)
        except (OffsetLost, SessionNotFound):
            pass  # fell behind the ring after a detach, or gone: the client reconnects
        finally:
            if reader is not first:
                reader.close()
        conn.end_stream()

    def end_conversation(
        self, conn: Connection, t: Target, reason: str, offset: int, cursor: str
    ) -> None:
        """A conversation that was cancelled, replaced or evicted: its terminal event."""
        code, message = END_EVENTS.get(reason, (410, f"stream ended: {reason}"))
        conn.write_body(
            self.sse_data(t, error_event(code, message, reason), False)
            + self.sse_control(offset, cursor, True, True)
        )

    def sse_data(self, t: Target, data: bytes, binary: bool) -> bytes:
        if binary:
            payload = base64.b64encode(data)
        else:
            payload = self.body_of(t, data)
        return b"event: data\n" + sse_lines(payload) + b"\n"

    def sse_control(self, offset: int, cursor: str, up_to_date: bool, closed: bool) -> bytes:
        c: dict[str, object] = {"streamNextOffset": format_offset(offset)}
        if closed:
            c["streamClosed"] = True
        else:
            c["streamCursor"] = cursor
        if up_to_date or closed:
            c["upToDate"] = True
        return b"event: control\ndata:" + _json.encode(c) + b"\n\n"

    # -- PUT

    async def create(self, req: Request, conn: Connection, owner: str, name: str) -> None:
        h = req.headers
        ct = h.get("content-type", "").strip() or DEFAULT_CONTENT_TYPE
        ttl_raw = h.get("stream-ttl")
        exp_raw = h.get("stream-expires-at")
        if ttl_raw is not None and exp_raw is not None:
            raise DsError(400, "give Stream-TTL or Stream-Expires-At, not both")
        ttl: int | None = None
        if ttl_raw is not None:
            if not _NONNEG.fullmatch(ttl_raw) or int(ttl_raw) > MAX_SAFE_INT:
                raise DsError(
                    400, f"invalid Stream-TTL {ttl_raw[:32]!r}: whole seconds to 2^53-1, no sign"
                )
            ttl = int(ttl_raw)
        exp_ts: float | None = None
        if exp_raw is not None:
            exp_ts = parse_rfc3339(exp_raw)
        closing = h.get("stream-closed", "").lower() == "true"
        fork_from = h.get("stream-forked-from")
        fork_offset = h.get("stream-fork-offset")
        sub_raw = h.get("stream-fork-sub-offset")
        if (fork_offset is not None or sub_raw is not None) and fork_from is None:
            raise DsError(400, "Stream-Fork-Offset and -Sub-Offset need Stream-Forked-From")
        sub = 0
        if sub_raw is not None:
            if not _NONNEG.fullmatch(sub_raw) or int(sub_raw) > MAX_SAFE_INT:
                raise DsError(400, f"invalid Stream-Fork-Sub-Offset {sub_raw[:32]!r}")
            sub = int(sub_raw)
            if sub > 0 and fork_offset is None:
                raise DsError(400, "Stream-Fork-Sub-Offset needs Stream-Fork-Offset")
        body = req.body
        downer = durable_owner(owner)
        now = time.time()
        async with self.transaction():
            meta = self.meta.get(downer, name)
            info = await self.store.get(name, downer)
            live = (
                meta is not None
                and info is not None
                and (info.slot, info.generation) == (meta.slot, meta.generation)
                and not meta.expired(now)
            )
            if meta is not None and meta.deleted:
                raise DsError(409, "a deleted stream whose forks live cannot be re-created")
            source: StreamMeta | None = None
            fork_end = 0
            fork_key: str | None = None
            if fork_from is not None:
                source, src_info = await self.fork_source(downer, fork_from)
                if "content-type" not in h:
                    ct = source.content_type
                elif media_type(ct) != media_type(source.content_type):
                    raise DsError(409, "a fork has its source's content type")
                if ttl_raw is None and exp_raw is None:
                    # A fork lives as long as its source would: it inherits TTL or expiry.
                    ttl, exp_raw, exp_ts = source.ttl, source.expires_at, source.expires_ts
                fork_end = await self.fork_end(source, src_info, fork_offset, sub)
                fork_key = f"{fork_from}\0{fork_offset or ''}\0{sub}"
            if live:
                assert meta is not None and info is not None
                same = (
                    media_type(meta.content_type) == media_type(ct)
                    and meta.ttl == ttl
                    and (meta.expires_ts == exp_ts)
                    and (fork_key is None or meta.fork == fork_key)
                )
                if not same:
                    raise DsError(409, "the stream exists with another configuration")
                hs = [
                    ("Stream-Next-Offset", format_offset(info.total_bytes)),
                ]
                if info.is_done:
                    hs.append(("Stream-Closed", "true"))
                self.send(conn, 200, b"", meta.content_type, hs, head=True)
                return
            records = self.records(ct, body, allow_empty=True) if body else []
            writer = self.create_session(name, downer, owner)
            if meta is not None:
                self.meta.drop(meta)
            if source is not None:
                assert src_info is not None
                await self.copy_prefix(source, fork_end, writer)
                self.meta.set_fields(downer, source.name, forks=source.forks + 1)
            for r in records:
                writer.write(r)
            if closing:
                writer.finalize("done")
            created = await self.store.get(name, downer)
            if created is None:
                raise DsError(503, "the new stream was evicted at once; retry")
            row = StreamMeta(
                downer,
                name,
                created.slot,
                created.generation,
                ct,
                ttl,
                exp_raw,
                exp_ts,
                now,
                None,
                "" if closing else None,
                fork_key,
                False,
                0,
                source.name if source is not None else None,
            )
            self.meta.put(row)
            self.writers[(downer, name, writer.generation)] = writer
            total = writer.total_bytes
        if self.peers is not None:
            await self.peers.publish(row, acked=(total, closing))
        host = req.headers.get("host", "localhost")
        hs = [
            ("Location", f"http://{host}{ascii_target(req.path)}"),
            ("Stream-Next-Offset", format_offset(total)),
        ]
        if closing:
            hs.append(("Stream-Closed", "true"))
        self.send(conn, 201, b"", ct, hs, head=True)

    def fork_source_name(self, fork_from: str) -> str:
        """The stream a ``Stream-Forked-From`` names (a URL or a path)."""
        path = fork_from
        if "://" in path:
            path = "/" + path.split("://", 1)[1].split("/", 1)[-1]
        if path.startswith(PREFIX + STREAM_PATH):
            path = path[len(PREFIX) :]
        if not path.startswith(STREAM_PATH):
            raise DsError(400, f"Stream-Forked-From must name a stream path ({STREAM_PATH}<name>)")
        return self.name_of(path[len(STREAM_PATH) :])

    async def fork_source(self, downer: str, fork_from: str) -> tuple[StreamMeta, StreamView]:
        src = self.fork_source_name(fork_from)
        meta = self.meta.get(downer, src)
        if meta is not None and meta.deleted:
            raise DsError(409, "the source stream was deleted")
        info = await self.store.get(src, downer)
        if (
            meta is None
            or info is None
            or (info.slot, info.generation) != (meta.slot, meta.generation)
            or meta.expired(time.time())
        ):
            raise DsError(404, "the source stream does not exist")
        return meta, info

    async def fork_end(
        self, source: StreamMeta, info: StreamView, raw: str | None, sub: int
    ) -> int:
        """Where a fork's inherited bytes end: ``Stream-Fork-Offset`` (default: the source's
        tail), plus ``sub`` units past it (bytes, or JSON messages). The source keeps no
        append boundaries, so ``sub`` is bounded by the source's end, not by the append
        there (docs/DURABLE_STREAMS.md)."""
        end = info.total_bytes
        if raw is not None:
            m = _OFFSET.fullmatch(raw)
            if m is None:
                raise DsError(400, f"malformed Stream-Fork-Offset {raw[:64]!r}")
            end = int(m.group(1))
            if end > info.total_bytes:
                raise DsError(400, "Stream-Fork-Offset is beyond the end of the source")
        if sub == 0:
            return end
        rest = b"".join(await self.read_range(source, end, info.total_bytes))
        if is_json(source.content_type):
            msgs = json_messages(b"[" + rest[:-1] + b"]", allow_empty=True) if rest else []
            if sub > len(msgs):
                raise DsError(400, f"Stream-Fork-Sub-Offset {sub} is past the source's messages")
            return end + sum(len(m) + 1 for m in msgs[:sub])
        if sub > len(rest):
            raise DsError(400, f"Stream-Fork-Sub-Offset {sub} is past the source's bytes")
        return end + sub

    async def read_range(self, source: StreamMeta, start: int, end: int) -> list[bytes]:
        """The source's bytes ``[start, end)``; 410 if they were dropped from its ring."""
        out: list[bytes] = []
        if end <= start:
            return out
        try:
            reader = await self.store.open_reader(source.name, start, source.owner)
            try:
                while reader.offset < end:
                    data = reader.read_nowait(end - reader.offset)
                    if not data:
                        raise DsError(500, "the source ended while it was read")
                    out.append(data)
            finally:
                reader.close()
        except OffsetLost:
            raise DsError(410, "the source's beginning was dropped; it cannot be forked") from None
        return out

    async def copy_prefix(self, source: StreamMeta, end: int, writer: StreamWriter) -> None:
        for data in await self.read_range(source, 0, end):
            writer.write(data)

    def create_session(self, name: str, downer: str, owner: str) -> StreamWriter:
        try:
            return self.store.create(name, downer, self.quota(owner))
        except QuotaExceeded as e:
            raise DsError(429, quota_message(e.max_running)) from None
        except RegistryFull:
            raise DsError(503, "every session slot holds a running stream; retry later") from None
        except InvalidArgument as e:
            raise DsError(400, str(e)) from None

    def records(self, ct: str, body: bytes, allow_empty: bool) -> list[bytes]:
        """What an append writes to the ring: the body, or for JSON each message followed by
        a comma (a read wraps the range in brackets)."""
        if not is_json(ct):
            return [body]
        msgs = json_messages(body, allow_empty)
        return [b"".join(m + b"," for m in msgs)] if msgs else []

    # -- POST

    async def append(self, req: Request, conn: Connection, t: Target) -> None:
        h = req.headers
        body = req.body
        name = t.name
        closing = h.get("stream-closed", "").lower() == "true"
        producer = parse_producer(h)
        assert t.meta is not None
        ct = h.get("content-type", "").strip()
        if body:
            if not ct:
                raise DsError(400, "an append needs a Content-Type")
            if media_type(ct) != media_type(t.meta.content_type):
                raise DsError(
                    409, f"Content-Type {ct!r} does not match the stream's {t.meta.content_type!r}"
                )
        elif not closing:
            raise DsError(400, "an append needs a body (or Stream-Closed: true)")
        records = self.records(t.meta.content_type, body, allow_empty=False) if body else []
        seq = h.get("stream-seq")
        async with self.transaction():
            meta = self.meta.get(t.owner, name)
            info = await self.store.get(name, t.owner)
            if (
                meta is None
                or info is None
                or (info.slot, info.generation) != (meta.slot, meta.generation)
            ):
                raise DsError(404, "Stream not found or expired")
            hs: list[tuple[str, str]] = []
            if info.is_done:
                closed_hs = [
                    ("Stream-Closed", "true"),
                    ("Stream-Next-Offset", format_offset(info.total_bytes)),
                ]
                if producer is not None:
                    tuple_key = "\0".join(map(str, producer))
                    if meta.closed_by == tuple_key:
                        st = self.meta.producer(t.owner, name, producer[0])
                        self.send(conn, 204, b"", "", [*closed_hs, *_producer_headers(st)])
                        return
                    st = self.meta.producer(t.owner, name, producer[0])
                    if st is not None and producer[1] < st.epoch:
                        raise DsError(
                            403, "stale producer epoch", [("Producer-Epoch", str(st.epoch))]
                        )
                elif not body:
                    self.send(conn, 204, b"", "", closed_hs)
                    return
                raise DsError(409, "the stream is closed", closed_hs)
            accepted_seq: int | None = None
            if producer is not None:
                pid, epoch, pseq = producer
                st = self.meta.producer(t.owner, name, pid)
                if st is not None and epoch < st.epoch:
                    raise DsError(403, "stale producer epoch", [("Producer-Epoch", str(st.epoch))])
                if st is None or epoch > st.epoch:
                    if pseq != 0:
                        if st is None:
                            raise DsError(
                                409,
                                "a new producer starts at Producer-Seq 0",
                                [
                                    ("Producer-Expected-Seq", "0"),
                                    ("Producer-Received-Seq", str(pseq)),
                                ],
                            )
                        raise DsError(400, "a new producer epoch starts at Producer-Seq 0")
                elif pseq <= st.seq:
                    self.send(
                        conn,
                        204,
                        b"",
                        "",
                        [
                            ("Stream-Next-Offset", format_offset(info.total_bytes)),
                            *_producer_headers(st),
                        ],
                    )
                    return
                elif pseq != st.seq + 1:
                    raise DsError(
                        409,
                        f"producer sequence gap: expected {st.seq + 1}, got {pseq}",
                        [
                            ("Producer-Expected-Seq", str(st.seq + 1)),
                            ("Producer-Received-Seq", str(pseq)),
                        ],
                    )
                accepted_seq = pseq
            if (
                seq is not None
                and meta.stream_seq is not None
                and seq.encode() <= meta.stream_seq.encode()
            ):
                raise DsError(409, f"Stream-Seq {seq[:64]!r} is not above the last one")
            writer = self.produce(t.owner, name, meta.generation, records, closing)
            fields: dict[str, object] = {}
            if seq is not None:
                fields["stream_seq"] = seq
            if closing:
                fields["closed_by"] = "\0".join(map(str, producer)) if producer else ""
            if meta.ttl is not None:
                fields["touched_at"] = time.time()
            if fields:
                self.meta.set_fields(t.owner, name, **fields)
            if producer is not None and accepted_seq is not None:
                self.meta.set_producer(t.owner, name, producer[0], producer[1], accepted_seq)
                hs += [("Producer-Epoch", str(producer[1])), ("Producer-Seq", str(accepted_seq))]
            total = writer.total_bytes
        if self.peers is not None:
            # Before the answer: a read on another node that starts after it waits for
            # these bytes to be mirrored, or does not call itself up to date.
            await self.peers.acknowledge(meta, total, closing)
        hs.append(("Stream-Next-Offset", format_offset(total)))
        if closing:
            hs.append(("Stream-Closed", "true"))
        status = 200 if producer is not None and records else 204
        self.send(conn, status, b"", "", hs, head=True)

    def produce(
        self, downer: str, name: str, generation: int, records: list[bytes], closing: bool
    ) -> StreamWriter:
        """Append ``records`` (and close) as the stream's producer. This process's writer may
        be stale (another process appended since and holds the role): then a write or the
        finalize returns False, and the role is taken back once."""
        writer = self.writer(downer, name, generation)
        steps: list[bytes | None] = [*records, None] if closing else list(records)
        for step in steps:
            for attempt in range(2):
                done = writer.write(step) if step is not None else writer.finalize("done")
                if done:
                    break
                if attempt:
                    raise DsError(404, "Stream not found or expired")
                writer = self.writer(downer, name, generation, fresh=True)
        return writer

    def writer(self, downer: str, name: str, generation: int, fresh: bool = False) -> StreamWriter:
        key = (downer, name, generation)
        w = self.writers.get(key)
        if w is None or fresh:
            try:
                w = self.store.adopt(name, downer, generation)
            except (SessionNotFound, SessionEnded):
                self.writers.pop(key, None)
                raise DsError(404, "Stream not found or expired") from None
            if len(self.writers) > 4096:
                self.writers.clear()
            self.writers[key] = w
        return w

    # -- DELETE

    async def delete(self, conn: Connection, t: Target) -> None:
        name = t.name
        assert t.meta is not None
        async with self.transaction():
            meta = self.meta.get(t.owner, name)
            if meta is None or (meta.slot, meta.generation) != (t.meta.slot, t.meta.generation):
                raise DsError(404, "Stream not found or expired")
            tombstone = meta.forks > 0
            if tombstone:
                # Forks hold their own copy of what they inherited; the source answers 410
                # until its last fork goes.
                self.meta.set_fields(t.owner, name, deleted=1)
            else:
                self.meta.drop(meta)
            self.writers.pop((t.owner, name, meta.generation), None)
        await self.store.cancel(name, t.owner)
        if tombstone and self.peers is not None:
            # After the cancel, which removes a finished stream's keys from Redis.
            await self.peers.publish(meta, deleted=True)
        self.send(conn, 204, b"", "", [])


def _error_type(status: int) -> str:
    return {
        400: "invalid_request_error",
        403: "forbidden",
        404: "not_found_error",
        405: "invalid_request_error",
        409: "conflict",
        410: "gone",
        413: "invalid_request_error",
        503: "unavailable_error",
    }.get(status, "server_error")


def _producer_headers(st: ProducerState | None) -> list[tuple[str, str]]:
    if st is None:
        return []
    return [("Producer-Epoch", str(st.epoch)), ("Producer-Seq", str(st.seq))]


def parse_producer(h: dict[str, str]) -> tuple[str, int, int] | None:
    """``Producer-Id``, ``-Epoch`` and ``-Seq``: all three or none (400 otherwise)."""
    pid = h.get("producer-id")
    epoch = h.get("producer-epoch")
    seq = h.get("producer-seq")
    given = [v is not None for v in (pid, epoch, seq)]
    if not any(given):
        return None
    if not all(given):
        raise DsError(400, "Producer-Id, Producer-Epoch and Producer-Seq go together")
    assert pid is not None and epoch is not None and seq is not None
    if not pid:
        raise DsError(400, "Producer-Id is empty")
    out = []
    for name, v in (("Producer-Epoch", epoch), ("Producer-Seq", seq)):
        if not _NONNEG.fullmatch(v) or int(v) > MAX_SAFE_INT:
            raise DsError(400, f"invalid {name} {v[:32]!r}: an integer from 0 to 2^53-1")
        out.append(int(v))
    return pid, out[0], out[1]


def parse_rfc3339(raw: str) -> float:
    s = raw.strip()
    if not re.match(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$", s):
        raise DsError(400, f"invalid Stream-Expires-At {raw[:64]!r}: an RFC 3339 timestamp")
    s = s[:-1] + "+00:00" if s[-1] in "Zz" else s
    try:
        return datetime.fromisoformat(s).timestamp()
    except ValueError:
        raise DsError(400, f"invalid Stream-Expires-At {raw[:64]!r}") from None
