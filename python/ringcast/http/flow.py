"""Write flow control of one server connection.

The transport calls ``pause_writing`` when its buffer passes the high-water mark and
``resume_writing`` when it drains below the low one; :class:`FlowControl` turns that into an
awaitable :meth:`~FlowControl.drain` and watches a paused connection: a client that takes
nothing from its buffer for ``write_timeout`` seconds is reset. Without that watchdog a client
that never reads would hold its connection (and whatever the application holds for it) for
ever, since the keep-alive timer is off while a response streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Callable

log = logging.getLogger("ringcast.http")

WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024


class FlowControl:
    """Paused state, the drain waiter and the stall watchdog of one transport."""

    def __init__(
        self,
        transport: asyncio.Transport,
        write_timeout: float,
        on_reset: Callable[[], None],
    ) -> None:
        self.transport = transport
        self.write_timeout = write_timeout
        self.on_reset = on_reset
        """Called when the watchdog resets the connection (the server counts it)."""
        self.paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._stall_timer: asyncio.TimerHandle | None = None
        self._stall_size = 0  # write buffer size when its last progress was seen
        self._stall_since = 0.0  # loop time of that progress
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)

    def pause_writing(self) -> None:
        self.paused = True
        loop = asyncio.get_running_loop()
        self._stall_size = self.transport.get_write_buffer_size()
        self._stall_since = loop.time()
        if self._stall_timer is None:
            self._stall_timer = loop.call_later(self._stall_period(), self._check_stall)

    def resume_writing(self) -> None:
        self.paused = False
        self._cancel_timer()
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def drain(self) -> None:
        """Wait until the transport takes writes again (at once if it does)."""
        if not self.paused:
            return
        if self._waiter is None:
            self._waiter = asyncio.get_running_loop().create_future()
        await self._waiter

    def close(self) -> None:
        """The connection is gone: stop watching and fail a pending :meth:`drain`."""
        self._cancel_timer()
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("client went away"))

    def _cancel_timer(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def _stall_period(self) -> float:
        # Checked four times per --write-timeout, so a stall is cut within 1.25 timeouts.
        return self.write_timeout / 4

    def _check_stall(self) -> None:
        """While writing is paused: reset the connection if its client has taken nothing from
        the write buffer for ``write_timeout``. Progress is a smaller buffer: little is added
        to a paused one (writers wait in :meth:`drain`, the fan-out detaches the connection;
        at most an end-of-stream marker or a pipelined response)."""
        self._stall_timer = None
        if not self.paused or self.transport.is_closing():
            return
        loop = asyncio.get_running_loop()
        size = self.transport.get_write_buffer_size()
        if size < self._stall_size:
            self._stall_size, self._stall_since = size, loop.time()
        elif loop.time() - self._stall_since >= self.write_timeout:
            log.info(
                "reset a connection whose client read nothing for %.0f s (%d bytes unsent)",
                self.write_timeout,
                size,
            )
            self.on_reset()
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                # An RST, so the kernel drops the unsent bytes too instead of retrying them.
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()
            return
        self._stall_timer = loop.call_later(self._stall_period(), self._check_stall)
