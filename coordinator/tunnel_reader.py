"""The coordinator's reading of a node's data connection: the tunnel's messages parsed
here, straight out of one buffer, every other frame left to websockets.

websockets reads each piece of the socket into a new bytes object, copies it into its
reader's buffer, slices each frame's payload out of that (a second copy), unmasks it (a
third) and queues the message for a task to take. :class:`FrameReader` sits in front of
websockets' connection on the transport: the socket is read into a buffer of its own
(``recv_into``: no bytes object per read), and a whole, masked binary frame (RFC 6455
section 5.2: FIN, opcode 2, no RSV bits, at most ``max_size``) is unmasked out of it, the
payload's one copy, and handed to ``deliver`` as it completes. Each control frame (ping,
pong, close: FIN, at most 125 bytes) is passed to websockets as it came, which answers it
as before. Anything else (text, fragments, an unmasked or oversized frame, RSV bits, a
reserved opcode) is not this reader's to judge: from its first byte on, everything is
passed to websockets, which fails the connection or delivers the message as it would
have. docs/protocol.md, "The data connection", says why.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final

from websockets.asyncio.server import ServerConnection

try:
    from websockets.speedups import apply_mask
except ImportError:  # websockets built without its C extension, as websockets falls back
    from websockets.utils import apply_mask

__all__ = ["FrameReader"]

_BINARY: Final = 0x82  # FIN, no RSV bits, opcode 2
_CONTROL: Final = frozenset({0x88, 0x89, 0x8A})  # FIN, close / ping / pong
_MASK: Final = 0x80
#: Free room below which the buffer is compacted before a read (a read's least size).
_MIN_READ: Final = 256 * 1024


class FrameReader(asyncio.BufferedProtocol):
    """The data connection's protocol on the transport, in front of ``ws``.

    Args:
        ws: the websocket connection, open; it keeps writing, and keeps what is not a
            whole binary frame.
        deliver: takes each binary message's payload, unmasked.
        max_size: the largest payload taken here (websockets' own ``max_size``).
    """

    def __init__(
        self, ws: ServerConnection, deliver: Callable[[bytes], None], max_size: int
    ) -> None:
        self._ws = ws
        self._deliver = deliver
        self._max_size = max_size
        self._buffer = bytearray(2 * max_size + _MIN_READ)
        self._view = memoryview(self._buffer)
        self._start = 0  # the first byte not parsed yet
        self._end = 0  # the end of what was read
        self._passing = False  # everything goes to websockets from now on

    @classmethod
    def install(
        cls, ws: ServerConnection, deliver: Callable[[bytes], None], max_size: int
    ) -> FrameReader | None:
        """Put a reader in front of ``ws``; None (websockets reads all, as before) when
        websockets holds bytes it has not parsed: the next frame may have begun."""
        if ws.protocol.reader.buffer:
            return None
        reader = cls(ws, deliver, max_size)
        ws.transport.set_protocol(reader)
        return reader

    # -- reading ----------------------------------------------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        if len(self._buffer) - self._end < _MIN_READ:
            # What is left is less than one frame: move it to the front.
            left = bytes(self._view[self._start : self._end])
            self._buffer[: len(left)] = left
            self._start, self._end = 0, len(left)
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        self._end += nbytes
        if self._passing:
            self._pass(self._end - nbytes)
            return
        buffer, view, start, end = self._buffer, self._view, self._start, self._end
        while end - start >= 2:
            first, second = buffer[start], buffer[start + 1]
            length, head = second & 0x7F, 2
            if length == 126:
                head = 4
                length = int.from_bytes(view[start + 2 : start + 4]) if end - start >= 4 else 0
            elif length == 127:
                head = 10
                length = int.from_bytes(view[start + 2 : start + 10]) if end - start >= 10 else 0
            if end - start < head:
                break  # the rest of the length to come
            ours = first == _BINARY or (first in _CONTROL and length <= 125)
            if not ours or not second & _MASK or length > self._max_size:
                self._start = start
                self._passing = True
                self._pass(start)
                return
            size = head + 4 + length
            if end - start < size:
                break
            if first == _BINARY:
                key = bytes(view[start + head : start + head + 4])
                self._deliver(apply_mask(view[start + head + 4 : start + size], key))
            else:
                self._ws.data_received(bytes(view[start : start + size]))
            start += size
        if start == end:
            start = end = 0
        self._start, self._end = start, end

    def _pass(self, start: int) -> None:
        """Hand websockets what was read from ``start`` on."""
        data = bytes(self._view[start : self._end])
        self._start = self._end = 0
        self._ws.data_received(data)

    # -- the rest is websockets' --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Never called: the reader is put on a transport already made."""

    def eof_received(self) -> bool | None:
        self._ws.eof_received()
        return None  # as websockets' connection: the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._ws.connection_lost(exc)

    def pause_writing(self) -> None:
        self._ws.pause_writing()

    def resume_writing(self) -> None:
        self._ws.resume_writing()
