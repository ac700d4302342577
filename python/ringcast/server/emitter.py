"""Framing and appending the events of one session (the producer side of a worker job)."""

from __future__ import annotations

import asyncio
import random
import time

from ringcast._core import SocketFanOut
from ringcast.server.counters import SharedCounters, WorkerCounter
from ringcast.server.store import StreamStore, StreamWriter
from ringcast.wire.openai import (
    ChatChunkChoice,
    ChatCompletionChunk,
    CompletionChoice,
    CompletionChunk,
    Delta,
    Usage,
    json_encoder,
)
from ringcast.wire.sse import DONE_EVENT

_SENTINEL = "\x00ringcast:content\x00"
_SENTINEL_JSON = json_encoder.encode(_SENTINEL)


_ID_SENTINEL = "\x00ringcast:id\x00"
_ID_SENTINEL_JSON = json_encoder.encode(_ID_SENTINEL)
_CREATED_SENTINEL = 7312605948213406271
_CREATED_SENTINEL_JSON = b"%d" % _CREATED_SENTINEL


class _Frames:
    """The text chunk (around its content) and the role chunk of one route and model, encoded
    once with sentinels for the stream's id and creation time, which a stream's
    :meth:`fill` puts in: a stream then costs two replacements per chunk instead of
    building and encoding Structs. ``None`` where a sentinel's encoding is not there exactly
    once (a model name holding one): that chunk is then built for each stream."""

    __slots__ = ("role", "text")

    def __init__(self, emitter: Emitter) -> None:
        self.text = _split_around_content(emitter._chunk(_SENTINEL))
        self.role: bytes | None = emitter._chunk("", role="assistant")
        if self.text is not None and not _sentinels_once(self.text[0], self.text[1]):
            self.text = None
        if not _sentinels_once(self.role, b""):
            self.role = None

    @staticmethod
    def fill(chunk: bytes, id_json: bytes, created: bytes) -> bytes:
        """``chunk`` with the stream's creation time, then its id (last: an id may hold any
        text, a sentinel's digits too, and nothing is replaced after it)."""
        return chunk.replace(_CREATED_SENTINEL_JSON, created, 1).replace(
            _ID_SENTINEL_JSON, id_json, 1
        )


def _sentinels_once(head: bytes, tail: bytes) -> bool:
    """Whether the id's and the creation time's sentinels are each in ``head`` exactly once
    and nowhere in ``tail``."""
    return (
        head.count(_ID_SENTINEL_JSON) == 1
        and head.count(_CREATED_SENTINEL_JSON) == 1
        and _ID_SENTINEL_JSON not in tail
        and _CREATED_SENTINEL_JSON not in tail
    )


_FRAMES: dict[tuple[str, str], _Frames] = {}
""":class:`_Frames` by (route, model); the model is the server's, so this holds a few."""
_FRAMES_MAX = 64

_USAGE_SENTINELS = (7312605948213406272, 7312605948213406273, 7312605948213406274)
_USAGE_SENTINELS_JSON = tuple(b"%d" % n for n in _USAGE_SENTINELS)
_FINALS: dict[tuple[str, str, str], bytes | None] = {}
"""The final chunk of a route, model and finish reason, encoded once with the sentinels of
:class:`_Frames` and :data:`_USAGE_SENTINELS` for its usage (None: a sentinel is not there
exactly once; built for each stream then)."""


def _split_around_content(chunk: bytes) -> tuple[bytes, bytes] | None:
    """The bytes of a text chunk before and after its content's JSON string, given the chunk
    encoded with :data:`_SENTINEL` as its content; None if the sentinel's
    encoding is not there exactly once (a model name or id holding it: the chunk is then
    built whole for each token)."""
    if chunk.count(_SENTINEL_JSON) != 1:
        return None
    head, _, tail = chunk.partition(_SENTINEL_JSON)
    return head, tail


THROUGH_DELIVERED = 2
"""``Writer.write_event_through``: the event went to every client of the tap, nobody needs
telling."""

TOKENS_FLUSH_S = 0.05
"""How long the tokens a producer appended may wait before its ``tokens`` counter shows
them."""


class TurnBatch:
    """What the appends of one turn of a producer's event loop leave to the end of the turn.

    Every append defers the wake-up of the readers' processes (``defer_wake``); the first of
    a turn schedules one :meth:`StreamStore.flush_wakes` (``call_soon``: after every task the
    turn woke), so an HTTP process is sent one datagram for all the events of a turn instead
    of one per event, and wakes once to write them all. The producer's token counter is added
    to at most every TOKENS_FLUSH_S.

    ``own_loop`` (an HTTP process that runs its own jobs, ``--workers 0``): the readers of
    this process are told by the flush directly, from the writers the turn appended through,
    instead of by a datagram this process would send itself."""

    def __init__(
        self, store: StreamStore, counters: SharedCounters, own_loop: bool = False
    ) -> None:
        self.store = store
        self.counters = counters
        self.tokens = 0
        self.own_loop = own_loop
        self.written: dict[StreamWriter, None] = {}
        self.scheduled = False
        self.counting = False
        self.loop = asyncio.get_running_loop()

    def note(self, writer: StreamWriter) -> None:
        """An append was made through ``writer`` with ``defer_wake=True``."""
        if self.own_loop:
            self.written[writer] = None
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.flush)

    def finalize(self, writer: StreamWriter, state: str = "done") -> bool:
        """Ends ``writer``'s stream as ``state``, its readers told at the end of the turn
        with the appends (:meth:`StreamWriter.finalize`)."""
        done = writer.finalize(state, defer_wake=True)
        self.note(writer)
        return done

    def flush(self) -> None:
        self.scheduled = False
        if self.own_loop:
            written, self.written = self.written, {}
            self.store.flush_wakes(written, self.loop)
        else:
            self.store.flush_wakes()
        if self.tokens and not self.counting:
            self.count_later()

    def count_later(self) -> None:
        """The shared counter (a struct write) is added to once per TOKENS_FLUSH_S, not once
        per turn."""
        self.counting = True
        self.loop.call_later(TOKENS_FLUSH_S, self.flush_tokens)

    def flush_tokens(self) -> None:
        """Adds the tokens counted since the last call to the shared ``tokens`` counter."""
        self.counting = False
        if self.tokens:
            self.counters.inc(WorkerCounter.TOKENS, self.tokens)
            self.tokens = 0


class Gone(Exception):
    """The session ended under the producer (cancelled, replaced or evicted)."""


class Emitter:
    """Frames and appends events for one session; raises ``Gone`` once writes are refused.

    With a ``batch``, appends defer their wake-ups to the end of the loop's turn (see
    :class:`TurnBatch`); without, each append wakes the readers' processes itself.

    With a :attr:`tap` (set by the session's pump in this process), an append is written
    through (``Writer.write_event_through``): when the pump allows it, the append's call also
    sends the event to the pump's clients, and nobody then needs waking."""

    tap: SocketFanOut | None = None
    """The socket fan-out of this session's pump in this process (see the class docs)."""

    def __init__(
        self,
        writer: StreamWriter,
        route: str,
        model: str,
        counters: SharedCounters,
        chunk_id: str | None = None,
        batch: TurnBatch | None = None,
    ) -> None:
        self.writer = writer
        self.batch = batch
        self.route = route
        self.model = model
        self.counters = counters
        # Unique, not secret (the stream's id is the conversation id): from the process's
        # random generator (reseeded after a fork), not the system call token_hex makes.
        prefix = "chatcmpl-" if route == "chat" else "cmpl-"
        self.id = chunk_id or f"{prefix}{random.getrandbits(96):024x}"
        self.created = int(time.time())
        self.tokens = 0
        self.started = False
        # A text chunk is the same bytes every time but for its content: encoded once around
        # a sentinel, each token then costs one string encode (msgspec escapes a string the
        # same wherever it stands) instead of building and encoding four Structs. The frames
        # of a route and model are encoded once per process, with sentinels for the id and
        # the creation time that each stream puts in (_Frames).
        frames = _FRAMES.get((route, model))
        if frames is None:
            frames = _Frames(self._sentinel_emitter(route, model))
            if len(_FRAMES) < _FRAMES_MAX:
                _FRAMES[(route, model)] = frames
        id_json, created = json_encoder.encode(self.id), b"%d" % self.created
        text = frames.text
        self._text_frame = (
            (_Frames.fill(text[0], id_json, created), text[1])
            if text is not None
            else _split_around_content(self._chunk(_SENTINEL))
        )
        role = frames.role
        self._role_chunk = (
            _Frames.fill(role, id_json, created)
            if role is not None
            else self._chunk("", role="assistant")
        )

    @staticmethod
    def _sentinel_emitter(route: str, model: str) -> Emitter:
        """An emitter (never written through) whose id and creation time are the sentinels
        of :class:`_Frames`, to encode its chunks with."""
        e = Emitter.__new__(Emitter)
        e.route, e.model = route, model
        e.id, e.created = _ID_SENTINEL, _CREATED_SENTINEL
        return e

    def raw(self, event: bytes) -> None:
        self._append(event)

    def count_token(self) -> None:
        """One more token in the worker's ``tokens`` counter (added at the end of the turn
        with a batch)."""
        if self.batch is None:
            self.counters.inc(WorkerCounter.TOKENS)
        else:
            self.batch.tokens += 1

    def _append(self, event: bytes, through: bool = True) -> None:
        """Appends ``event`` framed with its ``id:`` line (``Writer.write_event``: the offset
        is taken under the append lock, no ``total_bytes`` round trip and no copy here).
        ``through=False``: not written through the tap even if there is one, for an event
        that another follows at once (the role chunk, the final chunk): the next append's
        pass then sends both in one write."""
        batch = self.batch
        if batch is None:
            if not self.writer.write_event(event):
                raise Gone
            return
        tap = self.tap
        if tap is None or not through:
            if not self.writer.write_event(event, defer_wake=True):
                raise Gone
            batch.note(self.writer)
            return
        # (A tap is set only on the emitter of a ringcast.Writer: Jobs.run_job links no other.)
        done = self.writer.write_event_through(event, tap)  # type: ignore[attr-defined]
        if done != THROUGH_DELIVERED:
            if not done:
                raise Gone
            batch.note(self.writer)
        elif not batch.counting:
            batch.count_later()  # no flush is coming to count the tokens

    def _chunk(
        self,
        content: str | None,
        role: str | None = None,
        finish: str | None = None,
        usage: Usage | None = None,
    ) -> bytes:
        obj: ChatCompletionChunk | CompletionChunk
        if self.route == "chat":
            obj = ChatCompletionChunk(
                self.id,
                "chat.completion.chunk",
                self.created,
                self.model,
                [ChatChunkChoice(0, Delta(role, content), finish)],
                usage=usage,
            )
        else:
            obj = CompletionChunk(
                self.id,
                "text_completion",
                self.created,
                self.model,
                [CompletionChoice(0, content or "", finish)],
                usage=usage,
            )
        return b"data: " + json_encoder.encode(obj) + b"\n\n"

    def start(self) -> None:
        """The role chunk, written with the first token (as llama-server does), so nothing
        is appended while the prompt is processed."""
        if not self.started:
            self.started = True
            if self.route == "chat":
                self._append(self._role_chunk, through=False)

    def text(self, piece: str) -> None:
        if not self.started:
            self.start()
        frame = self._text_frame
        if frame is None:
            data = self._chunk(piece)
        else:
            data = frame[0] + json_encoder.encode(piece) + frame[1]
        self._append(data)
        self.tokens += 1

    def token(self, piece: str) -> None:
        """One generated token: :meth:`text` and :meth:`count_token` in one step, the append
        inline (the per-token path of every job)."""
        batch = self.batch
        frame = self._text_frame
        if batch is None or frame is None or not self.started:
            self.text(piece)
            self.count_token()
            return
        writer = self.writer
        tap = self.tap
        if tap is None:
            if not writer.write_event(frame[0] + json_encoder.encode(piece) + frame[1], True):
                raise Gone
            batch.note(writer)
        else:
            done = writer.write_event_through(  # type: ignore[attr-defined]
                frame[0] + json_encoder.encode(piece) + frame[1], tap
            )
            if done != THROUGH_DELIVERED:
                if not done:
                    raise Gone
                batch.note(writer)
            elif not batch.counting:
                batch.count_later()  # no flush is coming to count the tokens
        self.tokens += 1
        batch.tokens += 1

    def finish(self, reason: str, prompt_tokens: int) -> None:
        self.start()
        self._append(self._final_chunk(reason, prompt_tokens), through=False)
        self.raw(DONE_EVENT)

    def _final_chunk(self, reason: str, prompt_tokens: int) -> bytes:
        """The chunk with the finish reason and the usage, from a template of the route,
        model and reason (:data:`_FINALS`) where there is one."""
        counts = (prompt_tokens, self.tokens, prompt_tokens + self.tokens)
        key = (self.route, self.model, reason)
        if key in _FINALS:
            template = _FINALS[key]
        else:
            template = self._sentinel_emitter(self.route, self.model)._chunk(
                None, finish=reason, usage=Usage(*_USAGE_SENTINELS)
            )
            if not (
                _sentinels_once(template, b"")
                and all(template.count(u) == 1 for u in _USAGE_SENTINELS_JSON)
            ):
                template = None
            if len(_FINALS) < _FRAMES_MAX:
                _FINALS[key] = template
        if template is None:
            return self._chunk(None, finish=reason, usage=Usage(*counts))
        # The usage first, then the creation time and the id (see _Frames.fill).
        for sentinel, n in zip(_USAGE_SENTINELS_JSON, counts, strict=True):
            template = template.replace(sentinel, b"%d" % n, 1)
        return _Frames.fill(template, json_encoder.encode(self.id), b"%d" % self.created)
