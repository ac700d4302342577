"""Typed interface of the Rust extension ``ringcast._core``.

Everything here is implemented in ``rust/ringcast-py`` on top of ``rust/ringcast-core``.
The public names are re-exported (and documented for users) by ``ringcast/__init__.py``.
"""

import builtins
from collections.abc import Awaitable, Sequence
from typing import Final, Literal, final

from typing_extensions import Buffer

__version__: Final[str]
"""Version of the ringcast package this extension was built for."""

LAYOUT_VERSION: Final[int]
"""Version of the shared-memory layout this build reads and writes."""

MAX_PROCESSES: Final[int]
"""How many segment handles (normally one per process) may hold readers or notifiers on one
segment at once."""

class RingcastError(Exception):
    """Base class of every error raised by ringcast."""

class SegmentError(RingcastError):
    """The segment file is missing, not a ringcast segment, of another layout, or corrupt
    (or a symbolic link: never followed); or the segment was closed; or, from a write, its
    filesystem has no memory left for the stream's next bytes."""

class SessionNotFound(RingcastError, KeyError):
    """No live session has this conversation id (for this owner)."""

class SessionEnded(RingcastError):
    """The session a handle pointed at is gone: cancelled, replaced or evicted; or its
    producer died.

    ``reason`` is one of ``"cancelled"``, ``"replaced"``, ``"evicted"``, ``"producer_died"``
    (a reader waiting on a running session whose producer process is gone).
    """

    reason: str

class OffsetLost(RingcastError):
    """The requested offset was dropped from the front of the ring.

    ``first_available`` is the lowest offset that can still be read; ``requested`` the
    offset asked for.
    """

    first_available: int
    requested: int

class InvalidArgument(RingcastError, ValueError):
    """A bad argument: an over-long or empty conversation id, a zero size, and so on."""

class RegistryFull(RingcastError):
    """Every session slot holds a running stream (finished sessions are evicted to make room)."""

class QuotaExceeded(RingcastError):
    """A create with ``max_running`` found that many running sessions already in the groups
    it counts.

    ``max_running`` is the quota."""

    max_running: int

@final
class SessionInfo:
    """A consistent snapshot of one session's registry entry."""

    conversation_id: str
    owner: str
    state: str
    """``"running"``, ``"done"``, ``"cancelled"`` or ``"failed"``."""
    total_bytes: int
    """Every byte ever appended (dropped prefix plus buffered bytes)."""
    first_available: int
    """Lowest readable offset: the size of the dropped prefix."""
    started_at: float
    """Unix time (seconds) the session was created."""
    completed_at: float
    """Unix time the session was finalized; 0.0 while running."""
    last_write_at: float
    """Unix time of the last append (or creation)."""
    producer_pid: int
    producer_alive: bool
    """Whether the producer process (pid plus start time) still exists."""
    readers: int
    """Readers attached right now, across every live process."""
    generation: int
    slot: int
    last_access_at: float
    """Unix time a reader last attached (used to evict least recently used sessions)."""
    @property
    def is_done(self) -> bool:
        """True once the session is finalized (done, cancelled or failed)."""

@final
class SegmentStats:
    """Whole-segment figures."""

    max_sessions: int
    session_bytes: int
    max_id_len: int
    epoch: int
    sessions_used: int
    bytes_buffered: int
    """Sum over live sessions of the bytes held in their rings."""
    file_bytes: int
    """Apparent size of the segment file (it is sparse)."""
    resident_bytes: int
    """Bytes the file really occupies in memory (allocated blocks)."""
    registry_rebuilds: int
    """Times the registry (index, free stack, finished list) was rebuilt from the slots: after
    a process died holding its lock, or when it was found damaged."""
    lru_evictions: int
    """Finished sessions evicted, least recently used first, by creates that found every slot
    taken (since the segment was created)."""

@final
class Segment:
    """A mapped ringcast segment: session registry plus one ring per session.

    Sessions are byte rings keyed by (owner, conversation id). One producer (``Writer``)
    appends; any number of ``Reader``s, in any process, read from any absolute offset.
    """

    @staticmethod
    def create(
        path: str,
        *,
        max_sessions: int = 1024,
        session_bytes: int = 4194304,  # 4 MiB
        max_id_len: int = 256,
    ) -> Segment:
        """Create a new segment file (``O_EXCL``, mode 0600). Fails if ``path`` exists.

        Limits: ``1 <= max_sessions <= 2**20``, ``1 <= session_bytes <= 2**40``,
        ``256 <= max_id_len <= 65536`` (bytes of UTF-8); ``InvalidArgument`` otherwise.
        Owner tags are at most 128 bytes.
        """
    @staticmethod
    def open(path: str) -> Segment:
        """Map an existing segment; ``SegmentError`` if it is not a segment of this layout."""
    @staticmethod
    def open_or_create(
        path: str,
        *,
        max_sessions: int = 1024,
        session_bytes: int = 4194304,  # 4 MiB
        max_id_len: int = 256,
    ) -> Segment:
        """Open ``path`` if it is a segment with exactly these sizes, else create it.

        A file that exists but is not a compatible segment raises ``SegmentError``; it is
        never silently replaced.
        """
    @property
    def path(self) -> str: ...
    @property
    def epoch(self) -> int:
        """Random identity chosen when the segment was created."""
    @property
    def max_sessions(self) -> int: ...
    @property
    def session_bytes(self) -> int: ...
    @property
    def max_id_len(self) -> int: ...
    def stats(self) -> SegmentStats:
        """Whole-segment figures: sessions in use, bytes buffered, file and resident size."""
    def create_or_replace(
        self,
        conversation_id: str,
        owner: str = "",
        *,
        max_running: int | None = None,
        counted: builtins.list[tuple[str, str]] | None = None,
    ) -> Writer:
        """Install a new running session; a live session with the same (owner, id) is
        cancelled with reason ``"replaced"`` and its readers end. The caller becomes producer.

        With ``max_running``, only if the running sessions of the ``counted`` groups
        ((owner, id prefix) pairs; default ``[(owner, "")]``) would then number at most
        ``max_running``, counted under the registry lock (exact across processes); a replaced
        running session that counts makes room for its replacement.

        Raises ``InvalidArgument`` for an empty or over-long id, ``RegistryFull``,
        ``QuotaExceeded``.
        """
    def adopt(self, conversation_id: str, owner: str, generation: int) -> Writer:
        """Become the producer of a running session created elsewhere (e.g. by the HTTP
        process that accepted the request). ``generation`` must match, so a handle never
        adopts a newer session with the same id. Raises ``SessionNotFound`` or
        ``SessionEnded``.
        """
    def take_over_dead(self, conversation_id: str, owner: str = "") -> Writer | None:
        """If the session's producer process is dead, become its producer (bytes of an
        append that was cut short are discarded) and return a Writer; else ``None``."""
    def get(self, conversation_id: str, owner: str = "") -> SessionInfo | None:
        """The session's snapshot, or ``None`` if no live session has this id (for this
        owner)."""
    def list(
        self,
        owner: str | None = None,
        *,
        shard: tuple[int, int] | None = None,
        owner_prefix: str | None = None,
    ) -> builtins.list[SessionInfo]:
        """Every live session, oldest first, or only ``owner``'s; with ``shard=(index,
        count)`` (and no ``owner``) only the sessions whose slot is ``index`` modulo
        ``count``: one of ``count`` processes that split the sessions (a session keeps its
        slot for life); with ``owner_prefix`` (alone) only those whose owner starts with it.
        ``ValueError`` for a bad shard or ``owner_prefix`` with another filter."""
    def sweep_candidates(self, anon_owner: str, skip_prefix: str) -> builtins.list[SessionInfo]:
        """What the manager's dead-producer sweep looks at: the running sessions whose
        producer is dead, and every session of ``anon_owner``; none whose owner starts with
        ``skip_prefix`` (an empty prefix skips none). As ``list`` gives them, oldest first,
        but only these are made into objects (one scan of the slots, a few loads each)."""
    def expiry_candidates(
        self, ttl: float, idle_timeout: float, skip_prefix: str = ""
    ) -> builtins.list[SessionInfo]:
        """What the manager's expiry looks at: the finished sessions that completed ``ttl``
        seconds ago or longer, and (``idle_timeout`` above 0) the running ones with no write
        for ``idle_timeout`` seconds; none whose owner starts with ``skip_prefix``. Oldest
        first; ``ValueError`` for a negative or non-finite number of seconds."""
    def lookup_prefix(self, conversation_id: str, owner: str = "") -> builtins.list[SessionInfo]:
        """The session with exactly this id plus every session whose id starts with
        ``conversation_id + "::"`` (llama-server's lookup rule)."""
    def evict(self, conversation_id: str, owner: str = "") -> bool:
        """Remove the session (its readers end with reason ``"evicted"``). True if it existed."""
    def evict_and_cancel(self, conversation_id: str, owner: str = "") -> bool:
        """Cancel the producer and remove the session (readers end with ``"cancelled"``)."""
    def evict_slot(self, slot: int, generation: int, reason: str = "evicted") -> bool:
        """Remove exactly this session if it is still that generation (manager GC)."""
    def reader(
        self, conversation_id: str, offset: int = 0, owner: str = "", counted: bool = True
    ) -> Reader:
        """Attach a reader at an absolute byte offset.

        Raises ``SessionNotFound``, or ``OffsetLost`` when ``offset`` was already dropped.
        An offset beyond the current end is allowed: the reader waits until it is reached.
        ``counted=False`` leaves it out of ``SessionInfo.readers``: for a reader that only
        serves other, counted readers (as the HTTP server's fan-out pump does).
        """
    def flush_wakes(self, skip_own: bool = False) -> int:
        """Tell the event loops of other processes about the appends made with
        ``Writer.write(..., defer_wake=True)`` through this handle since the last call: one
        datagram per subscribed, waiting process for the whole batch. Returns how many were
        delivered.

        ``skip_own=True``: none to this process's own notifier, for a producer whose readers
        share its event loop: it must then wake them itself (``ringcast._aio.poke`` with the
        slots it appended to), or they wait for the next rescan."""
    def notifier(self) -> Notifier:
        """This segment handle's notifier (one per handle, normally one per process; created
        on first use)."""
    def close(self) -> None:
        """Invalidate the segment: this handle, and the Writers and Readers made from it, raise
        ``SegmentError`` on their next read, write or registry call. The memory is unmapped
        once the last of them is garbage-collected."""
    def unlink(self) -> None:
        """Remove the segment file (mapped processes keep their mapping)."""

@final
class Writer:
    """The producer handle of one session: the only one that appends."""

    @property
    def conversation_id(self) -> str: ...
    @property
    def owner(self) -> str: ...
    @property
    def slot(self) -> int: ...
    @property
    def generation(self) -> int: ...
    @property
    def total_bytes(self) -> int: ...
    @property
    def cancelled(self) -> bool:
        """True once the session was cancelled, replaced or evicted (cheap atomic load)."""
    def write(self, data: Buffer, progress: bool = True, defer_wake: bool = False) -> bool:
        """Append bytes (any buffer, viewed as raw bytes); False, with nothing written, once the
        session is finalized or gone, or once another handle became its producer (``adopt``).
        ``progress=False`` marks keep-alive bytes (an SSE ``: ping`` comment): appended like any
        others, but the session's ``last_write_at`` (what idle detection reads) stays.
        ``defer_wake=True``: event loops of other processes (``aread``) are told at the segment
        handle's next ``Segment.flush_wakes()``, once per process for a whole batch of appends;
        call it soon (once per turn of the producer's loop). Blocking readers wake at once. A
        large buffer is copied without the GIL: no other thread may change it until this
        returns.

        Raises ``SegmentError``, with nothing written, when the segment's filesystem has no
        memory left for these bytes (a full ``/dev/shm``); a few KiB stay in reserve, so a
        short error event can still be written before ``finalize("failed")``."""
    def write_event(self, event: bytes, defer_wake: bool = False) -> bool:
        """Append one SSE event: ``id: <offset just after it>\\n`` then ``event``, the framing
        of ``ringcast.wire.sse.frame_event``, with the offset taken under the append lock.
        Returns and raises as ``write``; ``defer_wake`` as there."""
    def write_event_through(self, event: bytes, fanout: SocketFanOut) -> int:
        """``write_event(event, defer_wake=True)``, then, if ``fanout`` lets writes through
        (``SocketFanOut.through``), one pass of ``fanout`` in the same call: the event goes to
        its clients' sockets at once, with no wake-up and no step of the pump's. 0: the append
        was refused (``write_event``'s False); 1: made, and the session's readers are to be
        told as after a deferred ``write_event`` (nothing was passed, or the pump must see
        the pass); 2: made, passed to every client of ``fanout``, and no other process awaits
        a wake-up from this segment handle: nobody needs telling. Raises as ``write``."""
    def finalize(self, state: str = "done", defer_wake: bool = False) -> bool:
        """End the stream as ``"done"``, ``"failed"`` or ``"cancelled"``; idempotent. False if
        it had already ended. ``defer_wake`` as for ``write``."""
    @staticmethod
    def cancelled_among(writers: builtins.list[Writer]) -> builtins.list[int]:
        """The positions in ``writers`` of those whose session was cancelled, replaced or
        evicted (``cancelled``), in one call."""
    @staticmethod
    def silent_among(writers: builtins.list[Writer], seconds: float) -> builtins.list[int]:
        """The positions in ``writers`` of those whose session runs, is still theirs, and had
        no write that counts as progress (keep-alives do not) for ``seconds`` or longer: one
        call for a process's whole set of producers, as ``cancelled_among``. ``ValueError``
        for a negative or non-finite number of seconds."""
    def wait_cancelled(self, timeout: float | None = None) -> bool:
        """Block (GIL released) until the session is cancelled (True) or the timeout passes
        (False; ``None`` = no limit)."""

@final
class Reader:
    """A cursor into one session, at an absolute byte offset.

    ``await reader.aread()`` reads without blocking the event loop (see ``aread``).
    """

    @property
    def conversation_id(self) -> str: ...
    @property
    def offset(self) -> int:
        """Next offset this reader will return."""
    @property
    def slot(self) -> int: ...
    @property
    def generation(self) -> int: ...
    @property
    def epoch(self) -> int: ...
    def read(self, max_bytes: int = 1 << 20, timeout: float | None = None) -> bytes:
        """Bytes available from ``offset`` (waiting up to ``timeout``; ``None`` = forever).

        Returns ``b""`` at the end of a finished stream *and* when the timeout passes with no
        data: check ``at_end`` to tell which. Raises ``OffsetLost`` if the reader fell behind
        the ring and ``SessionEnded`` if the session was cancelled, replaced or evicted, or
        (``reason == "producer_died"``) if, while it waits, the running session's producer
        process is found gone twice half a second apart: within about a second of the death,
        with or without a ``ringcast serve`` manager (which would take the session over and
        end it in-band first).
        """
    def dead_producer(self) -> int | None:
        """The pid of the session's producer if the session is running but that process is
        gone (no byte will come unless another process takes the session over), else
        ``None``. Reads ``/proc``: for a waiting reader now and then, not per read."""
    @staticmethod
    def dead_producers(readers: Sequence[Reader]) -> list[int | None]:
        """``dead_producer()`` of each reader (None for a closed one), looking at each
        distinct producer once: what a loop that checks thousands of waiting readers, most of
        them fed by a few producers, calls instead of one ``/proc`` read per reader."""
    def read_nowait(self, max_bytes: int = 1 << 20) -> bytes | None:
        """Bytes available now, ``b""`` at the end, ``None`` if it would have to wait."""
    def aread(self, max_bytes: int = 1 << 20) -> Awaitable[bytes]:
        """Awaitable ``read``: waits through this process's ``Notifier`` without blocking the
        event loop or holding a thread. Returns ``b""`` only at the end of a finished stream.
        Raises what ``read`` raises, ``SessionEnded("producer_died")`` included.
        Bad arguments and a closed reader or segment fail when this is called, not when
        awaited. (Written in Python, ``ringcast._aio``; ``ringcast/__init__.py`` installs it
        on this class.)
        """
    def notifier(self) -> Notifier:
        """The ``Notifier`` of the segment handle this reader came from (the one
        ``Segment.notifier()`` returns): what ``aread`` waits on."""
    def read_into(self, buffer: Buffer, timeout: float | None = None) -> int:
        """Like ``read`` but fills a writable buffer; returns the byte count. The copy runs
        without the GIL: no other thread may use ``buffer`` until this returns."""
    @property
    def at_end(self) -> bool:
        """True when the session is finalized and this reader has every byte."""
    def ready(self) -> bool:
        """True if ``read_nowait`` would not return ``None``."""
    def state(self) -> str:
        """The session's state, or the end reason if it is gone."""
    def close(self) -> None:
        """Detach (the reader no longer counts in ``SessionInfo.readers``)."""

@final
class SocketFanOut:
    """The clients at the live edge of one session and the reader that feeds them: each
    ``pass_`` reads what is new and ``send``s it to every client's socket (the server's
    fan-out pump; see ``rust/ringcast-py/src/fanout.rs``). While a client is in the set,
    nothing else may write to its connection, and its transport's write buffer must have
    been empty when it was added."""

    def __new__(cls, reader: Reader, sent: SentCounter | None = None) -> SocketFanOut:
        """``sent``: where every pass counts the body bytes it sends whole to clients'
        sockets."""
    @property
    def passed(self) -> int:
        """Bytes of the stream passed so far, by ``pass_`` and by writes through."""
    def take_trouble(self) -> builtins.list[tuple[int, bytes | None]]:
        """The trouble of a pass written through that no ``pass_`` has returned yet, handed
        over now (for a pump that stops): ``(id, rest)`` as ``pass_`` gives it; empty if
        there is none."""
    @property
    def through(self) -> int:
        """The largest pass a ``Writer.write_event_through`` naming this set makes; 0 (the
        start): writes through pass nothing. Set it (at most 16 MiB) only while nothing else
        in this process waits to be told of the session's appends: a write through that
        delivers tells nobody."""
    @through.setter
    def through(self, max_bytes: int) -> None: ...
    def add(self, id: int, fd: int, chunked: bool, inode: int) -> None:
        """Adds a client known by ``id`` whose socket is ``fd`` (duplicated: the set holds its
        own descriptor until ``remove``) with inode ``inode`` (``os.fstat(fd).st_ino`` when
        the connection was made: a number reused for another socket since is refused);
        ``chunked``: a pass goes to it as one chunk. ``ValueError`` if ``id`` is in the set,
        ``OSError`` if ``fd`` is not that open stream socket."""
    def remove(self, id: int) -> bool:
        """Removes a client (closing the set's descriptor); False if it was not there."""
    def clear(self) -> None:
        """Removes every client."""
    def __len__(self) -> int: ...
    def pass_(
        self, max_bytes: int, want_data: bool = False
    ) -> tuple[int, int, bool, builtins.list[tuple[int, bytes | None]], bytes | None] | None:
        """One pass: what the session has now (at most ``max_bytes``; a capped read ends at an
        event's end), sent to every client. ``None``: nothing new. Else ``(n, events, again,
        trouble, data)``: ``n`` bytes passed (``0``: the stream finished, every byte passed
        before), with ``events`` event ends; ``again``: call again now; ``trouble``: ``(id,
        rest)`` of each client not wholly sent to, removed from the set: ``rest`` is what its
        socket did not take, ``None`` if it failed; ``data``: the bytes passed with
        ``want_data``, else ``None``. A pass a write through made and left to the pump
        (``Writer.write_event_through`` returned 1 after it) is returned first, without
        ``data`` and with ``again`` (appends made meanwhile were not passed). Raises as
        ``Reader.read_nowait``."""

@final
class SentCounter:
    """Body bytes the passes of every ``SocketFanOut`` made with this counter sent whole to
    their clients' sockets (by ``pass_`` or written through)."""

    def __new__(cls) -> SentCounter: ...
    def take(self) -> int:
        """The bytes counted since the last call (then 0 again)."""

@final
class Notifier:
    """One per process: turns session wake-ups into one readable file descriptor.

    ``fileno()`` is a datagram socket (an ``AF_UNIX`` file in ``<segment>.wake/``, a directory
    only this user can enter; no thread behind it); a
    producer sends it one byte when a session this process subscribed to advances and the
    notifier is armed; sending disarms it until ``arm()``. An event loop watches ``fileno()``
    and calls ``drain()`` to learn which sessions advanced; before a reader waits, ``arm()``,
    and if that returns True, ``drain()`` again (changes while disarmed were not signalled).
    Repeat that ``arm()`` + ``drain()`` until ``arm()`` returns False: a drain empties the
    socket, so it can swallow the datagram of a publish that came just after the arm, and a
    loop that went back to waiting then would wait disarmed, with nothing in its socket.
    A notifier inherited across ``fork`` is inert in the child: call ``Segment.notifier()``
    there.
    """

    def fileno(self) -> int:
        """The socket's descriptor, to watch for readability."""
    def subscribe(self, slot: int, generation: int) -> None:
        """Ask to be told when this session advances (reference counted per slot; a newer
        generation of the slot replaces the subscription)."""
    def unsubscribe(self, slot: int, generation: int) -> None:
        """Drop one reference to a subscription made by ``subscribe``."""
    def drain(self) -> list[int]:
        """Empty the socket and return the subscribed slots that advanced (or ended) since
        the last drain. Does not re-arm."""
    def scan(self, take_one: bool = False) -> list[int]:
        """Like ``drain()``, but reads no datagram, or with ``take_one`` just one (the one a
        readiness callback was woken by; more left in the socket keep it readable). A scan
        after ``arm()`` leaves a datagram sent after that arm in the socket, so one ``arm()``
        + ``scan()`` is enough before waiting again, where ``drain()`` needs the repeat."""
    def scan_slots(self, slots: list[int]) -> list[int]:
        """Like ``scan()`` without the socket, limited to ``slots``: those of them this notifier
        is subscribed to whose session moved since the last look (which this updates, as
        ``scan`` does). For a producer sharing its event loop with its readers, which
        flushes with ``Segment.flush_wakes(skip_own=True)`` and knows where it appended."""
    def arm(self, yield_first: bool = False) -> bool:
        """Re-arm if a producer disarmed this notifier; True if it was disarmed (then drain:
        what was published meanwhile sent nothing). ``yield_first`` yields the CPU once
        before re-arming, so a busy producer appends more before this process sleeps."""
    @property
    def arm_state(self) -> Literal["armed", "sending", "idle", "invalid"]:
        """What producers see now: ``"armed"`` (the next change sends a datagram),
        ``"sending"`` (a producer took the arm and its datagram is on the way) or ``"idle"``
        (a datagram was sent since the last ``arm()``); ``"invalid"`` only on a scribbled
        segment."""
    def owns_row(self) -> bool:
        """Whether this process still holds the process-table row its notifier started on;
        False if another process claimed it as if this one had died (producers then signal
        that process, and only ``arm()`` + ``drain()`` rescans see this one's sessions)."""

def steer_accepts(fd: int, among: int) -> None:
    """Steers the new connections of the port that the listening socket ``fd`` shares with
    ``SO_REUSEPORT`` (a classic BPF program on its group, ``SO_ATTACH_REUSEPORT_CBPF``):
    ``among`` = 0 spreads them over every listening socket of the port (the kernel's hash),
    1 gives them all to the first socket that listened, n to one of the first n at random.
    It applies to the whole group, whichever of its sockets sets it; a later call replaces
    it. Connections already accepted or queued are not moved. ``OSError`` if the kernel
    refuses (not a socket, no ``SO_REUSEPORT``, a kernel before 4.5). A bound socket that
    does not listen yet gets a group of its own, which the port's listeners do not share."""
