"""Awaitable reads: one notifier fd per process, one future per waiting reader.

The Rust ``Notifier`` owns a thread that sleeps on this process's doorbell in the segment and
makes its eventfd readable when a subscribed session advances. Each event loop registers that
fd once (``add_reader``); on readiness it drains the list of advanced slots and wakes only the
futures waiting on those slots. Ten thousand waiting readers therefore cost ten thousand
futures and one thread, not ten thousand threads.
"""

from __future__ import annotations

import asyncio
import weakref

from ringcast._core import Notifier, Reader


class _LoopHub:
    """Per-event-loop table of waiters, fed by the process's notifier fd."""

    def __init__(self, loop: asyncio.AbstractEventLoop, notifier: Notifier) -> None:
        self._loop = loop
        self._notifier = notifier
        # slot -> (generation -> futures); a slot can hold only one generation at a time, but a
        # reader of an old generation may still wait while the slot is being reused.
        self._waiters: dict[int, dict[int, list[asyncio.Future[None]]]] = {}
        loop.add_reader(notifier.fileno(), self._on_ready)

    def _on_ready(self) -> None:
        for slot in self._notifier.drain():
            by_gen = self._waiters.pop(slot, None)
            if by_gen is None:
                continue
            for generation, futures in by_gen.items():
                self._notifier.unsubscribe(slot, generation)
                for fut in futures:
                    if not fut.done():
                        fut.set_result(None)

    async def wait(self, reader: Reader) -> None:
        slot, generation = reader.slot, reader.generation
        fut: asyncio.Future[None] = self._loop.create_future()
        by_gen = self._waiters.setdefault(slot, {})
        futures = by_gen.get(generation)
        if futures is None:
            futures = by_gen[generation] = []
            self._notifier.subscribe(slot, generation)
        futures.append(fut)
        # Subscribing before this check closes the window where the producer published
        # between our failed read and the subscription.
        if reader.ready():
            self._wake_one(slot, generation, fut)
            return
        try:
            await fut
        finally:
            # Cancelled while waiting: forget the future (a woken one was already removed).
            if not fut.done() or fut.cancelled():
                self._wake_one(slot, generation, fut)

    def _wake_one(self, slot: int, generation: int, fut: asyncio.Future[None]) -> None:
        by_gen = self._waiters.get(slot)
        if by_gen is None:
            return
        futures = by_gen.get(generation)
        if futures is None:
            return
        try:
            futures.remove(fut)
        except ValueError:
            return
        if not futures:
            del by_gen[generation]
            self._notifier.unsubscribe(slot, generation)
            if not by_gen:
                del self._waiters[slot]

    def close(self) -> None:
        self._loop.remove_reader(self._notifier.fileno())


# Per event loop, one hub per notifier fd (one fd per segment handle in this process).
_hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, _LoopHub]] = (
    weakref.WeakKeyDictionary()
)


def _hub_for(notifier: Notifier) -> _LoopHub:
    loop = asyncio.get_running_loop()
    by_fd = _hubs.get(loop)
    if by_fd is None:
        by_fd = _hubs[loop] = {}
    fd = notifier.fileno()
    hub = by_fd.get(fd)
    if hub is None:
        hub = by_fd[fd] = _LoopHub(loop, notifier)
    return hub


async def aread(reader: Reader, notifier: Notifier, max_bytes: int) -> bytes:
    """Implementation of ``Reader.aread``: read now, else wait for the notifier, repeat."""
    hub = _hub_for(notifier)
    while True:
        data = reader.read_nowait(max_bytes)
        if data is not None:
            return data
        await hub.wait(reader)
