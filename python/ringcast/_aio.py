"""Awaitable reads: one notifier socket per process, one future per waiting reader.

``aread`` here is the wait behind ``Reader.aread``, which ``ringcast/__init__.py`` installs on
the extension's ``Reader`` class (the extension imports no Python code).

The Rust ``Notifier`` owns a datagram socket; a producer sends it one byte when a session this
process subscribed to advances and the notifier is armed (no thread in between: the loop's own
thread is the one woken). Sending disarms it; it is re-armed lazily, when a reader is about to
wait (after yielding the CPU once) or when readers are left waiting after a drain, and every
re-arm is followed by a scan of what came while disarmed. So appends while all of a process's
readers are busy cost the producer nothing, and a busy machine batches instead of waking.

Each event loop registers that fd once (``add_reader``); on readiness it takes the datagram,
scans for the advanced slots and wakes only the futures waiting on those slots. Ten thousand
waiting readers therefore cost ten thousand futures and no thread.

Besides one-shot waits (a future per ``aread`` that has to wait), a hub holds standing
*watches* (:func:`watch`): a consumer that wants every change of one session, such as the
server's fan-out pump, registers once and the hub calls its ``on_ready()`` straight from the
readiness callback for each advanced slot, so a batch of changes costs one loop callback and
no future, task switch or awaitable per event. A watch counts as a waiting reader for the
wake-up protocol below (arming, re-arming, rescans, producer checks) for as long as it is
registered.

Subscriptions are sticky: a hub holds one subscription per slot (the newest generation it has
seen there) for as long as readers keep waiting on it, so a reader that reads and waits again
costs no subscribe/unsubscribe round trip. The first drain that finds a subscribed slot advanced
while nobody waits on it drops the subscription (drains happen while some reader of the
process waits; a process left with no waiter is disarmed and its subscriptions cost a producer
one atomic load each); so do ``_LoopHub.close`` and the collection of
the loop.
"""

from __future__ import annotations

import asyncio
import logging
import select
import weakref
from collections.abc import Callable
from typing import Protocol

from ringcast._core import Notifier, Reader, RingcastError, SessionEnded

log = logging.getLogger("ringcast.aio")

RESCAN_S = 1.0
"""How often a loop with waiting readers scans their sessions without being told to."""

PRODUCER_CHECK_S = 0.5
"""How often a loop with waiting readers looks at their sessions' producers. A producer
found dead twice in a row (so that a sweeping ``ringcast serve`` manager has had its chance to
take the session over and end it in-band) fails the waiting reads with
``SessionEnded("producer_died")``: without a manager, a reader learns of the death within
about a second instead of waiting for ever. Blocking ``Reader.read`` does the same."""


def _producer_died(pid: int) -> SessionEnded:
    exc = SessionEnded(
        f"the producer of this session (pid {pid}) died without finalizing it; no more bytes "
        "will come unless another process takes the session over (Segment.take_over_dead)"
    )
    exc.reason = "producer_died"
    return exc


def _release(notifier: Notifier, subscribed: dict[int, int]) -> None:
    """Drops every subscription a hub holds (also run when its loop is collected)."""
    while subscribed:
        slot, generation = subscribed.popitem()
        try:
            notifier.unsubscribe(slot, generation)
        except ValueError:  # InvalidArgument: e.g. a forked child's inherited notifier
            pass


class Consumer(Protocol):
    """What a standing watch (:func:`watch`) calls, from the event loop's thread. A consumer
    may also define ``on_company(shared: bool)``: called whenever whether anything else in
    the loop waits on the session (another watch, or a reader's wait) may have changed, and
    once when the watch is made."""

    def on_ready(self) -> None:
        """The session may have advanced (or ended): read what is there with
        ``read_nowait``, which may still return None (a change already read). Must not
        raise; it may cancel its own watch."""

    def on_error(self, exc: BaseException) -> None:
        """The session's producer died (``SessionEnded("producer_died")``); the watch is
        already cancelled."""


class Watch:
    """A standing wait on one reader's session (see :func:`watch`)."""

    __slots__ = ("_hub", "consumer", "generation", "reader", "slot")

    def __init__(self, hub: _LoopHub, reader: Reader, consumer: Consumer) -> None:
        self._hub: _LoopHub | None = hub
        self.reader = reader
        self.consumer = consumer
        self.slot = reader.slot
        self.generation = reader.generation

    def cancel(self) -> None:
        """Stop watching (idempotent); the subscription is dropped lazily, as for futures."""
        hub, self._hub = self._hub, None
        if hub is not None:
            hub._unwatch(self)


class _LoopHub:
    """Per-event-loop table of waiters, fed by the process's notifier fd."""

    def __init__(self, loop: asyncio.AbstractEventLoop, notifier: Notifier) -> None:
        # Weak: ``_hubs`` maps the loop to this hub, and a value that referred to its key would
        # keep the loop (and this hub's subscriptions) alive forever.
        self._loop = weakref.ref(loop)
        self._notifier = notifier
        # slot -> (generation -> futures); a slot can hold only one generation at a time, but a
        # reader of an old generation may still wait while the slot is being reused.
        self._waiters: dict[int, dict[int, list[asyncio.Future[None]]]] = {}
        # slot -> the generation this hub holds one notifier subscription for.
        self._subscribed: dict[int, int] = {}
        self._row_lost = False
        # Whether the last rescan found a producer's datagram on its way ("sending").
        self._sending_seen = False
        # Readability of the notifier's socket, checked without waiting (poll, unlike
        # select, takes any descriptor number).
        self._poller = select.poll()
        self._poller.register(notifier.fileno(), select.POLLIN)
        # Not a method of self: the finalizer must not keep the loop alive.
        self._finalizer = weakref.finalize(loop, _release, notifier, self._subscribed)
        loop.add_reader(notifier.fileno(), self._on_ready)
        self._rescan_handle = loop.call_later(RESCAN_S, self._rescan)
        # (slot, generation) -> one waiting reader of it, whose producer is checked.
        self._watched: dict[tuple[int, int], Reader] = {}
        self._dead_once: set[tuple[int, int]] = set()
        self._check_handle: asyncio.TimerHandle | None = None
        # slot -> standing watches on it (a tuple, replaced on change, so a consumer may
        # cancel its watch while the hub iterates).
        self._watches: dict[int, tuple[Watch, ...]] = {}

    def _waiting(self) -> bool:
        """Whether any reader waits: a future or a standing watch."""
        return bool(self._waiters) or bool(self._watches)

    def _rescan(self) -> None:
        """Safety net: every RESCAN_S, re-arm and scan for readers still waiting. The wake-up
        protocol is designed not to lose a wake-up, but a lost one (a bug, or a peer in
        another network namespace whose datagrams never arrive) then costs a waiting reader
        at most RESCAN_S instead of hanging it, and is logged as a warning."""
        loop = self._loop()
        if loop is None or loop.is_closed():
            return
        try:
            if self._waiting():
                self._rescan_now()
            else:
                self._sending_seen = False
        finally:
            self._rescan_handle = loop.call_later(RESCAN_S, self._rescan)

    def _rescan_now(self) -> None:
        self._check_row()
        # With readers waiting, every path has left the notifier armed (`wait` arms after
        # adding its future; `_on_ready` re-arms while futures remain) unless a producer took
        # the arm: its datagram is then on the way ("sending") or in the socket, and the loop
        # handles it as soon as this timer returns. "sending" twice in a row is a producer
        # that died between taking the arm and sending: scan (and re-arm) anyway.
        state = self._notifier.arm_state
        in_flight = state == "sending" and not self._sending_seen
        self._sending_seen = state == "sending"
        if in_flight or self._poller.poll(0):
            return
        self._notifier.arm()
        woken = self._wake(self._notifier.drain())
        # That drain may have swallowed a datagram sent after the arm (see _rearm).
        self._rearm(yield_first=False)
        if woken and state == "armed":
            # A publish between its bump of the session and its look at our arm: its
            # datagram is coming; we were merely first.
            log.debug("rescan woke %d reader(s) ahead of their datagram", woken)
        elif woken:
            log.warning(
                "rescan woke %d waiting reader(s) whose wake-up datagram never came (the "
                "notifier was disarmed by a send that did not arrive%s): a lost wake-up, "
                "worth a bug report with the log around it",
                woken,
                ", or by a producer that died sending" if state == "sending" else "",
            )

    def _check_row(self) -> None:
        """Logs (once) if another process claimed this process's row in the process table,
        as if this one had died: producers then signal that process, so until this one
        re-opens the segment its readers are woken only by rescans."""
        if not self._row_lost and not self._notifier.owns_row():
            self._row_lost = True
            log.error(
                "another process claimed this process's row of the segment's process table; "
                "async readers here are now woken only by the once-a-second rescan"
            )

    def _check_producers(self) -> None:
        """Every PRODUCER_CHECK_S while readers wait: fail the waits of sessions whose
        producer was found dead at this check and the one before."""
        self._check_handle = None
        # One reader per waited-on session; one /proc read per distinct producer.
        readers = dict(self._watched)
        for watches in self._watches.values():
            for w in watches:
                readers.setdefault((w.slot, w.generation), w.reader)
        pids = Reader.dead_producers(list(readers.values()))
        for key, pid in zip(list(readers), pids, strict=True):
            self._check_death(key, pid)
        self._arm_check()

    def _check_death(self, key: tuple[int, int], pid: int | None) -> None:
        if pid is None:
            self._dead_once.discard(key)
        elif key not in self._dead_once:
            self._dead_once.add(key)
        else:
            self._dead_once.discard(key)
            self._fail(key, pid)

    def _arm_check(self) -> None:
        loop = self._loop()
        if (self._watched or self._watches) and self._check_handle is None and loop is not None:
            self._check_handle = loop.call_later(PRODUCER_CHECK_S, self._check_producers)

    def _fail(self, key: tuple[int, int], pid: int) -> None:
        slot, generation = key
        self._watched.pop(key, None)
        by_gen = self._waiters.get(slot)
        futures = by_gen.pop(generation, []) if by_gen is not None else []
        if by_gen is not None and not by_gen:
            del self._waiters[slot]
            self._company(slot)
        for fut in futures:
            if not fut.done():
                fut.set_exception(_producer_died(pid))
        for w in self._watches.get(slot, ()):
            if w.generation == generation:
                w.cancel()
                self._call(w, _producer_died(pid))

    def _on_ready(self) -> None:
        # The datagram that woke us (more, if any, keep the socket readable: the loop calls
        # back), then the sessions that advanced.
        self._wake(self._notifier.scan(True))
        # Readers still waiting need the next change signalled: re-arm, and scan what was
        # published while disarmed. (Readers just woken re-arm when they wait again.) The scan
        # reads no datagram, so a publish right after this arm leaves its datagram in the
        # socket and calls this again: one arm is enough, unlike `_rearm`'s drains.
        if self._waiting() and self._notifier.arm(False):
            self._wake(self._notifier.scan())

    def _rearm(self, yield_first: bool) -> None:
        """While readers wait: re-arms the notifier if a publish disarmed it, and then scans
        what was published while it was disarmed (those publishes sent nothing).

        Once is not enough: a publish right after the arm disarms us again and sends a
        datagram, and the drain that follows can swallow that datagram (it empties the
        socket). With readers left waiting, the process would then stay disarmed with nothing
        in its socket, and no later publish would tell it anything: a lost wake-up (found by
        the rescan's warning, reproduced in tests/test_core_async.py). So arm again until an
        arm finds us still armed."""
        while self._waiting() and self._notifier.arm(yield_first):
            yield_first = False
            self._wake(self._notifier.drain())

    def _wake(self, changed: list[int]) -> int:
        """Calls the watches and resolves the futures waiting on the changed slots; returns
        how many."""
        woken = 0
        watches = self._watches
        waiters = self._waiters
        for slot in changed:
            standing = watches.get(slot)
            if standing is not None:
                for w in standing:
                    if w._hub is not None:
                        # Inline for the common case (one call per event); `_call` reports
                        # what a consumer lets out.
                        try:
                            w.consumer.on_ready()
                        except Exception as e:
                            self._report(w, e)
                        woken += 1
                if slot not in waiters:
                    continue
            by_gen = waiters.pop(slot, None)
            if by_gen is not None:
                for gen in by_gen:
                    self._watched.pop((slot, gen), None)
                if standing is not None:
                    self._company(slot)
            if by_gen is None:
                # Advanced with nobody waiting: stop listening to it.
                generation = self._subscribed.pop(slot, None)
                if generation is not None:
                    self._notifier.unsubscribe(slot, generation)
                continue
            # Woken readers usually wait again: keep the subscription.
            for futures in by_gen.values():
                for fut in futures:
                    if not fut.done():
                        fut.set_result(None)
                        woken += 1
        return woken

    def _company(self, slot: int) -> None:
        """Tells the standing watches of ``slot`` whose consumer has ``on_company`` whether
        anything else in this loop waits on the session now (another watch, or a future):
        a consumer that is alone may let the session's producer in this process write
        through to its clients without waking anybody (the server's fan-out pump)."""
        standing = self._watches.get(slot)
        if standing is None:
            return
        shared = len(standing) > 1 or slot in self._waiters
        for w in standing:
            hook = getattr(w.consumer, "on_company", None)
            if hook is not None:
                hook(shared)

    def poke(self, slots: list[int]) -> int:
        """See :func:`poke`."""
        return self._wake(self._notifier.scan_slots(slots))

    def _call(self, w: Watch, exc: BaseException | None) -> None:
        """Calls a watch's consumer: ``on_ready()``, or ``on_error(exc)``."""
        try:
            if exc is None:
                w.consumer.on_ready()
            else:
                w.consumer.on_error(exc)
        except Exception as e:
            self._report(w, e)

    def _report(self, w: Watch, e: Exception) -> None:
        """A consumer let ``e`` out: it goes to the loop's exception handler, and the watch
        is cancelled, instead of stopping the wake-up of the other slots."""
        w.cancel()
        loop = self._loop()
        if loop is not None:
            loop.call_exception_handler(
                {"message": "a ringcast watch consumer raised", "exception": e}
            )

    def _subscribe(self, slot: int, generation: int) -> None:
        held = self._subscribed.get(slot)
        if held is None or generation > held:
            # A newer generation replaces the slot's subscription in the notifier. An older
            # one is not subscribed: its session has left the slot, which `ready()` sees.
            self._notifier.subscribe(slot, generation)
            self._subscribed[slot] = generation

    def watch(self, reader: Reader, consumer: Consumer) -> Watch:
        w = Watch(self, reader, consumer)
        self._subscribe(w.slot, w.generation)
        self._watches[w.slot] = (*self._watches.get(w.slot, ()), w)
        self._company(w.slot)
        self._arm_check()
        # As for a future (see `wait`): subscribed and armed before the readiness check.
        self._rearm(yield_first=False)
        if w._hub is None:
            return w
        try:
            ready = reader.ready()
        except RingcastError as e:
            # The rearm's drain called the consumer already, which read the session to its
            # end and closed its reader ("the reader was closed", a plain RingcastError):
            # nothing is left to watch (a watch left registered would keep this hub
            # re-arming, rescanning and subscribed for ever).
            w.cancel()
            if type(e) is not RingcastError:
                raise
            return w
        if ready:
            self._call(w, None)
        return w

    def _unwatch(self, w: Watch) -> None:
        left = tuple(x for x in self._watches.get(w.slot, ()) if x is not w)
        if left:
            self._watches[w.slot] = left
            self._company(w.slot)
        else:
            self._watches.pop(w.slot, None)
        key = (w.slot, w.generation)
        if key not in self._watched and not any(x.generation == w.generation for x in left):
            self._dead_once.discard(key)

    async def wait(self, reader: Reader) -> None:
        slot, generation = reader.slot, reader.generation
        self._subscribe(slot, generation)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        by_gen = self._waiters.get(slot)
        if by_gen is None:
            by_gen = self._waiters[slot] = {}
            if slot in self._watches:
                self._company(slot)
        by_gen.setdefault(generation, []).append(fut)
        self._watched.setdefault((slot, generation), reader)
        self._arm_check()
        # About to wait: if a producer disarmed this process, yield the CPU once first (what
        # it appends meanwhile needs no wake-up).
        self._rearm(yield_first=True)
        # Subscribing and arming before this check close the window where the producer
        # published between our failed read and the subscription.
        if fut.done() or reader.ready():
            self._forget(slot, generation, fut)
            return
        try:
            await fut
        finally:
            # Cancelled while waiting: forget the future (a woken one was already removed).
            if not fut.done() or fut.cancelled():
                self._forget(slot, generation, fut)

    def _forget(self, slot: int, generation: int, fut: asyncio.Future[None]) -> None:
        """Removes one waiting future; the subscription stays (dropped lazily by a drain)."""
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
            self._watched.pop((slot, generation), None)
            if not by_gen:
                del self._waiters[slot]
                self._company(slot)

    def close(self) -> None:
        self._rescan_handle.cancel()
        if self._check_handle is not None:
            self._check_handle.cancel()
        loop = self._loop()
        if loop is not None and not loop.is_closed():
            loop.remove_reader(self._notifier.fileno())
        self._finalizer()


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


def watch(reader: Reader, consumer: Consumer) -> Watch:
    """Calls ``consumer.on_ready()`` from the running loop's notifier callback whenever
    ``reader``'s session may have advanced or ended, until the returned watch is cancelled;
    and once at once (synchronously) if it is ready now. Where ``aread`` costs a future and a
    task switch per change, a watch costs a method call: for a consumer that writes what it
    reads straight on (the server's fan-out pump). ``consumer.on_error`` gets
    ``SessionEnded("producer_died")`` as ``aread`` would raise it."""
    return _hub_for(reader.notifier()).watch(reader, consumer)


def poker(loop: asyncio.AbstractEventLoop, notifier: Notifier) -> Callable[[list[int]], int] | None:
    """:func:`poke` bound to ``loop`` and ``notifier``, for a producer that pokes once per turn
    of its loop (the lookups done once); None while that loop has no hub for the notifier
    (no reader of it has waited yet: there is nobody to tell)."""
    by_fd = _hubs.get(loop)
    hub = by_fd.get(notifier.fileno()) if by_fd is not None else None
    return None if hub is None else hub.poke


def poke(loop: asyncio.AbstractEventLoop, notifier: Notifier, slots: list[int]) -> int:
    """Tells ``loop``'s readers (the running loop's: passed in, as a producer holds it, since
    ``asyncio.get_running_loop()`` costs a ``getpid`` system call) of ``notifier``'s process
    that the sessions in ``slots`` may have advanced, as a datagram from their producer
    would (watches are called, waiting futures resolved, here and now); how many were. For
    a producer in the same loop, which flushes its deferred wake-ups with
    ``Segment.flush_wakes(skip_own=True)`` and so sends its own process no datagram. Only
    the slots the notifier is subscribed to and that moved since its last look count
    (``Notifier.scan_slots``), and that look is updated, so the next scan does not report
    them again."""
    bound = poker(loop, notifier)
    return 0 if bound is None else bound(slots)


async def aread(reader: Reader, notifier: Notifier, max_bytes: int) -> bytes:
    """The wait behind ``Reader.aread``: read now, else wait for the notifier, repeat."""
    hub = _hub_for(notifier)
    while True:
        data = reader.read_nowait(max_bytes)
        if data is not None:
            return data
        await hub.wait(reader)
