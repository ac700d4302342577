"""The plug-in API of the jobs: ``ringcast serve --generator module:function``.

With ``--workers 0`` (the default) a generator runs in the event loop of the HTTP process that
took the request: one that computes between its awaits holds up that process's clients
(``await asyncio.sleep(0)`` now and then, or give ``--workers N`` to run the jobs apart).

A generator is an async generator function taking a :class:`JobContext`::

    # mypkg/model.py
    from ringcast.server.plugin import JobContext

    async def generate(ctx: JobContext):
        prompt = ctx.prompt_text()          # messages or prompt, flattened
        for word in prompt.split():
            yield word + " "                # str: wrapped into a chunk for you
        ctx.finish_reason = "stop"

Each ``str`` becomes one ``chat.completion.chunk`` (or ``text_completion``) event; ``bytes``
are appended as one raw SSE event (e.g. ``b"data: {...}\\n\\n"``). ringcast writes the role
chunk first and the final chunk (``finish_reason`` and ``usage``) plus ``data: [DONE]`` last.
If the session is cancelled the generator is closed (``GeneratorExit`` at its ``yield``, or
``CancelledError`` at its ``await``). Raising an exception ends the stream with an SSE error
event and state ``failed``. A generator function marked ``ringcast_raw_stream = True`` yields
a whole stream's SSE events (a recorded one: ``ringcast serve --replay``), and ringcast adds no
role chunk, final chunk or ``[DONE]`` of its own.

(``ringcast.worker`` re-exports :class:`JobContext` for plug-ins written against that path.)
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import AsyncIterator, Callable

from ringcast.server.store import StreamWriter
from ringcast.wire.openai import ChatCompletionRequest, CompletionRequest

__all__ = ["GenerateFn", "JobContext", "load_generator"]


class JobContext:
    """What a generator gets: the request, and a way to see cancellation.

    ``request`` is the decoded body (``ChatCompletionRequest`` or ``CompletionRequest``),
    ``body`` the raw JSON bytes (unknown fields included). Set ``finish_reason`` before
    returning to override ``"stop"``.
    """

    def __init__(
        self,
        route: str,
        body: bytes,
        request: ChatCompletionRequest | CompletionRequest,
        writer: StreamWriter,
    ) -> None:
        self.route = route
        self.body = body
        self.request = request
        self.finish_reason = "stop"
        self._writer = writer

    @property
    def cancelled(self) -> bool:
        return self._writer.cancelled

    @property
    def max_tokens(self) -> int | None:
        r = self.request
        if isinstance(r, ChatCompletionRequest) and r.max_tokens is None:
            return r.max_completion_tokens
        return r.max_tokens

    def prompt_text(self) -> str:
        r = self.request
        if isinstance(r, CompletionRequest):
            return r.prompt if isinstance(r.prompt, str) else "\n".join(r.prompt)
        parts: list[str] = []
        for m in r.messages:
            if isinstance(m.content, str):
                parts.append(m.content)
            elif m.content:
                parts.extend(str(p.get("text", "")) for p in m.content)
        return "\n".join(parts)


GenerateFn = Callable[[JobContext], AsyncIterator[str | bytes]]


def check_generator(spec: str) -> str | None:
    """What is wrong with a ``--generator`` value that can be told without running its
    module (the form, a module that is not there), or None. The manager checks this before
    starting anything; the module itself is imported only by the workers."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        return f"--generator {spec!r}: expected 'module:function'"
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError) as e:
        return f"--generator {spec!r}: cannot import {module}: {type(e).__name__}: {e}"
    if not found:
        return f"--generator {spec!r}: no module named {module!r} (check PYTHONPATH)"
    return None


def load_generator(spec: str) -> GenerateFn:
    """Import ``module:function`` (the ``--generator`` flag)."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"--generator {spec!r}: expected 'module:function'")
    fn = getattr(importlib.import_module(module), name)
    if not callable(fn):
        raise ValueError(f"--generator {spec!r} is not callable")
    return fn  # type: ignore[no-any-return]
