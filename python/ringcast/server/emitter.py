"""Framing and appending the events of one session (the producer side of a worker job)."""

from __future__ import annotations

import secrets
import time

from ringcast.server.counters import SharedCounters
from ringcast.server.store import StreamWriter
from ringcast.wire.openai import (
    ChatChunkChoice,
    ChatCompletionChunk,
    CompletionChoice,
    CompletionChunk,
    Delta,
    Usage,
    json_encoder,
)
from ringcast.wire.sse import DONE_EVENT, frame_event


class Gone(Exception):
    """The session ended under the producer (cancelled, replaced or evicted)."""


class Emitter:
    """Frames and appends events for one session; raises ``Gone`` once writes are refused."""

    def __init__(
        self,
        writer: StreamWriter,
        route: str,
        model: str,
        counters: SharedCounters,
        chunk_id: str | None = None,
    ) -> None:
        self.writer = writer
        self.route = route
        self.model = model
        self.counters = counters
        self.id = chunk_id or (
            ("chatcmpl-" if route == "chat" else "cmpl-") + secrets.token_hex(12)
        )
        self.created = int(time.time())
        self.tokens = 0
        self.started = False

    def raw(self, event: bytes) -> None:
        w = self.writer
        if not w.write(frame_event(w.total_bytes, event)):
            raise Gone

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
                self.raw(self._chunk("", role="assistant"))

    def text(self, piece: str) -> None:
        self.start()
        self.raw(self._chunk(piece))
        self.tokens += 1

    def finish(self, reason: str, prompt_tokens: int) -> None:
        self.start()
        usage = Usage(prompt_tokens, self.tokens, prompt_tokens + self.tokens)
        self.raw(self._chunk(None, finish=reason, usage=usage))
        self.raw(DONE_EVENT)
