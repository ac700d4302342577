"""Wire types of ``ringcast serve``: every JSON body, SSE chunk and internal job message.

Each type is a ``msgspec.Struct``; the encoders and decoders are created once at import time
(msgspec's perf tips: building a ``Decoder`` per call costs more than the decode itself).

SSE framing lives here too, because it is part of the wire contract: every event a producer
appends to a ring is ``id: <offset just after this event>\\n`` followed by the event text, so
``Last-Event-ID`` and a client's own byte count name the same resume point.

>>> frame_event(0, b"data: x\\n\\n")
b'id: 15\\ndata: x\\n\\n'
>>> len(frame_event(0, b"data: x\\n\\n"))
15
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

# --------------------------------------------------------------------------------------------
# Requests


class Message(msgspec.Struct):
    """One chat message. ``content`` may be a string or a list of content parts."""

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class ChatCompletionRequest(msgspec.Struct):
    """``POST /v1/chat/completions``. Unknown fields are accepted and ignored (and forwarded
    verbatim by the upstream proxy, which sends the original body bytes)."""

    messages: list[Message]
    model: str = ""
    stream: bool = False
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stream_options: StreamOptions | None = None
    n: int = 1


class CompletionRequest(msgspec.Struct):
    """``POST /v1/completions``."""

    prompt: str | list[str]
    model: str = ""
    stream: bool = False
    max_tokens: int | None = None
    stream_options: StreamOptions | None = None
    n: int = 1


class LookupRequest(msgspec.Struct):
    """``POST /v1/streams/lookup``: a missing or null list means no ids."""

    conversation_ids: list[str] | None = None


# --------------------------------------------------------------------------------------------
# Streaming chunks (what producers write, framed as SSE)


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Delta(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(msgspec.Struct):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class _ChunkHead(msgspec.Struct, omit_defaults=True):
    """Fields every streamed chunk starts with, in this order on the wire."""

    id: str
    object: str
    """``"chat.completion.chunk"`` or ``"text_completion"`` (required, so always written)."""
    created: int
    model: str


class ChatCompletionChunk(_ChunkHead, omit_defaults=True):
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: None = None


class CompletionChunk(_ChunkHead, omit_defaults=True):
    choices: list[CompletionChoice]
    usage: Usage | None = None


# --------------------------------------------------------------------------------------------
# Non-streaming responses (aggregated by the HTTP process from the same chunks)


class AssistantMessage(msgspec.Struct):
    role: str
    content: str


class ChatChoice(msgspec.Struct):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletion(msgspec.Struct, omit_defaults=True):
    id: str
    object: str
    """Always ``"chat.completion"`` (a required field, so ``omit_defaults`` keeps it)."""
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class Completion(msgspec.Struct, omit_defaults=True):
    id: str
    object: str
    """Always ``"text_completion"`` (a required field, so ``omit_defaults`` keeps it)."""
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


# Lenient views used to aggregate chunks from any producer (synthetic, upstream, plug-in).


class _DeltaIn(msgspec.Struct):
    content: str | None = None
    role: str | None = None


class _ChoiceIn(msgspec.Struct):
    index: int = 0
    delta: _DeltaIn | None = None
    text: str | None = None
    finish_reason: str | None = None


class ErrorDetail(msgspec.Struct, omit_defaults=True):
    """The error object. ``first_available`` is set only for offset-lost errors."""

    code: int
    message: str
    type: str
    first_available: int | None = None


class ErrorBody(msgspec.Struct):
    """``{"error": {"code", "message", "type"}}``: every error response and SSE error event."""

    error: ErrorDetail


class ChunkIn(msgspec.Struct):
    id: str = ""
    created: int = 0
    model: str = ""
    choices: list[_ChoiceIn] = msgspec.field(default_factory=list)
    usage: Usage | None = None
    error: ErrorDetail | None = None


# --------------------------------------------------------------------------------------------
# Stream registry routes


class StreamInfo(msgspec.Struct):
    """One entry of ``/v1/streams/lookup`` and ``/v1/streams``: llama-server's fields first
    (unix seconds, ``completed_at`` 0 while running), then ringcast's."""

    conversation_id: str
    is_done: bool
    total_bytes: int
    started_at: int
    completed_at: int
    state: str
    first_available: int
    epoch: int
    readers: int


class ModelCard(msgspec.Struct):
    id: str
    created: int
    object: str = "model"
    owned_by: str = "ringcast"


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: str = "list"


class Health(msgspec.Struct):
    status: str
    process: int
    """Index of the HTTP process that answered (also in the ``X-Ringcast-Process`` header)."""
    pid: int
    epoch: int


# --------------------------------------------------------------------------------------------
# Internal: HTTP process -> worker job hand-off (msgpack, length-prefixed on a Unix socket)


class Job(msgspec.Struct, array_like=True):
    conversation_id: str
    owner: str
    generation: int
    route: str
    """``"chat"`` or ``"completions"``."""
    body: bytes


JOB_ACK_ADOPTED = b"A"
"""Worker -> HTTP process: the worker adopted the session and is now its producer."""
JOB_ACK_GONE = b"G"
"""Worker -> HTTP process: the session was gone (deleted or replaced) before adoption."""


# --------------------------------------------------------------------------------------------
# Encoders / decoders, created once.

json_encoder = msgspec.json.Encoder()
chat_request_decoder = msgspec.json.Decoder(ChatCompletionRequest)
completion_request_decoder = msgspec.json.Decoder(CompletionRequest)
lookup_request_decoder = msgspec.json.Decoder(LookupRequest)
chunk_decoder = msgspec.json.Decoder(ChunkIn)
job_encoder = msgspec.msgpack.Encoder()
job_decoder = msgspec.msgpack.Decoder(Job)


def error_json(code: int, message: str, type_: str, first_available: int | None = None) -> bytes:
    """The JSON error body ``{"error": {"code", "message", "type"}}``."""
    return json_encoder.encode(ErrorBody(ErrorDetail(code, message, type_, first_available)))


def error_event(code: int, message: str, type_: str, first_available: int | None = None) -> bytes:
    """An unframed SSE error event: ``data: {"error": ...}\\n\\n``.

    The ``openai`` SDK raises ``APIError`` on it, and browsers' ``EventSource`` deliver it as a
    normal message, so every client sees why a stream stopped.
    """
    return b"data: " + error_json(code, message, type_, first_available) + b"\n\n"


DONE_EVENT = b"data: [DONE]\n\n"


def frame_event(total_before: int, event: bytes) -> bytes:
    """Prefix ``event`` with ``id: N\\n`` where N is the ring offset just after the framed
    event, given ``total_before`` = the writer's ``total_bytes`` before the append.

    The id line's own digits count towards N, so N is found by fixed point: at most one
    correction, when adding the digits carries N into one more digit.
    """
    base = total_before + len(event) + 5  # "id: " + "\n"
    digits = len(str(base))
    n = base + digits
    if len(str(n)) != digits:
        n += 1
    return b"id: %d\n%b" % (n, event)


_ID_LINE = re.compile(rb"^id:[^\n]*\n", re.MULTILINE)


def strip_id_lines(event: bytes) -> bytes:
    """Remove ``id:`` lines from an upstream event before ringcast frames it with its own."""
    if b"id:" not in event:
        return event
    return _ID_LINE.sub(b"", event)


def iter_sse_data(body: bytes) -> list[bytes]:
    """The ``data:`` payloads of each complete event in ``body`` (multi-line data joined by
    ``\n``; one space after the colon removed, as the SSE spec says)."""
    out: list[bytes] = []
    for raw in body.split(b"\n\n"):
        data = []
        for ln in raw.split(b"\n"):
            if ln.startswith(b"data:"):
                value = ln[5:]
                data.append(value[1:] if value.startswith(b" ") else value)
        if data:
            out.append(b"\n".join(data))
    return out
