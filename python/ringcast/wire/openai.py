"""OpenAI wire types of ``ringcast serve``: every JSON request body, streamed chunk, response
and error body.

Each type is a ``msgspec.Struct``; the encoders and decoders are created once at import time
(msgspec's perf tips: building a ``Decoder`` per call costs more than the decode itself).
"""

from __future__ import annotations

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


class MirrorHealth(msgspec.Struct):
    """A node's mirror to Redis (``--redis``), as ``/health`` reports it."""

    node_id: str
    connected: bool
    lag_bytes: int
    lag_seconds: float
    redis_errors: int
    reconnects: int
    gaps: int


class Health(msgspec.Struct, omit_defaults=True):
    status: str
    process: int
    """Index of the HTTP process that answered (also in the ``X-Ringcast-Process`` header)."""
    pid: int
    epoch: int
    mirror: MirrorHealth | None = None
    """Only on a node with ``--redis`` / ``--redis-cluster``."""


# --------------------------------------------------------------------------------------------
# Encoders / decoders, created once.

json_encoder = msgspec.json.Encoder()
chat_request_decoder = msgspec.json.Decoder(ChatCompletionRequest)
completion_request_decoder = msgspec.json.Decoder(CompletionRequest)
lookup_request_decoder = msgspec.json.Decoder(LookupRequest)
chunk_decoder = msgspec.json.Decoder(ChunkIn)


def error_json(code: int, message: str, type_: str, first_available: int | None = None) -> bytes:
    """The JSON error body ``{"error": {"code", "message", "type"}}``."""
    return json_encoder.encode(ErrorBody(ErrorDetail(code, message, type_, first_available)))
