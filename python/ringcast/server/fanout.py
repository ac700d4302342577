"""Serving a stream to clients inside one HTTP process: each client's relay, the live-edge
pump that one stream's clients share, and the controller that decides how long pumps batch
(coalescing).

Flow control: a relay whose connection reaches the transport's high-water mark waits for it
to drain before reading more. The producer never waits for a reader: a client that stops
reading only falls behind in the store, and if it falls past the dropped prefix it gets an
in-band ``offset_lost`` event (the bytes it missed are gone).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable

from ringcast import _aio
from ringcast._core import (
    OffsetLost,
    Reader,
    SentCounter,
    SessionEnded,
    SessionNotFound,
    SocketFanOut,
)
from ringcast.http.protocol import Connection, frame_chunk
from ringcast.server.counters import HttpCounter, SharedCounters
from ringcast.server.emitter import Emitter
from ringcast.server.store import EndsDeadProducers, StreamReader, StreamStore, StreamView
from ringcast.wire.sse import error_event

RELAY_READ = 256 * 1024
SENT_FLUSH_S = 0.05
"""How long the bytes a pump wrote may wait before ``http_bytes_sent_total`` shows them."""
# Adaptive coalescing (Coalescing.run): sample period and moving-average weight of the
# event-loop lag, and the longer period while the process keeps up and does not linger (a
# timer that wakes an idle loop costs tens of microseconds on a VM, so a hundred a second
# were most of what a thousand silent streams cost); the lag above which a process is behind
# (the linger may climb to half the cap), far behind (to the whole cap), and below which it
# keeps up (an idle uvloop shows ~0.2 ms); the first linger when it falls behind and the
# decay per sample after.
LAG_PERIOD = 0.010
LAG_PERIOD_CALM = 0.050
LAG_SMOOTHING = 0.25
LAG_SLOW_SMOOTHING = 0.05
LAG_HIGH = 0.001
LAG_SEVERE = 0.004
LAG_LOW = 0.0005
LINGER_START = 0.002
LINGER_DECAY = 0.85
LAG_IDLE_WAIT = 1.0
"""While the process has no pump (nothing to coalesce) and does not linger, the controller
samples nothing: it waits for the first pump (:meth:`Coalescing.wake`), at most this long."""
MAX_TAKEOVERS = 3
"""How many times one relay or pump ends its stream in-band after finding its producer dead
(each time, the process that took it over may itself have died before finishing: then the
stream's producer is dead again)."""


class Coalescing:
    """How long this process's pumps wait after a pass before the next one (``linger``,
    seconds), and the cap it may reach (``cap``). Fixed at the cap with ``--coalesce always``;
    moved by :meth:`run` with ``--coalesce adaptive``."""

    def __init__(self, cap_ms: float, always: bool, counters: SharedCounters) -> None:
        self.cap = cap_ms / 1000.0
        self.counters = counters
        self.linger = self.cap if always else 0.0
        self.counters.set(HttpCounter.COALESCE_US, int(self.linger * 1e6))
        self.on_change: Callable[[], None] | None = None
        """Called when :attr:`linger` goes from 0 to more, or back."""
        self.busy: Callable[[], bool] = lambda: True
        """Whether the process has anything to coalesce (a pump); while it has not and does
        not linger, :meth:`run` waits for :meth:`wake` instead of sampling."""
        self._idle: asyncio.Future[None] | None = None

    def wake(self) -> None:
        """Something to coalesce may have started (a pump): :meth:`run` samples again."""
        idle = self._idle
        if idle is not None and not idle.done():
            idle.set_result(None)

    async def run(self) -> None:
        """Adaptive coalescing, like a NIC's adaptive interrupt moderation: pumps write on
        every wake-up while this process keeps up, and batch more while it falls behind.

        Every 10 ms (50 ms while it keeps up and does not linger), how late the loop woke
        this task (its lag: time spent running other
        callbacks, or waiting for a CPU) feeds a moving average. Above LAG_HIGH the linger
        doubles (from LINGER_START) up to half the ``--coalesce-ms`` cap (coming down to it
        by LINGER_DECAY per sample from above), and while a slower average (over ~0.2 s,
        where a process far behind shows its long stalls) is above LAG_SEVERE, up to the
        whole cap; below LAG_LOW it decays by LINGER_DECAY per sample (from the cap to
        nothing in ~0.4 s), and in between it holds. It climbs fast and comes down slowly, so
        a loaded process keeps the batching that gives it headroom instead of oscillating at
        the edge of saturation; an idle one goes back to writing every event at once. The two
        ceilings: a process that is merely busy (a loop ~1 ms late) needs a little batching
        and keeps its latency; one that is far behind (at 2.5 M events/s on 2 cores its loop
        was 2-6 ms late at the median, 10-130 ms at p90) needs all the batching it can get,
        or its backlog, not the linger, sets the latency."""
        cap = self.cap
        avg = slow = 0.0
        loop = asyncio.get_running_loop()
        while True:
            if not self.linger and avg < LAG_LOW and not self.busy():
                # Idle: a timer a few dozen times a second was most of what an idle process
                # cost. (A lag measured across this wait would mean nothing: none is taken.)
                idle = self._idle = loop.create_future()
                timer = loop.call_later(LAG_IDLE_WAIT, self.wake)
                await idle
                timer.cancel()
                self._idle = None
                avg = slow = 0.0
                continue
            # Calm (not lingering, no lag): one sample per LAG_PERIOD_CALM; a lag it finds is
            # then followed at LAG_PERIOD. (One late sample lifts the average above LAG_HIGH
            # by itself only if it is 4 ms late: a process falling behind slowly is seen
            # within a few calm periods.)
            period = LAG_PERIOD if self.linger or avg >= LAG_LOW else LAG_PERIOD_CALM
            t0 = time.monotonic()
            await asyncio.sleep(period)
            lag = max(0.0, time.monotonic() - t0 - period)
            avg += (lag - avg) * LAG_SMOOTHING
            slow += (lag - slow) * LAG_SLOW_SMOOTHING
            linger = self.linger
            if avg > LAG_HIGH:
                ceiling = cap if slow > LAG_SEVERE else cap / 2
                if linger > ceiling:  # no longer far behind: back down to the lower ceiling
                    linger = max(ceiling, linger * LINGER_DECAY)
                else:
                    linger = min(ceiling, max(linger * 2.0, LINGER_START))
            elif avg < LAG_LOW:
                linger = linger * LINGER_DECAY if linger > LINGER_START / 4 else 0.0
            if linger != self.linger:
                flips = not linger or not self.linger
                self.linger = linger
                self.counters.set(HttpCounter.COALESCE_US, int(linger * 1e6))
                if flips and self.on_change is not None:
                    self.on_change()


# Terminal events for readers whose session ended without finishing: (code, message).
END_EVENTS = {
    "cancelled": (410, "the stream was cancelled"),
    "replaced": (409, "the stream was replaced by a newer request with the same conversation id"),
    "evicted": (410, "the stream was evicted (expired, idle or memory full)"),
    "failed": (500, "the stream failed"),
    "node_lost": (
        502,
        "the node producing this stream was lost; every byte it had mirrored was sent, the "
        "rest is gone; retry the request",
    ),
}

Outcome = tuple[str, int | str | None]
"""How a pump lets a connection go: ("done", None), ("ended", reason) or ("solo", offset)."""


class Pump:
    """Live-edge fan-out of one session inside one HTTP process.

    Waking a reader task per client costs a notifier round and a task switch per event; with a
    thousand clients on a stream that dominates. A pump holds one ``Reader`` at the live edge,
    and on each wake-up writes the new bytes straight into every joined connection's
    transport (a synchronous call). A joined connection's relay task sleeps on one future
    until the stream ends or the pump detaches it (its write buffer reached the high-water
    mark, or the pump itself fell behind); it then continues on its own reader.

    A pump over the local segment (a ``ringcast.Reader``) is not a task either: it is a
    standing watch of the process's notifier hub (``ringcast._aio.watch``), which calls
    :meth:`on_ready` from its readiness callback for every advanced session, so an event
    costs a method call, one read and the writes: no future, task switch or awaitable. A
    pump over another store's reader (one without a notifier, e.g. Redis) runs :meth:`run`,
    a task that awaits :meth:`next_bytes`.

    Such a pump also writes from Rust (:attr:`sockets`, a ``SocketFanOut``): a joined
    connection whose transport has nothing buffered is added to the set with its socket, and
    each pass is one call that reads the ring, frames the chunk once and ``send``s it to
    every socket in the set, with no Python step per client. A socket that takes only part
    of a pass (or none) leaves the set, the rest goes through its transport and the
    connection is detached, as one whose buffer filled; one that fails is detached too (its
    relay then finds it closed). The others (a transport with bytes buffered when it
    joined) get the pass through their transports.

    When the session's producer runs in this process (a job of its own, ``--workers 0``), its
    :class:`~ringcast.server.emitter.Emitter` is linked to the pump (:meth:`link`) and writes
    through: each append's call also makes the pass (``Writer.write_event_through``), and
    nobody is woken. The pump allows that (``SocketFanOut.through``) only while all its
    connections are in :attr:`sockets`, nothing else in the process waits on the session
    (:meth:`on_company`), and the process is not coalescing (a lingering pass is the pump's
    to time); otherwise the producer's appends wake it as they would without the link.
    """

    def __init__(
        self,
        fanout: FanOut,
        registry: dict[tuple[int, int], Pump],
        key: tuple[int, int],
        reader: StreamReader,
        owner: str,
    ) -> None:
        self.fanout = fanout
        self.registry = registry
        """The dict of pumps this one is listed in (under ``key``) while it runs."""
        self.key = key
        self.reader = reader
        self.owner = owner
        self.takeovers = 0
        self.base = reader.offset
        """Where the pump started; :attr:`offset` counts on from there."""
        self.fanned = 0
        """Bytes passed by :meth:`_fan` (a pump without :attr:`sockets`)."""
        self.subs: dict[Connection, asyncio.Future[Outcome]] = {}
        self.carry = b""
        """The start of an event a capped read cut (:meth:`read_now`), sent with its rest."""
        self.loop = asyncio.get_running_loop()
        self.last_write = 0.0
        # Moving average of the time between this stream's events; it starts at the cap, as
        # if the stream were slow, so one early burst (the role chunk and the first token come
        # together) does not make a model-paced stream wait.
        self.spacing = fanout.coalescing.cap
        self.stopped = False
        self.watch: _aio.Watch | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None
        self.sockets: SocketFanOut | None = None
        """The joined connections written to from Rust (see the class docstring); None for a
        pump whose connections do not all get the same bytes, or over a remote reader."""
        self.fast: dict[int, Connection] = {}
        """The connections in :attr:`sockets`, by the id they are known there by."""
        self.producer: Emitter | None = None
        """The session's producer in this process, writing through :attr:`sockets`."""
        self.company = False
        """Whether anything else in this process waits on the session (:meth:`on_company`)."""
        fanout.coalescing.wake()
        if isinstance(reader, Reader):
            if self.per_conn is None:
                self.sockets = SocketFanOut(reader, fanout.socket_sent)
            # Started once the relay that made it has joined (as a task would start).
            self.loop.call_soon(self._start)
        else:
            self.task = self.loop.create_task(self.run())

    @property
    def offset(self) -> int:
        """The offset up to which the pump has passed the stream (where a connection joins
        or is let go)."""
        sockets = self.sockets
        return self.base + self.fanned + (0 if sockets is None else sockets.passed)

    def link(self, producer: Emitter) -> None:
        """The session's producer runs in this process: it writes through :attr:`sockets`
        while :meth:`_update_through` allows."""
        sockets = self.sockets
        if sockets is None or self.stopped or self.producer is not None:
            return
        self.producer = producer
        producer.tap = sockets
        self.fanout.linked(1)
        self._update_through()

    def unlink(self) -> None:
        """The producer stops writing through (its job ended, or this pump stops)."""
        producer = self.producer
        if producer is None:
            return
        self.producer = None
        if producer.tap is self.sockets:
            producer.tap = None
        self.fanout.linked(-1)
        self._update_through()

    def on_company(self, shared: bool) -> None:
        """The hub's call: whether anything else in this process now waits on the session
        (a reader catching up, another watch). A write through wakes nobody, so it is
        allowed only while nothing does."""
        self.company = shared
        self._update_through()

    def _update_through(self) -> None:
        """Lets the linked producer write through :attr:`sockets`, or stops it (see the class
        docs)."""
        sockets = self.sockets
        if sockets is None:
            return
        fast = self.fast
        on = (
            self.producer is not None
            and not self.company
            and not self.stopped
            and bool(fast)
            and len(fast) == len(self.subs)
            and not self.fanout.coalescing.linger
        )
        through = RELAY_READ if on else 0
        if sockets.through != through:
            sockets.through = through

    def join(self, conn: Connection) -> asyncio.Future[Outcome]:
        """Adds ``conn`` (at the pump's offset, written to by nobody else until the returned
        future is done) to the clients of every pass from now on."""
        fut: asyncio.Future[Outcome] = self.loop.create_future()
        self.subs[conn] = fut
        fut.add_done_callback(functools.partial(self._left, conn))
        sockets = self.sockets
        transport = conn.transport
        if (
            sockets is not None
            and conn.fd >= 0
            and transport is not None
            and not conn.closed
            # Closing (a reset read or written: uvloop has closed the descriptor already, and
            # reports the buffer empty), the number may be another connection's by now.
            and not transport.is_closing()
            and transport.get_write_buffer_size() == 0
        ):
            try:
                sockets.add(id(conn), conn.fd, conn.chunked, conn.fd_inode)
            except OSError:
                pass  # not a socket of ours to write to: its transport gets the passes
            else:
                self.fast[id(conn)] = conn
        self._update_through()
        return fut

    def _left(self, conn: Connection, fut: asyncio.Future[Outcome]) -> None:
        if self.fast.pop(id(conn), None) is conn and self.sockets is not None:
            self.sockets.remove(id(conn))
        if self.subs.get(conn) is fut:
            del self.subs[conn]
        self._update_through()
        if not self.subs:
            if self.task is not None:
                if not self.task.done():
                    self.task.cancel()
            else:
                self._stop(("solo", 0))

    def _linger(self) -> float:
        """Coalescing: no fan-out pass within ``coalescing.linger`` of the previous one, so a
        fast stream reaches each client in fewer, larger writes (one send per client per pass
        is the cost that dominates fan-out). ``coalescing.linger`` is 0 while the process keeps
        up (see :meth:`Coalescing.run`), and a stream whose events come further apart than
        half of it (a model's pace) never waits: it would gain no batching, only delay.
        Returns how long to wait before the next pass (0: now)."""
        linger = self.fanout.coalescing.linger
        if linger and self.spacing < linger / 2:
            wait = self.last_write + linger - self.loop.time()
            if wait > 0:
                return wait
        return 0.0

    def _fan(self, data: bytes) -> None:
        """One pass: ``data`` to every joined connection, counted, and the stream's event
        spacing updated. (The per-event path of every stream: kept to few steps.)"""
        self.fanned += len(data)
        self._passed(self.deliver(data), data.count(b"\n\n"))

    def _passed(self, sent: int, events: int) -> None:
        """A pass wrote ``sent`` body bytes in all, ``events`` events: counted, and the
        stream's event spacing updated. The shared bytes-sent counter (a ``struct`` write into
        the counters file, most of a microsecond) is stored once per ``SENT_FLUSH_S``
        (:meth:`FanOut.flush_sent`), not once per event."""
        if sent:
            fanout = self.fanout
            if not fanout.unsent:
                fanout.flush_sent_later()
            fanout.unsent += sent
        now = self.loop.time()
        last = self.last_write
        if last:
            self.spacing += ((now - last) / (events or 1) - self.spacing) / 4
        self.last_write = now

    # -- a pump over the local segment: a standing watch

    def _start(self) -> None:
        if self.stopped:
            return
        assert isinstance(self.reader, Reader)
        watch = _aio.watch(self.reader, self)
        if self.stopped:
            watch.cancel()  # its first pass, made at once, ended the stream
            return
        self.watch = watch
        producer = self.fanout.producers.get(self.key)
        if producer is not None:
            self.link(producer)

    def on_ready(self) -> None:
        """The notifier hub's call: the session may have advanced."""
        if self.timer is not None or self.stopped:
            return
        if self.fanout.coalescing.linger and (wait := self._linger()):
            self.timer = self.loop.call_later(wait, self._after_linger)
            return
        self._pass()

    def on_error(self, exc: BaseException) -> None:
        """The hub found the producer dead (``SessionEnded("producer_died")``)."""
        reason = getattr(exc, "reason", "producer_died")
        if self._end_dead(reason):
            self._start()  # watch again: the stream now holds its end
        else:
            self._stop(("ended", reason))

    def _end_dead(self, reason: str) -> bool:
        """The stream ended (``reason``): if its producer died, end it in-band
        (:meth:`FanOut.end_dead`); True if the pump should read on."""
        if reason != "producer_died" or self.takeovers >= MAX_TAKEOVERS:
            return False
        self.takeovers += 1
        return self.fanout.end_dead(self.reader.conversation_id, self.owner)

    def _after_linger(self) -> None:
        self.timer = None
        if not self.stopped:
            self._pass()

    def _pass(self) -> None:
        """Passes what the session has now to the joined connections (through
        :attr:`sockets` if there is one); a read that fails ends or detaches them all."""
        try:
            if self.sockets is not None:
                self._pass_sockets(self.sockets)
            else:
                self._pass_reads()
        except (OffsetLost, SessionEnded) as e:
            if isinstance(e, OffsetLost):
                self._stop(("solo", self.offset))  # each connection finds out for itself
            elif self._end_dead(e.reason):
                self._pass()
            else:
                self._stop(("ended", e.reason))
        except BaseException:
            self._stop(("solo", self.offset))
            raise

    def _pass_reads(self) -> None:
        read = self.read_now
        reader = self.reader
        assert isinstance(reader, Reader)
        while True:
            data = read()
            if data is None:
                return
            if not data:
                self.finished()
                self._stop(("done", None))
                return
            self._fan(data)
            # Read again after a capped read (more is there) or at the end of a finished
            # stream (its end is read as b""): neither will be signalled again. After a
            # short read of a running stream, a later append signals anew.
            if self.stopped or (len(data) < self.read_cap and not self.carry and not reader.at_end):
                return

    def _pass_sockets(self, sockets: SocketFanOut) -> None:
        """:meth:`_pass_reads` with :attr:`sockets`: Rust reads and writes to the connections
        in it; the others, if any, get the bytes through :meth:`deliver`."""
        fast = self.fast
        while True:
            got = sockets.pass_(RELAY_READ, len(self.subs) > len(fast))
            if got is None:
                return
            n, events, again, trouble, data = got
            if not n:
                self.finished()
                self._stop(("done", None))
                return
            # (The offset moved: ``sockets.passed`` counts it, and the bytes the sockets took
            # whole are counted in Rust.) Those whose rest their transport took, and the
            # connections served through their transports.
            taken = self._trouble(trouble) if trouble else 0
            sent = n * taken
            if data is not None:
                sent += self.deliver(data)
            self.fanout.flush_sent_later()
            self._passed(sent, events)
            if not again or self.stopped:
                return

    def _trouble(self, trouble: list[tuple[int, bytes | None]]) -> int:
        """The connections a pass could not wholly send to (out of :attr:`sockets` now): the
        rest of the pass through the transport, then detached at the pump's offset. How many
        took their rest."""
        taken = 0
        for key, rest in trouble:
            conn = self.fast.pop(key, None)
            if conn is None:
                continue
            if rest is not None and conn.transport is not None and not conn.closed:
                conn.transport.write(rest)
                taken += 1
            fut = self.subs.get(conn)
            if fut is not None and not fut.done():
                fut.set_result(("solo", self.offset))
                self.fanout.counters.inc(HttpCounter.DETACHED)
        self._update_through()
        return taken

    def read_now(self) -> bytes | None:
        """The bytes at the live edge now (``b""``: the stream finished; None: none yet),
        ending at an event's end: a read capped at ``RELAY_READ`` (a backlog) keeps the
        start of its last event for the next pass. So the offset a connection is detached
        at, and after which it may get an end event of the relay's own (``replaced``), is
        never inside an event. (The producer appends whole events, so an uncapped read ends
        at one already.)"""
        data = self.reader.read_nowait(RELAY_READ)
        carry = self.carry
        if carry:
            if data is None:
                return None  # cannot be: the rest of the carried event is in the ring
            self.carry = b""
            data = carry + data
        if data is not None and len(data) >= RELAY_READ and not data.endswith(b"\n\n"):
            cut = data.rfind(b"\n\n") + 2
            if cut > 1:
                self.carry = data[cut:]
                data = data[:cut]
        return data

    def _stop(self, outcome: Outcome) -> None:
        if self.stopped:
            return
        self.stopped = True
        if self.watch is not None:
            self.watch.cancel()
        if self.timer is not None:
            self.timer.cancel()
        self._close(outcome)

    def _close(self, outcome: Outcome) -> None:
        pumps = self.registry
        if pumps.get(self.key) is self:
            del pumps[self.key]
        self.unlink()
        if self.sockets is not None:
            # A pass written through whose trouble the pump has not seen: those clients get
            # the rest of it through their transports first.
            trouble = self.sockets.take_trouble()
            if trouble:
                self._trouble(trouble)
            # Before any connection is let go: from then on its relay writes to it.
            self.sockets.clear()
            self.fast.clear()
        self.reader.close()
        for fut in list(self.subs.values()):
            if not fut.done():
                fut.set_result(outcome if outcome[0] != "solo" else ("solo", self.offset))

    # -- a pump over another store's reader: a task

    async def run(self) -> None:
        outcome: Outcome = ("solo", 0)
        try:
            while True:
                wait = self._linger()
                if wait:
                    await asyncio.sleep(wait)
                try:
                    data = await self.next_bytes()
                except OffsetLost:
                    break  # each connection goes on alone and finds out for itself
                except SessionEnded as e:
                    if self._end_dead(e.reason):
                        continue
                    outcome = ("ended", e.reason)
                    break
                if not data:
                    self.finished()
                    outcome = ("done", None)
                    break
                self._fan(data)
        finally:
            self.stopped = True
            self._close(outcome)

    async def next_bytes(self) -> bytes:
        """The next bytes at the live edge (``b""``: the stream finished)."""
        return await self.reader.aread(RELAY_READ)

    read_cap = RELAY_READ
    """A read of this many bytes or more may have left more in the ring (:meth:`_pass`)."""

    per_conn: Callable[[Connection, bytes], tuple[bytes, bytes]] | None = None
    """What a connection gets of a pass's bytes, (chunk-framed, unframed), if it is not the
    same for all (:class:`EventPump`); None: the bytes, framed once for all."""

    def deliver(self, data: bytes) -> int:
        """Write a pass's bytes to every joined connection; detach those whose buffer is
        full. The body bytes sent."""
        per_conn = self.per_conn
        # Framed once for every chunked connection of this pass (per connection instead with
        # ``per_conn``): frame_chunk's format, inline.
        framed = b"%x\r\n%s\r\n" % (len(data), data) if per_conn is None else b""
        raw = data
        sent = 0
        fast = self.fast
        # A copy: a write may close a connection, whose relay then leaves the pump.
        for conn, fut in tuple(self.subs.items()):
            if fut.done() or (fast and id(conn) in fast):
                continue  # let go, or written to from Rust
            if per_conn is not None:
                framed, raw = per_conn(conn, data)
            # The chunk, or the bare bytes to an HTTP/1.0 client (a body ended by closing).
            transport = conn.transport
            if transport is not None and not conn.closed:
                transport.write(framed if conn.chunked else raw)
                sent += len(raw)
            flow = conn.flow
            if (flow is not None and flow.paused) or conn.closed:
                fut.set_result(("solo", self.offset))
                self.fanout.counters.inc(HttpCounter.DETACHED)
        return sent

    def finished(self) -> None:
        """The stream finished (after every byte was delivered)."""


Render = Callable[[bytes, int, str, bool], bytes]
"""``render(data, offset_after, tag, closed)``: the event(s) a client joined with ``tag``
gets for a pass's ``data`` (``b""`` and ``closed``: the stream's end)."""


class EventPump(Pump):
    """A pump whose clients get each pass's bytes rendered as events, once per distinct
    ``tag`` per pass (Durable Streams SSE: the new bytes as a data event, then a control
    event with the offset after them and the client's cursor, its tag). So a thousand SSE
    tails of one stream cost one ring read and a render or two per wake-up, as the
    ``/v1/stream`` pump does."""

    def __init__(
        self,
        fanout: FanOut,
        registry: dict[tuple[int, int], Pump],
        key: tuple[int, int],
        reader: StreamReader,
        owner: str,
        render: Render,
        max_read: int,
    ) -> None:
        self.render = render
        self.max_read = max_read
        self.tags: dict[Connection, str] = {}
        self.closed = False
        """The pass just read reached the end of the finished stream."""
        self.rendered: dict[str, tuple[bytes, bytes]] = {}
        self.per_conn = self.frame
        self.read_cap = 0  # read again after every pass (a pass may end at the limit)
        super().__init__(fanout, registry, key, reader, owner)

    def join_tagged(self, conn: Connection, tag: str) -> asyncio.Future[Outcome]:
        self.tags[conn] = tag
        fut = self.join(conn)
        fut.add_done_callback(lambda _: self.tags.pop(conn, None))
        return fut

    async def next_bytes(self) -> bytes:
        if self.closed:
            return b""
        return self._fill(await self.reader.aread(self.max_read))

    def read_now(self) -> bytes | None:
        if self.closed:
            return b""
        data = self.reader.read_nowait(self.max_read)
        return data if data is None else self._fill(data)

    def _fill(self, data: bytes) -> bytes:
        """``data`` and everything after it there is now (to the limit), so the control
        event can say "up to date"."""
        if not data:
            return data
        out = bytearray(data)
        while len(out) < self.max_read:
            more = self.reader.read_nowait(self.max_read - len(out))
            if more is None:
                break
            if not more:
                self.closed = True
                break
            out += more
        return bytes(out)

    def deliver(self, data: bytes) -> int:
        self.rendered = {}
        return super().deliver(data)

    def frame(self, conn: Connection, data: bytes) -> tuple[bytes, bytes]:
        """What ``conn`` gets of a pass's ``data`` (:attr:`Pump.per_conn`): the events for
        its tag, rendered once per tag and pass."""
        tag = self.tags.get(conn, "")
        hit = self.rendered.get(tag)
        if hit is None:
            body = self.render(data, self.offset, tag, self.closed)
            hit = self.rendered[tag] = (frame_chunk(body), body)
        return hit

    def finished(self) -> None:
        if self.closed:
            return  # the last pass's events said so already
        self.closed = True
        self.deliver(b"")


class FanOut:
    """The relays and pumps of one HTTP process."""

    def __init__(
        self, store: StreamStore, coalescing: Coalescing, counters: SharedCounters
    ) -> None:
        self.store = store
        self.coalescing = coalescing
        self.counters = counters
        self.pumps: dict[tuple[int, int], Pump] = {}
        self.event_pumps: dict[tuple[int, int], Pump] = {}
        self.producers: dict[tuple[int, int], Emitter] = {}
        """The producers of this process's jobs, by session (slot, generation): a pump of
        one of these sessions links to its producer (:meth:`Pump.link`)."""
        self.unsent = 0
        """Bytes the pumps wrote that the shared counter does not show yet (added by
        :meth:`Pump._passed`, stored by :meth:`flush_sent`)."""
        self.socket_sent = SentCounter()
        """Body bytes the pumps' socket sets sent (counted in Rust, per pass)."""
        self._linked = 0
        self._sent_timer: asyncio.TimerHandle | None = None
        coalescing.on_change = self._linger_changed
        coalescing.busy = lambda: bool(self.pumps or self.event_pumps)

    def flush_sent(self) -> None:
        """Stores the bytes sent since the last call in the shared counter; while producers
        write through, again in SENT_FLUSH_S."""
        self._sent_timer = None
        sent = self.unsent + self.socket_sent.take()
        self.unsent = 0
        if sent:
            self.counters.inc(HttpCounter.BYTES_SENT, sent)
        if self._linked:
            self.flush_sent_later()

    def flush_sent_later(self) -> None:
        """:meth:`flush_sent` in SENT_FLUSH_S, unless it is due already."""
        if self._sent_timer is None:
            loop = asyncio.get_running_loop()
            self._sent_timer = loop.call_later(SENT_FLUSH_S, self.flush_sent)

    def linked(self, change: int) -> None:
        """A pump linked to its producer (``+1``) or unlinked (``-1``)."""
        self._linked += change
        self.flush_sent_later()

    def producer_started(self, key: tuple[int, int], producer: Emitter) -> None:
        """A job of this process produces the session ``key``: its pump, if there is one
        now or later, links to it."""
        self.producers[key] = producer
        pump = self.pumps.get(key)
        if pump is not None and pump.watch is not None:
            pump.link(producer)

    def producer_ended(self, key: tuple[int, int], producer: Emitter) -> None:
        if self.producers.get(key) is producer:
            del self.producers[key]
        pump = self.pumps.get(key)
        if pump is not None and pump.producer is producer:
            pump.unlink()
        producer.tap = None

    def _linger_changed(self) -> None:
        """Coalescing started or stopped: a pump lingers or writes through, not both."""
        for pump in self.pumps.values():
            if pump.producer is not None:
                pump._update_through()

    def end_dead(self, conversation_id: str, owner: str) -> bool:
        """A reader found the stream's producer dead (``SessionEnded("producer_died")``):
        end the stream in-band through the store, with the error event the manager's sweep
        would append, so that this reader reads its end from the stream as every other reader
        and replay does. A lost race (the sweep or another HTTP process ended it first) is
        fine: the stream holds its end either way. False if the store cannot
        (:class:`~ringcast.server.store.EndsDeadProducers`): the caller writes the terminal
        event itself."""
        if not isinstance(self.store, EndsDeadProducers):
            return False
        self.store.end_dead_producer(conversation_id, owner)
        return True

    async def open_same(
        self, key: tuple[int, int], conv: str, offset: int, owner: str, counted: bool
    ) -> StreamReader | None:
        """A new reader at ``offset`` of the session incarnation ``key`` (slot, generation)
        names, or None if ``conv`` now names another one (replaced, or ended and made again
        while this process was not reading it): a store opens readers by id, and a reader
        of the new incarnation would splice its bytes after the old one's."""
        r = await self.store.open_reader(conv, offset, owner, counted=counted)
        if (r.slot, r.generation) != key:
            r.close()
            return None
        return r

    async def tail_events(
        self,
        conn: Connection,
        reader: StreamReader,
        owner: str,
        render: Render,
        tag: str,
        max_read: int,
        timeout: float,
    ) -> tuple[Outcome, int] | None:
        """Wait at the live edge as a client of this process's :class:`EventPump` for the
        reader's stream, until the pump lets the connection go or ``timeout`` passes (then
        None, as when the reader is not at the pump's offset: the caller reads on its own).
        With the outcome, the offset up to which the pump wrote to ``conn``."""
        key = (reader.slot, reader.generation)
        pump = self.event_pumps.get(key)
        if pump is None:
            edge = await self.open_same(
                key, reader.conversation_id, reader.offset, owner, counted=False
            )
            if edge is None:
                return None  # another incarnation now: the caller's reader finds its end
            pump = self.event_pumps.get(key)
            if pump is None:
                pump = EventPump(self, self.event_pumps, key, edge, owner, render, max_read)
                self.event_pumps[key] = pump
            else:  # another tail made one while a remote store answered
                edge.close()
        if pump.offset != reader.offset or not isinstance(pump, EventPump):
            return None
        fut = pump.join_tagged(conn, tag)
        try:
            outcome = await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            fut.cancel()
            return None
        return outcome, outcome[1] if outcome[0] == "solo" else pump.offset  # type: ignore[return-value]

    async def relay(self, conn: Connection, reader: StreamReader, owner: str) -> bool:
        """Copy ring bytes to the client until the stream ends; True if it finished.

        A reader behind the ring's end catches up on its own (``solo``); at the end it joins
        the process's :class:`Pump` for the session, which reads once per wake-up and writes to
        every joined connection. A connection whose write buffer fills is detached again and
        goes on solo from where it was, so it never holds up the others.
        """
        self.counters.inc(HttpCounter.READERS_ACTIVE)
        finished = False
        key = (reader.slot, reader.generation)
        conv = reader.conversation_id
        start = reader.offset
        takeovers = 0
        try:
            while True:
                try:
                    data = reader.read_nowait(RELAY_READ)
                    if data is None:
                        pump = self.pumps.get(key)
                        if pump is None:
                            # Not counted: its clients' own readers are.
                            edge = await self.open_same(key, conv, reader.offset, owner, False)
                            pump = self.pumps.get(key)
                            if edge is None:
                                pass  # another incarnation now: the reader below finds its end
                            elif pump is None:
                                pump = self.pumps[key] = Pump(self, self.pumps, key, edge, owner)
                            else:  # another relay made one while a remote store answered
                                edge.close()
                        if pump is not None and pump.offset == reader.offset:
                            outcome, value = await pump.join(conn)
                            if outcome == "done":
                                finished = True
                                break
                            if outcome == "ended":
                                write_end(conn, str(value))
                                break
                            # Detached at offset `value`: drain, then go on alone.
                            if conn.write_paused:
                                await conn.drain()
                            assert isinstance(value, int)
                            reader.close()
                            again = await self.open_same(key, conv, value, owner, True)
                            if again is None:
                                # The id names a newer session now: this one's bytes past
                                # `value` are not its (a reader of it would be told so).
                                write_end(conn, "replaced")
                                break
                            reader = again
                            continue
                        data = await reader.aread(RELAY_READ)
                except OffsetLost as e:
                    self.counters.inc(HttpCounter.OFFSETS_LOST)
                    conn.write_body(
                        error_event(
                            410,
                            f"this reader fell behind: bytes before offset "
                            f"{e.first_available} were dropped; resume from there",
                            "offset_lost",
                            e.first_available,
                        )
                    )
                    break
                except SessionEnded as e:
                    if (
                        e.reason == "producer_died"
                        and takeovers < MAX_TAKEOVERS
                        and self.end_dead(conv, owner)
                    ):
                        takeovers += 1
                        continue  # to read the stream's end
                    write_end(conn, e.reason)
                    break
                except SessionNotFound:
                    write_end(conn, "evicted")
                    break
                if not data:
                    finished = True
                    break
                conn.write_body(data)
                if conn.write_paused:
                    await conn.drain()
            if finished and start > 0:
                # Held beyond the end of a running stream (as llama-server does), which then
                # finished short of that offset: say so instead of ending silently.
                total = final_total(reader, await self.store.get(reader.conversation_id, owner))
                if total is not None and start > total:
                    conn.write_body(
                        error_event(
                            416,
                            f"the stream finished with {total} bytes, short of offset {start} "
                            f"that this read asked for; resume from an offset of at most {total}",
                            "invalid_request_error",
                        )
                    )
            conn.end_stream()
        finally:
            reader.close()
            self.counters.inc(HttpCounter.READERS_ACTIVE, -1)
        return finished


def final_total(reader: StreamReader, info: StreamView | None) -> int | None:
    """``total_bytes`` of the reader's session if it is finalized, else None (running, or
    gone: collected, or replaced by a newer session with the same id); ``info`` is what
    ``Segment.get`` gives for its id."""
    if (
        info is None
        or (info.slot, info.generation) != (reader.slot, reader.generation)
        or not info.is_done
    ):
        return None
    return info.total_bytes


def write_end(conn: Connection, reason: str) -> None:
    code, message = END_EVENTS.get(reason, (410, f"stream ended: {reason}"))
    conn.write_body(error_event(code, message, reason))
