"""The agent's TCP connection to a service, for one tunnel stream, driven by callbacks.

What the service sends is handed on as the event loop reads it (``deliver``): no reader
task to wake per piece, and no buffer of its own to copy through (a stream reader copies
each piece in, then out again). ``deliver`` says when the tunnel holds enough of the
stream's bytes: reading pauses until :meth:`ServiceConnection.resume`, and the service
feels the backpressure.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

__all__ = ["ServiceConnection"]


class ServiceConnection(asyncio.Protocol):
    """One connection to a service.

    Args:
        deliver: takes each piece the service sent; True: pause reading.
        at_eof: the service sends no more (it half-closed, or closed).
    """

    def __init__(self, deliver: Callable[[bytes], bool], at_eof: Callable[[], None]) -> None:
        self._deliver = deliver
        self._at_eof = at_eof
        self._transport: asyncio.Transport | None = None
        self._paused = False
        self._writable = asyncio.Event()
        self._writable.set()
        self._lost: BaseException | None = None
        self._closed = False
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        """Done when the service's side is over: None at its EOF, or the OSError it failed
        with (a reset mid-stream)."""

    @property
    def transport(self) -> asyncio.Transport:
        assert self._transport is not None
        return self._transport

    @property
    def paused(self) -> bool:
        """Whether reading is paused until :meth:`resume`."""
        return self._paused

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._deliver(data) and not self._paused:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        """Read on: the tunnel took enough of what was delivered."""
        if self._paused:
            self._paused = False
            if not self.transport.is_closing():
                self.transport.resume_reading()

    def eof_received(self) -> bool:
        self._end(None)
        return True  # keep the writing side open: a half-close

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._lost = exc or ConnectionResetError("the service's connection closed")
        self._end(exc)
        self._writable.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    async def drain(self) -> None:
        """Wait until the service takes what was written.

        Raises:
            OSError: the connection is lost (a write to it cannot arrive).
        """
        await self._writable.wait()
        if self._closed:
            assert self._lost is not None
            raise self._lost

    def _end(self, exc: Exception | None) -> None:
        if self.finished.done():
            return
        if exc is None:
            self.finished.set_result(None)
            self._at_eof()
        else:
            self.finished.set_exception(exc)
