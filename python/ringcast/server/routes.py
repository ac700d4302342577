"""The routes of an HTTP process of ``ringcast serve``: the OpenAI completions, the resumable
stream routes, the stream registry, health, models and metrics.

:class:`App` is the :class:`~ringcast.http.protocol.HttpApp` behind every connection. Before
any route runs, one step resolves the route (404, 405), answers CORS preflights, and
authenticates the caller into an owner namespace (401); a route gets that owner and never
looks at keys. Streams are reached through the process's
:class:`~ringcast.server.store.StreamStore` only.

A streaming POST creates the session here (so DELETE works before the first token), attaches
this process's reader at offset 0, and hands the job to a worker
(:mod:`ringcast.server.handoff`); the worker adopts the session and becomes its producer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar, cast
from urllib.parse import unquote

import msgspec

from ringcast._core import (
    InvalidArgument,
    OffsetLost,
    QuotaExceeded,
    RegistryFull,
    SegmentError,
    SessionEnded,
    SessionNotFound,
)
from ringcast.http.logs import log_failure
from ringcast.http.parse import HttpError, Request, parse_offset
from ringcast.http.protocol import Connection, HandedOff, HttpSettings
from ringcast.server import resume_token
from ringcast.server.cluster.ds import stream_peers
from ringcast.server.config import ANON_OWNER, KEEPALIVE_TIMEOUT, ServeConfig
from ringcast.server.counters import HttpCounter, MirrorCounter, SharedCounters, read_mirrors
from ringcast.server.durable import METHODS as DURABLE_METHODS
from ringcast.server.durable import PREFIX as DURABLE_PREFIX
from ringcast.server.durable import DurableStreams
from ringcast.server.durable_meta import durable_owner
from ringcast.server.fanout import END_EVENTS, RELAY_READ, Coalescing, FanOut, final_total
from ringcast.server.handoff import Dispatcher
from ringcast.server.jobs import Jobs
from ringcast.server.metrics import Metrics
from ringcast.server.passing import MAX_PASSED, MAX_READERS, Passing
from ringcast.server.passthrough import passthrough
from ringcast.server.store import (
    Quota,
    StoreUnavailable,
    StreamReader,
    StreamStore,
    StreamView,
    StreamWriter,
    quota_message,
)
from ringcast.server.upstream_link import caller_credentials
from ringcast.wire.jobs import Job
from ringcast.wire.openai import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    Completion,
    CompletionChoice,
    Health,
    MirrorHealth,
    ModelCard,
    ModelList,
    StreamInfo,
    Usage,
    chat_request_decoder,
    chunk_decoder,
    completion_request_decoder,
    json_encoder,
    lookup_request_decoder,
)
from ringcast.wire.sse import iter_sse_data

log = logging.getLogger("ringcast.server")

EXPOSED_HEADERS = (
    "X-Ringcast-Epoch, X-Ringcast-Offset, X-Ringcast-First-Available, X-Ringcast-Process, "
    "X-Ringcast-Resume-Token, "
    "Stream-Next-Offset, Stream-Cursor, Stream-Up-To-Date, Stream-Closed, Stream-TTL, "
    "Stream-Expires-At, Stream-SSE-Data-Encoding, Producer-Epoch, Producer-Seq, "
    "Producer-Expected-Seq, Producer-Received-Seq, ETag, Location"
)
ALLOWED_HEADERS = (
    "Authorization, Content-Type, X-Api-Key, X-Conversation-Id, Last-Event-ID, If-None-Match, "
    "Stream-TTL, Stream-Expires-At, Stream-Seq, Stream-Closed, Stream-Forked-From, "
    "Stream-Fork-Offset, Stream-Fork-Sub-Offset, Producer-Id, Producer-Epoch, Producer-Seq"
)

T = TypeVar("T")

Handler = Callable[["App", Request, Connection, str], Awaitable[None]]


STREAM_PARAMS = ("conv_id", "from", "generation")
"""The query parameters of the stream routes that may be given once only."""
GENERATION = re.compile(r"[0-9]{1,20}\.[0-9]{1,20}\.[0-9]{1,20}")
"""What ``generation=`` may be: an ``X-Ringcast-Generation`` value (:func:`generation_of`)."""
_ID_REFUSED = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
"""What a conversation id may not hold: C0 and C1 control characters, DEL, and lone
surrogates (from ``surrogateescape``-decoded bytes)."""


@dataclass(frozen=True)
class Route:
    methods: dict[str, Handler]
    """Handler per method; a 405 names them all (and its ``Allow`` header lists them)."""
    keyed: bool = True
    """Callers must authenticate (when keys are configured)."""
    passed_through: bool = False
    """With ``--upstream``, the upstream answers it instead (``/v1/models``)."""


PUBLIC_PAGES = frozenset({"/", "/index.html", "/favicon.ico"})
"""Passed-through pages that need no key with ``--api-key``: llama-server's WebUI shell,
which holds no data (its API calls carry the key), and which a browser loads without one."""


def is_public_page(req: Request) -> bool:
    return req.method in ("GET", "HEAD") and req.path in PUBLIC_PAGES


class App:
    """Routes and the state of one HTTP process."""

    def __init__(
        self, cfg: ServeConfig, index: int, store: StreamStore, counters: SharedCounters
    ) -> None:
        self.cfg = cfg
        self.index = index
        self.store = store
        self.counters = counters
        self.http = HttpSettings(
            cfg.max_body, KEEPALIVE_TIMEOUT, cfg.write_timeout, cfg.conns_per_client()
        )
        self.connections: set[Connection] = set()
        self.connections_per_client: dict[str, int] = {}
        self.background: set[asyncio.Task[None]] = set()
        self.coalescing = Coalescing(cfg.coalesce_ms, cfg.coalesce == "always", counters)
        self.fanout = FanOut(store, self.coalescing, counters)
        self.dispatcher = Dispatcher(cfg, index, counters)
        self.jobs: Jobs | None = None
        """With ``--workers 0``: this process runs the jobs it takes (set by the HTTP
        process's main before it listens); else they go to the workers."""
        self.passing: Passing | None = None
        """With the jobs here and sibling HTTP processes: where a ``GET /v1/stream`` of a
        stream another of them produces is passed (set by the HTTP process's main)."""
        self.prometheus = Metrics(cfg, store, counters)
        self.key_owners = {d: d[:16] for d in cfg.key_digests}
        self.created = int(time.time())
        self.durable = DurableStreams(
            store,
            cfg.segment,
            self.check_conv_id,
            self.quota,
            cfg.ds_long_poll_timeout,
            stream_peers(cfg, store),
            self.fanout,
        )

    # -- HttpApp

    def response_headers(self, req: Request | None) -> list[tuple[str, str]]:
        hs = [("X-Ringcast-Process", str(self.index))]
        origin = self.cors_origin(req) if req is not None else ""
        if origin:
            hs.append(("Access-Control-Allow-Origin", origin))
            hs.append(("Access-Control-Expose-Headers", EXPOSED_HEADERS))
            hs.append(("Vary", "Origin"))
        return hs

    def count_status(self, status: int) -> None:
        if 400 <= status < 500:
            self.counters.inc(HttpCounter.ERRORS_4XX)
        elif status >= 500:
            self.counters.inc(HttpCounter.ERRORS_5XX)

    def count_bytes_sent(self, n: int) -> None:
        self.counters.inc(HttpCounter.BYTES_SENT, n)

    def count_write_timeout(self) -> None:
        self.counters.inc(HttpCounter.WRITE_TIMEOUTS)

    def admit(self, req: Request, counted: bool = True) -> None:
        """The pre-routing step, on the head alone: CORS preflight, then the key (before the
        route, so a caller without a key learns nothing of which paths exist), then route
        and method (404, 405). Leaves ``(handler, owner)`` in ``req.admitted``. ``counted``
        False: a request another process counted and passed here."""
        if counted:
            self.counters.inc(HttpCounter.REQUESTS)
        if req.method == "OPTIONS" and self.cfg.cors_origins:
            req.admitted = (App.preflight, "")
            return
        route = resolve(req.path)
        if route is None or (route.passed_through and self.cfg.upstream):
            if not self.cfg.upstream:
                self.owner(req)  # 401 first: no key, no word on which paths exist
                raise HttpError(404, "File Not Found")
            if not is_public_page(req):
                self.owner(req)
            req.admitted = (App.pass_through, "")
            return
        if not route.keyed:
            owner = ""
        elif route is STREAM_ROUTE and req.method == "GET" and "token=" in req.query:
            owner = self.token_owner(req)
        else:
            owner = self.owner(req)
        handler = route.methods.get(req.method)
        if handler is None:
            allowed = ", ".join(route.methods)
            raise HttpError(
                405,
                f"method {req.method} not allowed here; use {' or '.join(route.methods)}",
                headers=[("Allow", allowed)],
            )
        req.admitted = (handler, owner)

    async def handle(self, req: Request, conn: Connection) -> None:
        """The route :meth:`admit` chose, for the owner it authenticated."""
        handler, owner = cast(tuple[Handler, str], req.admitted)
        await handler(self, req, conn, owner)

    async def pass_through(self, req: Request, conn: Connection, owner: str) -> None:
        """A request for the upstream (``--upstream``): ringcast's key, if it has keys, is
        its own; the upstream gets its own key or the caller's headers as they came
        (:mod:`ringcast.server.passthrough`)."""
        await passthrough(self.cfg, req, conn, strip_auth=bool(self.key_owners))

    async def preflight(self, req: Request, conn: Connection, owner: str) -> None:
        """A CORS preflight (a browser page on another origin sending keys, a conv id, or
        Durable Streams headers)."""
        conn.send(
            204,
            b"",
            headers=[
                ("Access-Control-Allow-Methods", "GET, HEAD, PUT, POST, DELETE, OPTIONS"),
                ("Access-Control-Allow-Headers", ALLOWED_HEADERS),
                ("Access-Control-Max-Age", "600"),
            ],
        )

    def streams_body(self, req: Request) -> bool:
        """Passed-through requests stream their body to the upstream."""
        if not self.cfg.upstream:
            return False
        route = resolve(req.path)
        return route is None or route.passed_through

    # -- background tasks

    def track(self, task: asyncio.Task[None]) -> asyncio.Task[None]:
        """Keeps a background task alive until it ends, and logs it if it ends by an
        exception: an error in the coalescing controller would otherwise leave the process
        writing every event at once, and only a garbage collection would ever say why."""
        self.background.add(task)
        task.add_done_callback(self._background_done)
        return task

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self.background.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            name = task.get_coro().__qualname__  # type: ignore[union-attr]
            log_failure(log, f"HTTP process {self.index}: background task {name} failed", exc)

    # -- request helpers

    def caller_digest(self, req: Request) -> str | None:
        """The digest of the configured key the caller sent, or None."""
        key = req.headers.get("x-api-key", "")
        auth = req.headers.get("authorization", "")
        if not key and auth[:7].lower() == "bearer ":
            key = auth[7:].strip()
        if not key:
            return None
        digest = hashlib.sha256(key.encode("latin-1")).hexdigest()
        return digest if digest in self.key_owners else None

    def owner(self, req: Request) -> str:
        """The caller's owner namespace; 401 if keys are configured and none matches."""
        if not self.key_owners:
            return ""
        digest = self.caller_digest(req)
        if digest is not None:
            return self.key_owners[digest]
        raise HttpError(
            401,
            "missing or invalid API key: send 'Authorization: Bearer <key>' or 'X-Api-Key: <key>'",
        )

    def token_owner(self, req: Request) -> str:
        """The owner namespace a resume token (``?token=``, a browser's way to authenticate
        a stream read) was issued to for this conversation; 401 if it is not valid for it."""
        if not self.key_owners:
            return ""
        conv = self.stream_id(req, "/v1/stream")
        token = req.query_params().get("token", "")
        digest = resume_token.verify(self.cfg.resume_secret, self.key_owners, conv, token)
        if digest is None:
            raise HttpError(
                401,
                "resume token invalid, expired, or not for this conversation: take a new one "
                "from the X-Ringcast-Resume-Token header of a streaming POST",
            )
        return self.key_owners[digest]

    def check_conv_id(self, raw: str) -> str:
        """Validate a conversation id: bounded, no control characters; anything else
        printable (``/``, ``:``, spaces, non-ASCII) is accepted."""
        if len(raw.encode("utf-8", "surrogatepass")) > self.cfg.max_id_len:
            raise HttpError(400, f"conversation id is longer than {self.cfg.max_id_len} bytes")
        bad = _ID_REFUSED.search(raw)
        if bad is not None:
            o = ord(bad[0])
            raise HttpError(400, f"conversation id contains a control character (U+{o:04X})")
        return raw

    def header_conv_id(self, req: Request) -> str | None:
        raw = req.headers.get("x-conversation-id", "")
        if not raw:
            return None
        try:
            value = raw.encode("latin-1").decode("utf-8")
        except UnicodeDecodeError:
            raise HttpError(400, "X-Conversation-Id is not valid UTF-8") from None
        return self.check_conv_id(value)

    def stream_id(self, req: Request, prefix: str) -> str:
        """The id from ``/v1/stream/{id}`` (may contain ``/``) or ``?conv_id=``."""
        if req.path.startswith(prefix + "/") and len(req.path) > len(prefix) + 1:
            try:
                raw = unquote(req.path[len(prefix) + 1 :], errors="strict")
            except UnicodeDecodeError:
                raise HttpError(400, "conversation id is not valid UTF-8") from None
        else:
            raw = req.query_params(once=STREAM_PARAMS).get("conv_id", "")
        if not raw:
            raise HttpError(400, "missing conversation id: use ?conv_id=ID or /v1/stream/ID")
        return self.check_conv_id(raw)

    def stream_info(self, i: StreamView) -> StreamInfo:
        return StreamInfo(
            conversation_id=i.conversation_id,
            is_done=i.is_done,
            total_bytes=i.total_bytes,
            started_at=int(i.started_at),
            completed_at=int(i.completed_at),
            state=i.state,
            first_available=i.first_available,
            epoch=self.store.epoch,
            readers=i.readers,
        )

    def send_json(self, conn: Connection, obj: object, status: int = 200) -> None:
        conn.send(status, json_encoder.encode(obj))

    def cors_origin(self, req: Request) -> str:
        """The ``Access-Control-Allow-Origin`` value for this request, or ``""``."""
        allowed = self.cfg.cors_origins
        if not allowed:
            return ""
        if "*" in allowed:
            return "*"
        origin = req.headers.get("origin", "")
        return origin if origin in allowed else ""

    # -- completions

    def quota(self, key_owner: str) -> Quota | None:
        """The ``--max-sessions-per-key`` quota of the key whose namespace is ``key_owner``
        (None: no quota): its running sessions, its anonymous ones (their ids start with
        :func:`anon_id_prefix`) and its open Durable Streams. The store counts them in the
        create's own step (in the segment, under the registry lock), so the quota is exact
        across HTTP processes."""
        n = self.cfg.session_quota()
        if not n:
            return None
        return Quota(
            n,
            [
                (key_owner, ""),
                (durable_owner(key_owner), ""),
                (ANON_OWNER, anon_id_prefix(key_owner)),
            ],
        )

    def create_session(self, conv: str, owner: str, key_owner: str | None = None) -> StreamWriter:
        """Create (or replace) the session ``(owner, conv)``; 503 when every slot holds a
        running stream; 429 when the key whose namespace is ``key_owner`` holds its quota of
        running sessions (:meth:`quota`) and this create does not replace one of them."""
        quota = self.quota(key_owner) if key_owner is not None else None
        try:
            return self.store.create(conv, owner, quota)
        except QuotaExceeded as e:
            raise HttpError(429, quota_message(e.max_running)) from None
        except RegistryFull:
            raise HttpError(
                503, "every session slot holds a running stream; retry later", "unavailable_error"
            ) from None
        except InvalidArgument as e:
            raise HttpError(400, str(e)) from None
        except SegmentError:
            # The shared-memory filesystem is full (docs/SECURITY.md): no room for a new slot.
            raise HttpError(
                507, "the server has no memory left for a new stream; retry later", "no_memory"
            ) from None

    async def post_chat(self, req: Request, conn: Connection, owner: str) -> None:
        await self.post_completion(req, conn, owner, "chat")

    async def post_completions(self, req: Request, conn: Connection, owner: str) -> None:
        await self.post_completion(req, conn, owner, "completions")

    async def post_completion(self, req: Request, conn: Connection, owner: str, route: str) -> None:
        stream = self.validate_body(req.body, route)
        conv = self.header_conv_id(req)
        anonymous = conv is None
        key_owner = owner
        if conv is None:
            conv, owner = anon_id_prefix(key_owner) + secrets.token_hex(12), ANON_OWNER
        writer = self.create_session(conv, owner, key_owner)
        try:
            reader = await self.store.open_reader(conv, 0, owner)
        except (SessionNotFound, SessionEnded):
            # A DELETE or a newer request with the same id came first (from any process).
            raise HttpError(
                409,
                "the stream was deleted or replaced by another request with the same "
                "conversation id before it started",
                "conflict",
            ) from None
        self.counters.inc(HttpCounter.STREAMS_STARTED)
        creds = (
            caller_credentials(self.cfg, req.headers, bool(self.key_owners))
            if self.cfg.upstream
            else ()
        )
        job = Job(conv, owner, writer.generation, route, req.body, creds)
        if self.jobs is not None:
            # This process made the session, so it is its producer already: no hand-off.
            self.jobs.run_here(job, writer)
        else:
            self.track(asyncio.get_running_loop().create_task(self.dispatcher.handoff(job, writer)))
        finished = False
        try:
            if stream:
                # Made just now: nothing of it dropped yet (no lookup, which may read
                # another producer's /proc entry to tell whether it runs).
                headers = self.resume_headers(reader, None, 0)
                digest = None if anonymous else self.caller_digest(req)
                if digest is not None:
                    token = resume_token.issue(self.cfg.resume_secret, digest, conv)
                    headers.append(("X-Ringcast-Resume-Token", token))
                conn.start_stream(headers, req.version)
                finished = await self.fanout.relay(conn, reader, owner)
            else:
                finished = await self.aggregate(conn, reader, route)
        finally:
            if anonymous:
                # The plain OpenAI contract: the generation dies with the connection.
                if finished:
                    await self.store.remove(conv, owner)
                else:
                    await self.store.cancel(conv, owner)

    def validate_body(self, body: bytes, route: str) -> bool:
        if route == "chat":
            c = decode_body(chat_request_decoder, body)
            mt = c.max_tokens if c.max_tokens is not None else c.max_completion_tokens
            stream, n = c.stream, c.n
        else:
            p = decode_body(completion_request_decoder, body)
            mt, stream, n = p.max_tokens, p.stream, p.n
        if mt is not None and mt < 0:
            raise HttpError(400, "max_tokens must be >= 0")
        if n != 1:
            raise HttpError(400, "only n=1 is supported")
        return stream

    def resume_headers(
        self, reader: StreamReader, info: StreamView | None, offset: int
    ) -> list[tuple[str, str]]:
        """Epoch, generation (of a stream of this node), served-from offset and first
        available offset of a stream response (``info``: the session as the store's ``get``
        gives it)."""
        first = info.first_available if info is not None else 0
        local = reader.epoch == self.store.epoch
        return [
            ("X-Ringcast-Epoch", str(reader.epoch)),
            *([("X-Ringcast-Generation", generation_of(reader))] if local else []),
            ("X-Ringcast-Offset", str(offset)),
            ("X-Ringcast-First-Available", str(first)),
        ]

    async def aggregate(self, conn: Connection, reader: StreamReader, route: str) -> bool:
        """Non-streaming: read the whole session and answer one JSON completion. At most
        ``--session-bytes`` of it are held (the most a session can buffer anyway): a longer
        answer is refused with 413 as soon as it gets there, instead of growing this
        process's memory for as long as the generation runs."""
        body = bytearray()
        limit = self.cfg.session_bytes
        too_large = HttpError(
            413,
            f"the answer is longer than {limit} bytes, the most a non-streaming response "
            'holds (--session-bytes); ask with "stream": true or a lower max_tokens',
        )
        try:
            while True:
                data = await reader.aread(RELAY_READ)
                if not data:
                    break
                body += data
                if len(body) > limit:
                    raise too_large
        except SessionEnded as e:
            code, message = END_EVENTS.get(e.reason, (410, f"stream ended: {e.reason}"))
            raise HttpError(code if code != 409 else 410, message, e.reason) from None
        except OffsetLost:
            raise too_large from None
        finally:
            reader.close()
        text: list[str] = []
        finish: str | None = None
        usage: Usage | None = None
        cid, model, created = "", self.cfg.model_name, int(time.time())
        for data in iter_sse_data(bytes(body)):
            if data == b"[DONE]":
                break
            try:
                chunk = chunk_decoder.decode(data)
            except (msgspec.DecodeError, RecursionError):
                continue
            if chunk.error is not None:
                code = chunk.error.code if 400 <= chunk.error.code < 600 else 500
                raise HttpError(code, chunk.error.message, chunk.error.type)
            cid, model, created = chunk.id or cid, chunk.model or model, chunk.created or created
            usage = chunk.usage or usage
            for ch in chunk.choices:
                if ch.index != 0:
                    continue
                piece = ch.delta.content if ch.delta is not None else ch.text
                if piece:
                    text.append(piece)
                finish = ch.finish_reason or finish
        content = "".join(text)
        result: ChatCompletion | Completion
        if route == "chat":
            result = ChatCompletion(
                cid or "chatcmpl-" + secrets.token_hex(12),
                "chat.completion",
                created,
                model,
                [ChatChoice(0, AssistantMessage("assistant", content), finish)],
                usage=usage,
            )
        else:
            result = Completion(
                cid or "cmpl-" + secrets.token_hex(12),
                "text_completion",
                created,
                model,
                [CompletionChoice(0, content, finish)],
                usage=usage,
            )
        self.send_json(conn, result)
        return True

    # -- resumable stream routes

    async def get_stream(self, req: Request, conn: Connection, owner: str) -> None:
        conv = self.stream_id(req, "/v1/stream")
        last_id = req.headers.get("last-event-id")
        if last_id is not None and last_id != "":
            what = "Last-Event-ID"
            offset = parse_offset(last_id, what)
        else:
            what = "'from'"
            offset = parse_offset(req.query_params(once=STREAM_PARAMS).get("from"), what)
        generation = req.query_params(once=STREAM_PARAMS).get("generation")
        if generation is not None and not GENERATION.fullmatch(generation):
            raise HttpError(
                400,
                "'generation' must be an X-Ringcast-Generation value as a stream response "
                "gave it (three numbers joined by dots)",
            )
        if self.passing is not None:
            await self.pass_to_producer(req, conn, conv, owner)
        try:
            reader = await self.store.open_reader(conv, offset, owner)
        except SessionNotFound:
            raise HttpError(404, "Stream not found or expired") from None
        except OffsetLost as e:
            self.counters.inc(HttpCounter.OFFSETS_LOST)
            raise HttpError(
                410,
                f"offset {offset} was dropped from the stream; the first "
                f"available offset is {e.first_available}",
                "offset_lost",
                first_available=e.first_available,
            ) from None
        except SessionEnded as e:
            # Deleted, replaced or evicted between its lookup and the reader's attach.
            code, message = END_EVENTS.get(e.reason, (410, f"stream ended: {e.reason}"))
            raise HttpError(code if code < 500 else 410, message, e.reason) from None
        except InvalidArgument as e:
            raise HttpError(400, str(e)) from None
        except StoreUnavailable as e:
            raise HttpError(503, str(e), "unavailable_error") from None
        epoch = self.store.epoch
        if (
            generation is not None
            and generation != generation_of(reader)
            # With --redis only what this node minted, for a stream of its own: another
            # node's stream has no slot here. Alone, a value of another epoch names a stream
            # of a segment made before this one.
            and (
                not self.cfg.clustered
                or (generation.startswith(f"{epoch}.") and reader.epoch == epoch)
            )
        ):
            # Another stream under the same id now: its bytes from this offset on would be
            # spliced onto the other one's in the client's hands.
            reader.close()
            raise HttpError(
                409,
                "the stream was replaced by a newer request with the same conversation id "
                "since the generation given; what was read of the other one cannot be resumed "
                "here (read the new one from offset 0)",
                "replaced",
            )
        # One lookup serves both the end check and the response headers (a lookup may read
        # the /proc entries of a producer in another process and of the process table's rows).
        info = await self.store.get(conv, owner)
        total = final_total(reader, info)
        if total is not None and offset >= total and what == "Last-Event-ID":
            # A browser's EventSource reconnecting to a finished stream it has read to the
            # end: 204 is the one answer that stops it (an empty 200 makes it reconnect
            # every few seconds for ever).
            reader.close()
            return conn.send(204, b"")
        if total is not None and offset > total:
            # llama-server answers an empty 200 here, so a client with a wrong byte count
            # learns nothing; an offset equal to the total (it has everything) stays a 200.
            reader.close()
            raise HttpError(
                416,
                f"{what} {offset} is beyond the end of the stream, which finished with "
                f"{total} bytes; resume from an offset of at most {total}",
            )
        if offset > 0:
            self.counters.inc(HttpCounter.RESUMES)
        conn.start_stream(self.resume_headers(reader, info, offset), req.version)
        await self.fanout.relay(conn, reader, owner)

    async def pass_to_producer(self, req: Request, conn: Connection, conv: str, owner: str) -> None:
        """Raises :class:`HandedOff` once ``conn`` went to the HTTP process producing the
        running stream ``conv`` (``ringcast.server.passing``); returns if it stays here."""
        passing = self.passing
        assert passing is not None
        if conn.passed_in is not None:
            return  # passed here already: never on again
        info = await self.store.get(conv, owner)
        pid = getattr(info, "producer_pid", 0) if info is not None else 0
        if (
            info is None
            or info.is_done
            or not pid
            or pid == passing.own_pid
            or info.readers >= MAX_READERS
        ):
            return
        if conn.pass_to(req, lambda fd, data: passing.give(fd, data, pid), MAX_PASSED):
            self.counters.inc(HttpCounter.PASSED)
            raise HandedOff
        self.counters.inc(HttpCounter.PASS_FAILED)

    async def delete_stream(self, req: Request, conn: Connection, owner: str) -> None:
        conv = self.stream_id(req, "/v1/stream")
        with contextlib.suppress(InvalidArgument):
            await self.store.cancel(conv, owner)
        conn.send(204, b"")

    async def lookup(self, req: Request, conn: Connection, owner: str) -> None:
        """llama-server's lookup: each id matches the session with exactly that id and every
        one whose id starts with ``<id>::``. At most :data:`MAX_LOOKUP_IDS` ids; the caller's
        sessions are listed once per request, whatever the number of ids, and each session
        is matched by its own id's prefixes (so the work is ids + sessions, not their
        product: 250,000 ids once froze a process for 23 s)."""
        body = decode_body(lookup_request_decoder, req.body) if req.body.strip() else None
        ids = set((body.conversation_ids or []) if body is not None else [])
        ids.discard("")
        if len(ids) > MAX_LOOKUP_IDS:
            raise HttpError(
                413,
                f"{len(ids)} conversation ids in one lookup; at most {MAX_LOOKUP_IDS} are "
                "accepted per request: split the list",
            )
        out: list[StreamInfo] = []
        if ids:
            for i in await self.store.list(owner):
                if any(p in ids for p in lookup_keys(i.conversation_id)):
                    out.append(self.stream_info(i))
        self.send_json(conn, out)

    async def list_streams(self, req: Request, conn: Connection, owner: str) -> None:
        conv = req.query_params().get("conversation_id")
        if conv:
            try:
                infos = await self.store.lookup_prefix(self.check_conv_id(conv), owner)
            except InvalidArgument:
                infos = []
        else:
            infos = await self.store.list(owner)
        self.send_json(conn, [self.stream_info(i) for i in infos])

    # -- Durable Streams (ringcast.server.durable)

    async def durable_request(self, req: Request, conn: Connection, owner: str) -> None:
        await self.durable.handle(req, conn, owner)

    # -- the rest

    async def health(self, req: Request, conn: Connection, owner: str) -> None:
        mirror = None
        if self.cfg.clustered:
            row = read_mirrors(self.counters, self.cfg)
            mirror = MirrorHealth(
                self.cfg.node_id,
                bool(row[MirrorCounter.CONNECTED]),
                row[MirrorCounter.LAG_BYTES],
                row[MirrorCounter.LAG_US] / 1e6,
                row[MirrorCounter.REDIS_ERRORS],
                row[MirrorCounter.RECONNECTS],
                row[MirrorCounter.GAPS],
            )
        self.send_json(conn, Health("ok", self.index, os.getpid(), self.store.epoch, mirror))

    async def models(self, req: Request, conn: Connection, owner: str) -> None:
        self.send_json(conn, ModelList([ModelCard(self.cfg.model_name, self.created)]))

    async def metrics(self, req: Request, conn: Connection, owner: str) -> None:
        body = await self.prometheus.render()
        conn.send(200, body, "text/plain; version=0.0.4")


MAX_LOOKUP_IDS = 10_000
"""Most conversation ids one ``POST /v1/streams/lookup`` may ask for (a WebUI asks for its
stored conversations; thousands is plenty, and the cap bounds the work of one request)."""


def generation_of(reader: StreamReader) -> str:
    """``X-Ringcast-Generation``: which stream of its conversation id ``reader`` reads (the
    store's epoch, the session's slot and generation), for a resume to say which one it had
    (``?generation=``). Only a node's own streams have one: with ``--redis`` the node that
    produces a stream checks it, the others take it as given (a stream read from another
    node has no slot there)."""
    return f"{reader.epoch}.{reader.slot}.{reader.generation}"


def lookup_keys(conversation_id: str) -> list[str]:
    """The lookup ids that match a session with this id: the id itself and each prefix that
    ends where a ``::`` begins (``a::b::c`` is found by ``a``, ``a::b`` and ``a::b::c``)."""
    keys = [conversation_id]
    at = conversation_id.find("::")
    while at > 0:
        keys.append(conversation_id[:at])
        at = conversation_id.find("::", at + 2)
    return keys


def anon_id_prefix(owner: str) -> str:
    """Start of the random id of an anonymous request made under ``owner``'s key: the
    sessions live under :data:`ANON_OWNER`, and this is how they count against that key's
    quota."""
    return f"anon-{owner}-"


def decode_body(decoder: msgspec.json.Decoder[T], body: bytes) -> T:
    """A JSON request body, or 400 saying what is wrong with it (also for nesting deeper
    than the decoder's recursion limit, which raises RecursionError)."""
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as e:
        raise HttpError(400, f"invalid request body: {e}") from None
    except msgspec.DecodeError as e:
        raise HttpError(400, f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise HttpError(400, "request body is nested too deeply") from None


STREAM_ROUTE = Route({"GET": App.get_stream, "DELETE": App.delete_stream})

ROUTES: dict[str, Route] = {
    "/v1/chat/completions": Route({"POST": App.post_chat}),
    "/v1/completions": Route({"POST": App.post_completions}),
    # Also /v1/stream/{id} (the id may contain '/').
    "/v1/stream": STREAM_ROUTE,
    "/v1/streams/lookup": Route({"POST": App.lookup}),
    "/v1/streams": Route({"GET": App.list_streams}),
    "/health": Route({"GET": App.health}, keyed=False),
    "/v1/models": Route({"GET": App.models}, passed_through=True),
    "/metrics": Route({"GET": App.metrics}, keyed=False),
    # Also everything under it: /ds/v1/stream/{name}, /ds/v1/conversations/{id}.
    DURABLE_PREFIX: Route(dict.fromkeys(DURABLE_METHODS, App.durable_request)),
}


def resolve(path: str) -> Route | None:
    """ringcast's route for ``path``, or None."""
    route = ROUTES.get(path)
    if route is None and path.startswith("/v1/stream/"):
        route = ROUTES["/v1/stream"]
    if route is None and path.startswith(DURABLE_PREFIX + "/"):
        route = ROUTES[DURABLE_PREFIX]
    return route
