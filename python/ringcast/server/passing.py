"""Passing a reader's connection to the HTTP process that produces its stream.

With the jobs in the HTTP processes (``--workers 0``) and more than one of them, a
``GET /v1/stream`` lands in any process the kernel picks, while the stream is produced in
the process that took its ``POST``. Served where it landed, each event then crosses
processes: the producer's append wakes the other process, which reads the ring and writes
to the client (a wake-up, a flush and a pump pass per event in a second process). Served
by the producer, the event is written to its readers in the turn that produced it.

So the process that takes such a GET, for a running stream whose producer is a sibling
HTTP process, passes the connection there before it writes anything: the socket (over a
Unix datagram socket in the run directory, ``SCM_RIGHTS``) with the request's bytes as it
read them. The producer adopts the socket as if it had accepted it and reads the request
from those bytes; this process closes its descriptor (the connection lives on in the
other). Whatever fails on the way (the producer is gone, its queue is full, the request
does not fit a datagram) leaves the connection here, served as before.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable

from ringcast.server import rundir

log = logging.getLogger("ringcast.server")

MAX_PASSED = 64 * 1024
"""The most bytes passed with a connection (a head is at most 16 KiB, a GET has no body;
a connection with more read of it, pipelined requests, stays where it is)."""
MAX_READERS = 8
"""A stream is passed its readers while it has fewer than this many: a stream's first
readers cost the most where they cross processes (a wake-up and a pump pass in a second
process for one or two clients), while the readers of a stream with many can share the
writing between processes, and all of them in the producer's would pin them to one core."""


class Passing:
    """One HTTP process's end: takes connections its siblings pass (``adopt``) and passes
    its own (:meth:`give`)."""

    def __init__(self, run_dir: str, adopt: Callable[[socket.socket, bytes], None]) -> None:
        self.run_dir = run_dir
        self.adopt = adopt
        self.own_pid = os.getpid()
        self.path = rundir.connection_socket(run_dir, self.own_pid)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.inbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.inbox.bind(self.path)
        self.inbox.setblocking(False)
        self.outbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.outbox.setblocking(False)
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.inbox.fileno(), self._receive)

    def give(self, fd: int, data: bytes, pid: int) -> bool:
        """Passes the connection whose socket is ``fd``, with the bytes read from it so far
        (``data``, at most ``MAX_PASSED``: ``Connection.pass_to`` keeps larger ones before
        it pauses them), to HTTP process ``pid``; False if it could not (then nothing was
        sent)."""
        try:
            self.outbox.sendmsg(
                [data],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))],
                0,
                rundir.connection_socket(self.run_dir, pid),
            )
        except OSError:
            return False  # gone (no socket there), or its queue is full
        return True

    def _receive(self) -> None:
        while True:
            try:
                data, ancdata, flags, _ = self.inbox.recvmsg(
                    MAX_PASSED,
                    socket.CMSG_SPACE(4 * array.array("i").itemsize),
                    socket.MSG_CMSG_CLOEXEC,
                )
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("HTTP process: reading a passed connection failed: %s", e)
                return
            fds = array.array("i")
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    usable = len(payload) - len(payload) % fds.itemsize
                    fds.frombytes(payload[:usable])
            if len(fds) != 1 or flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
                for fd in fds:
                    os.close(fd)
                continue  # not what a sibling sends
            try:
                sock = socket.socket(fileno=fds[0])
            except OSError:
                os.close(fds[0])
                continue
            if sock.type != socket.SOCK_STREAM or sock.family not in (
                socket.AF_INET,
                socket.AF_INET6,
            ):
                sock.close()
                continue
            self.adopt(sock, data)

    def close(self) -> None:
        """Stops taking connections; those passed already are adopted first (served as this
        process's own until it stops), not dropped with the socket."""
        self._receive()
        self.loop.remove_reader(self.inbox.fileno())
        self.inbox.close()
        self.outbox.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
