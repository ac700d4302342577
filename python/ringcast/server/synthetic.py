"""The synthetic model of the workers (no ``--upstream``, ``--generator`` or ``--replay``):
deterministic text derived from the prompt, paced at ``--tokens-per-s`` after an optional
``--prefill-s``, honouring ``max_tokens``.

Paced, every stream of a worker is served by one :class:`Ticker`: one timer for the earliest
token due, and each firing emits every token due by then, whichever stream it belongs to. A
token costs a heap push and pop and its append, instead of a timer, a future, a task step and
two generator steps (``asyncio.sleep`` in an async generator per stream). Token ``i`` of a
stream is due at ``t0 + i / tokens_per_s`` with ``t0`` the end of its prefill, as before.
Unpaced (``--tokens-per-s 0``) the async generator :func:`synthetic_model` runs as it did.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
import zlib
from collections.abc import AsyncIterator, Iterator

from ringcast.server.config import ServeConfig
from ringcast.server.emitter import Emitter
from ringcast.server.plugin import GenerateFn, JobContext

VOCAB = (
    "the a ring of bytes keeps every token so readers can come back later and resume "
    "from an offset while the producer never waits for anyone slow lighthouse keeper "
    "watched ships pass through fog at night sea wind stone lamp shore quiet bright old "
    "small story once upon time stream resumes cleanly across processes shared memory"
).split()


def synthetic_tokens(prompt: str, n: int) -> Iterator[str]:
    """Deterministic text for a prompt: the same prompt always gives the same tokens.

    Made one at a time: ``max_tokens`` comes from the client, and ``10**9`` must cost no more
    memory or work up front than ``16``.
    """
    rng = random.Random(zlib.crc32(prompt.encode("utf-8", "surrogatepass")))
    for i in range(n):
        yield (" " if i else "") + rng.choice(VOCAB)


def synthetic_model(cfg: ServeConfig) -> GenerateFn:
    async def generate(ctx: JobContext) -> AsyncIterator[str | bytes]:
        mt = ctx.max_tokens
        n = cfg.default_max_tokens if mt is None else mt
        loop = asyncio.get_running_loop()
        if cfg.prefill_s > 0:
            await asyncio.sleep(cfg.prefill_s)
        t0 = loop.time()
        tps = cfg.tokens_per_s
        for i, tok in enumerate(synthetic_tokens(ctx.prompt_text(), n)):
            if tps > 0 and (delay := t0 + i / tps - loop.time()) > 0:
                await asyncio.sleep(delay)
            elif i % 32 == 31:
                # Unpaced, or behind the pace (a fast --tokens-per-s): a long generation still
                # lets the worker's other jobs and its cancellation poll run.
                await asyncio.sleep(0)
            yield tok
        ctx.finish_reason = "length"

    return generate


BURST = 32
"""The most tokens one stream emits per turn of the loop (the unpaced model yields as often)."""


class _Stream:
    __slots__ = ("done", "emitter", "i", "n", "t0", "tokens")

    def __init__(
        self,
        tokens: Iterator[str],
        n: int,
        t0: float,
        emitter: Emitter,
        done: asyncio.Future[None],
    ) -> None:
        self.tokens = tokens
        self.n = n
        self.t0 = t0
        self.i = 0
        self.emitter = emitter
        self.done = done


class Ticker:
    """Paces the synthetic model's streams of one worker with one timer (see the module
    docstring)."""

    def __init__(self, tokens_per_s: float, prefill_s: float) -> None:
        assert tokens_per_s > 0
        self.step = 1.0 / tokens_per_s
        self.prefill = max(prefill_s, 0.0)
        self.loop = asyncio.get_running_loop()
        self.due: list[tuple[float, int, _Stream]] = []
        self.order = itertools.count()  # ties by arrival, and a stream is never compared
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = float("inf")

    async def run(self, ctx: JobContext, emitter: Emitter, max_tokens: int) -> None:
        """Emits the stream's ``max_tokens`` tokens (``emitter.text``) on their schedule;
        returns after the last, raises what an append raised (``Gone``, ``SegmentError``).
        Cancelling the caller drops the stream at its next due time."""
        if max_tokens > 0:
            done: asyncio.Future[None] = self.loop.create_future()
            tokens = synthetic_tokens(ctx.prompt_text(), max_tokens)
            t0 = self.loop.time() + self.prefill
            self._push(t0, _Stream(tokens, max_tokens, t0, emitter, done))
            await done
        elif self.prefill > 0:
            await asyncio.sleep(self.prefill)
        ctx.finish_reason = "length"

    def _push(self, at: float, s: _Stream) -> None:
        heapq.heappush(self.due, (at, next(self.order), s))
        if at < self.timer_at:
            if self.timer is not None:
                self.timer.cancel()
            self.timer_at = at
            self.timer = self.loop.call_at(at, self._fire)

    def _fire(self) -> None:
        self.timer, self.timer_at = None, float("inf")
        due, now = self.due, self.loop.time()
        ready = []
        while due and due[0][0] <= now:
            ready.append(heapq.heappop(due)[2])
        for st in ready:
            if not st.done.done() and self._emit(st, now):
                heapq.heappush(due, (st.t0 + st.i * self.step, next(self.order), st))
        if due:
            # In the past when a stream is still behind: the next turn of the loop, after
            # whatever else is ready (the cancellation poll, new jobs).
            self.timer_at = due[0][0]
            self.timer = self.loop.call_at(self.timer_at, self._fire)

    def _emit(self, st: _Stream, now: float) -> bool:
        """Emits the stream's tokens due by ``now``, at most ``BURST`` (a stream behind its
        pace catches up over several turns, every other stream served at each); False once
        it has ended (its future then says how)."""
        try:
            for _ in range(BURST):
                st.emitter.token(next(st.tokens))
                st.i += 1
                if st.i == st.n:
                    st.done.set_result(None)
                    return False
                if st.t0 + st.i * self.step > now:
                    break
        except Exception as e:  # Gone, SegmentError, ...: the job's own handlers judge
            st.done.set_exception(e)
            return False
        return True
