"""``SocketFanOut``: a session's live edge sent from Rust to its clients' sockets (the server's
fan-out pump writes through it). Real sockets (socket pairs), a real segment."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import ringcast
from ringcast._core import SentCounter, SocketFanOut


def _inode(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


def _drain(sock: socket.socket) -> bytes:
    sock.setblocking(False)
    out = bytearray()
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return bytes(out)
        if not chunk:
            return bytes(out)
        out += chunk


@pytest.fixture
def pairs():
    made: list[socket.socket] = []

    def make() -> tuple[socket.socket, socket.socket]:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        made.extend((a, b))
        return a, b

    yield make
    for s in made:
        s.close()


def test_a_pass_goes_to_every_client_chunked_or_not_and_the_end_is_told(
    seg: ringcast.Segment, pairs
) -> None:
    w = seg.create_or_replace("c")
    fan = SocketFanOut(seg.reader("c", 0, counted=False))
    assert fan.pass_(1 << 16) is None  # nothing yet
    (a1, b1), (a2, b2) = pairs(), pairs()
    fan.add(1, a1.fileno(), True, _inode(a1))
    fan.add(2, a2.fileno(), False, _inode(a2))
    assert len(fan) == 2
    assert w.write(b"data: one\n\n") and w.write(b"data: two\n\n")
    got = fan.pass_(1 << 16)
    assert got == (22, 2, False, [], None)
    assert _drain(b1) == b"16\r\ndata: one\n\ndata: two\n\n\r\n"
    assert _drain(b2) == b"data: one\n\ndata: two\n\n"
    assert fan.pass_(1 << 16) is None
    assert w.write(b"data: three\n\n") and w.finalize()
    n, events, again, trouble, data = fan.pass_(1 << 16, True)  # type: ignore[misc]
    assert (n, events, again, trouble, data) == (13, 1, True, [], b"data: three\n\n")
    assert fan.pass_(1 << 16) == (0, 0, False, [], None)  # the end: every byte was passed


def test_a_capped_pass_ends_at_an_event_end_and_carries_the_rest(
    seg: ringcast.Segment, pairs
) -> None:
    w = seg.create_or_replace("c")
    fan = SocketFanOut(seg.reader("c", 0, counted=False))
    a, b = pairs()
    fan.add(7, a.fileno(), False, _inode(a))
    events = [b"data: %d\n\n" % i for i in range(10)]  # 9 or 10 bytes each
    for e in events:
        assert w.write(e)
    got = fan.pass_(25)
    assert got is not None and got[0] == len(events[0] + events[1]) and got[2]  # again
    seen = _drain(b)
    assert seen == events[0] + events[1]
    while (got := fan.pass_(25)) is not None:
        seen += _drain(b)
    assert seen == b"".join(events)


def test_a_full_socket_hands_back_the_rest_and_a_closed_one_fails(
    seg: ringcast.Segment, pairs
) -> None:
    w = seg.create_or_replace("c")
    fan = SocketFanOut(seg.reader("c", 0, counted=False))
    (a1, b1), (a2, b2), (a3, b3) = pairs(), pairs(), pairs()
    a1.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    fan.add(1, a1.fileno(), False, _inode(a1))  # its reader reads nothing: it fills
    fan.add(2, a2.fileno(), False, _inode(a2))
    fan.add(3, a3.fileno(), False, _inode(a3))
    b3.close()  # its peer is gone
    big = b"data: " + b"x" * 40_000 + b"\n\n"
    assert w.write(big)
    n, _, _, trouble, _ = fan.pass_(1 << 20)  # type: ignore[misc]
    assert n == len(big)
    assert {k for k, _ in trouble} == {1, 3}
    rest = dict(trouble)
    assert rest[3] is None
    partial = rest[1]
    assert partial is not None and 0 < len(partial) < len(big)
    assert big.endswith(partial)
    assert len(fan) == 1  # both left the set
    assert _drain(b2) == big
    # What client 1's socket took, then the rest: the whole pass, in order.
    took = bytearray()
    while len(took) < len(big) - len(partial):
        took += b1.recv(1 << 20)
    assert bytes(took) + partial == big


def test_clients_are_checked_and_held_by_a_descriptor_of_the_sets_own(
    seg: ringcast.Segment, pairs, tmp_path
) -> None:
    w = seg.create_or_replace("c")
    fan = SocketFanOut(seg.reader("c", 0, counted=False))
    a, b = pairs()
    fan.add(1, a.fileno(), False, _inode(a))
    c, d = pairs()
    with pytest.raises(OSError, match="is another socket now"):
        fan.add(5, c.fileno(), False, _inode(d))  # the number's socket is not the one meant
    with pytest.raises(ValueError, match="already"):
        fan.add(1, a.fileno(), False, _inode(a))
    with open(tmp_path / "f", "w") as f, pytest.raises(OSError, match="not a stream socket"):
        fan.add(2, f.fileno(), False, _inode(f))
    with pytest.raises(OSError):
        fan.add(3, -1, False, 0)
    dgram_a, dgram_b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with dgram_a, dgram_b, pytest.raises(OSError, match="not a stream socket"):
        fan.add(4, dgram_a.fileno(), False, _inode(dgram_a))
    # The caller's descriptor closed (as a transport closes its socket) and its number taken
    # by another socket: the set keeps writing to the socket it was given, never to that one.
    number = a.fileno()
    a.close()
    e, f2 = pairs()
    reused = e if e.fileno() == number else f2 if f2.fileno() == number else None
    assert w.write(b"data: x\n\n")
    assert fan.pass_(1 << 16) == (9, 1, False, [], None)
    assert _drain(b) == b"data: x\n\n"
    assert _drain(e) == b"" and _drain(f2) == b""
    assert reused is not None  # (the kernel gives the lowest free number: the check above bit)
    assert fan.remove(1) and not fan.remove(1)
    assert len(fan) == 0
    b.setblocking(True)
    b.settimeout(5)
    assert b.recv(16) == b""  # the set's descriptor was the last: the socket is closed now
    with pytest.raises(ValueError, match="max_bytes"):
        fan.pass_(0)


def test_a_closed_reader_and_a_replaced_session_raise_as_reads_do(seg: ringcast.Segment) -> None:
    seg.create_or_replace("c")
    r = seg.reader("c", 0, counted=False)
    fan = SocketFanOut(r)
    seg.create_or_replace("c")  # replaced
    with pytest.raises(ringcast.SessionEnded):
        fan.pass_(1 << 16)
    r.close()
    with pytest.raises(ringcast.RingcastError, match="closed"):
        fan.pass_(1 << 16)


# -- writes through (Writer.write_event_through): the producer's append makes the pass


def _framed(offset_after: int, event: bytes) -> bytes:
    """The chunk a chunked client gets for one event appended with ``write_event``."""
    body = b"id: %d\n%s" % (offset_after, event)
    return b"%x\r\n%s\r\n" % (len(body), body)


def test_a_write_through_passes_the_event_at_once_and_tells_nobody(
    seg: ringcast.Segment, pairs
) -> None:
    w = seg.create_or_replace("c")
    sent = SentCounter()
    fan = SocketFanOut(seg.reader("c", 0, counted=False), sent)
    a, b = pairs()
    c, d = pairs()
    fan.add(1, a.fileno(), True, _inode(a))
    fan.add(2, c.fileno(), False, _inode(c))
    # Not allowed yet: appended, the readers to be told, nothing passed.
    assert fan.through == 0
    assert w.write_event_through(b"data: 1\n\n", fan) == 1
    assert fan.passed == 0 and _drain(b) == b""
    first = fan.pass_(1 << 16)
    assert first is not None and first[0] == 16 and fan.passed == 16
    assert _drain(b) == _framed(16, b"data: 1\n\n")
    assert _drain(d) == b"id: 16\ndata: 1\n\n"
    assert sent.take() == 2 * 16 and sent.take() == 0  # every client's body bytes, once
    fan.through = 1 << 16
    assert w.write_event_through(b"data: 2\n\n", fan) == 2
    assert fan.passed == 32
    assert _drain(b) == _framed(32, b"data: 2\n\n")
    assert _drain(d) == b"id: 32\ndata: 2\n\n"
    assert sent.take() == 2 * 16
    assert fan.pass_(1 << 16) is None  # the pump finds nothing left to pass
    with pytest.raises(ValueError, match="through"):
        fan.through = (16 << 20) + 1
    assert w.finalize()
    assert w.write_event_through(b"data: 3\n\n", fan) == 0  # refused, as write_event's False
    assert fan.pass_(1 << 16) == (0, 0, False, [], None)


def test_a_write_through_that_goes_wrong_is_left_to_the_pump(seg: ringcast.Segment, pairs) -> None:
    w = seg.create_or_replace("c")
    fan = SocketFanOut(seg.reader("c", 0, counted=False))
    fan.through = 1 << 16
    a, b = pairs()
    full, _peer = pairs()
    fan.add(1, a.fileno(), False, _inode(a))
    fan.add(2, full.fileno(), False, _inode(full))
    full.setblocking(False)
    try:
        while True:
            full.send(b"x" * 65536)
    except BlockingIOError:
        pass
    assert w.write_event_through(b"data: 1\n\n", fan) == 1  # client 2 took nothing
    assert _drain(b) == b"id: 16\ndata: 1\n\n"
    # While the pump has not seen that pass, no write goes through (the outcomes stay in
    # order), and the pump's next pass is that one, whatever it asks for, and says to read
    # again: the append made meanwhile was not passed, and may not be signalled again.
    assert w.write_event_through(b"data: 2\n\n", fan) == 1
    assert _drain(b) == b""
    assert fan.pass_(1 << 16, True) == (16, 1, True, [(2, b"id: 16\ndata: 1\n\n")], None)
    assert len(fan) == 1 and fan.passed == 16
    assert fan.pass_(1 << 16) == (16, 1, False, [], None)
    assert _drain(b) == b"id: 32\ndata: 2\n\n"
    assert w.write_event_through(b"data: 3\n\n", fan) == 2
    assert _drain(b) == b"id: 48\ndata: 3\n\n"
    # A pump that stops with such a pass kept takes its trouble over.
    c, d = pairs()
    fan.add(3, c.fileno(), False, _inode(c))
    fan.remove(1)
    d.close()  # the client is gone: a send to it fails
    assert w.write_event_through(b"data: 4\n\n", fan) == 1
    assert fan.take_trouble() == [(3, None)]
    assert fan.take_trouble() == [] and len(fan) == 0


_SUBSCRIBER = """
import sys
import ringcast
seg = ringcast.Segment.open(sys.argv[1])
notifier = seg.notifier()
notifier.subscribe(int(sys.argv[2]), int(sys.argv[3]))
notifier.arm()
print("subscribed", flush=True)
sys.stdin.read()
"""


def test_a_write_through_asks_for_the_flush_while_another_process_waits(
    seg: ringcast.Segment, pairs
) -> None:
    w = seg.create_or_replace("c")
    r = seg.reader("c", 0, counted=False)
    seg.notifier()  # this process's row: its own pending wake-up needs no flush
    fan = SocketFanOut(r)
    fan.through = 1 << 16
    a, b = pairs()
    fan.add(1, a.fileno(), False, _inode(a))
    assert w.write_event_through(b"data: 1\n\n", fan) == 2
    other = subprocess.Popen(
        [sys.executable, "-c", _SUBSCRIBER, seg.path, str(w.slot), str(w.generation)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert other.stdout is not None and other.stdout.readline() == "subscribed\n"
        # Passed here, but the other process is to be told by the flush.
        assert w.write_event_through(b"data: 2\n\n", fan) == 1
        assert _drain(b) == b"id: 16\ndata: 1\n\nid: 32\ndata: 2\n\n"
        assert seg.flush_wakes(skip_own=True) == 1
        assert w.write_event_through(b"data: 3\n\n", fan) == 1  # it stays subscribed
    finally:
        other.communicate("", timeout=30)
