"""The tunnel's flow control and scheduler: the accounting half of
:class:`agent.protocol.tunnel.TunnelMux`, apart from its handling of the peer's frames.

Flow control, per stream and per connection (as RFC 9113 section 5.2): a sender may have
at most ``window`` bytes of a stream, and ``connection_window`` of all streams, that the
receiver has not yet read; the receiver grants more (WINDOW) as its application reads,
once half a window has been read. A receiver therefore holds at most
``connection_window`` bytes for the peer, whatever the peer does.

The sender's scheduler (:meth:`FlowControl.data_to_send`) puts control frames (WINDOW,
RESET, OPEN, END of a drained stream) ahead of any data, then takes one bounded chunk from
each stream that has data and window in turn (round robin), so one bulk stream cannot hold
the others up.
"""

from __future__ import annotations

from collections import deque
from typing import Final

from agent.protocol.tunnel_frames import (
    HEADER_BYTES,
    MAX_DATA_BYTES,
    data_header,
    encode_end,
    encode_window,
)
from agent.protocol.tunnel_stream import Buffer, StreamState

__all__ = ["CHUNK_BYTES", "MAX_BATCH_BYTES", "FlowControl"]

#: The scheduler's unit: one stream's turn sends at most this much while others wait.
CHUNK_BYTES: Final = 16 * 1024
#: What one data_to_send() returns at most, give or take a frame (one websocket message).
MAX_BATCH_BYTES: Final = 256 * 1024


class FlowControl:
    """The windows both ways, the control frames owed and the streams' turns to send.

    :class:`agent.protocol.tunnel.TunnelMux` is one; the arguments are its own.
    """

    def __init__(self, *, window: int, connection_window: int, max_window: int) -> None:
        self.closed = False
        self._streams: dict[int, StreamState] = {}
        self._window = window
        self._max_window = max(window, max_window)
        self._growth_budget = connection_window // 4
        self._grown = 0  # what the open streams' windows grew by, together
        self._conn_window = connection_window
        self._conn_send = connection_window
        self._conn_recv = connection_window
        self._conn_unannounced = 0
        self._control: deque[bytes] = deque()
        self._ready: deque[int] = deque()  # streams with data to send, in turn
        self._scheduled: set[int] = set()
        self._finished: list[int] = []
        self._queued = 0  # what all streams queued and not yet framed, together

    @property
    def queued(self) -> int:
        """Bytes of all streams queued and not yet framed."""
        return self._queued

    # -- what goes out --------------------------------------------------------------------

    def data_to_send(self, max_bytes: int = MAX_BATCH_BYTES) -> bytes:
        """The next message to write: control frames, then data in turns (b"": nothing)."""
        return b"".join(self.parts_to_send(max_bytes))

    def parts_to_send(self, max_bytes: int = MAX_BATCH_BYTES) -> list[Buffer]:
        """The next message to write, as the pieces it is made of ([]: nothing): for a
        driver that copies them once anyway (to mask them), instead of joining them first.

        A stream's turn is one chunk of at most :data:`CHUNK_BYTES` while others wait for
        theirs, and of up to a whole frame when it is alone: fairness costs nothing then.
        A frame is never cut to fit ``max_bytes``: the last one may go past it. Cut, a
        service's read of 256 KiB went as a message and a second one of its last 36 bytes,
        each written, woken for and read on its own.
        """
        if self.closed:
            return []
        parts: list[Buffer] = []
        budget = max_bytes
        control = self._control
        while control and (budget > 0 or not parts):
            frame = control.popleft()
            parts.append(frame)
            budget -= len(frame)
        while self._ready and self._conn_send > 0 and budget > 0:
            sid = self._ready.popleft()
            stream = self._streams.get(sid)
            if stream is None or not stream.out or stream.send_window <= 0:
                self._scheduled.discard(sid)
                continue
            size = min(
                CHUNK_BYTES if self._ready else MAX_DATA_BYTES,
                stream.out_bytes,
                stream.send_window,
                self._conn_send,
            )
            parts.append(data_header(sid, size))
            stream.take(size, parts)
            stream.send_window -= size
            self._conn_send -= size
            self._queued -= size
            budget -= HEADER_BYTES + size
            if stream.out and stream.send_window > 0:
                self._ready.append(sid)
            else:
                self._scheduled.discard(sid)
                if not stream.out and stream.end_queued:
                    parts.append(encode_end(sid))
                    stream.end_sent = True
                    self._forget_if_done(stream)
        return parts

    def _schedule(self, stream: StreamState) -> None:
        if stream.stream_id not in self._scheduled and stream.send_window > 0:
            self._scheduled.add(stream.stream_id)
            self._ready.append(stream.stream_id)

    def _send_end(self, stream: StreamState) -> None:
        self._control.append(encode_end(stream.stream_id))
        stream.end_sent = True
        self._forget_if_done(stream)

    def _forget_if_done(self, stream: StreamState) -> None:
        if stream.end_sent and stream.remote_ended and not stream.inbound:
            del self._streams[stream.stream_id]
            self._grown -= stream.window - self._window
            self._finished.append(stream.stream_id)

    def _credit(self, stream: StreamState, size: int) -> None:
        """The application read ``size`` bytes: grant them back once half a window is due.

        A reader that has read all it received by then keeps up with the sender: the
        window, not the reader, is what holds the stream back (one round trip per half
        window). Its window doubles, up to ``max_window``, as HTTP/2 receivers auto-tune
        theirs; a reader that falls behind keeps the window it has. All streams' growth
        together stays within a quarter of the connection's window, so that readers that
        kept up and then stopped leave the rest to the others.
        """
        if size == 0:
            return
        if not stream.remote_ended:
            stream.unannounced += size
            if stream.unannounced >= stream.window // 2:
                increment = stream.unannounced
                if not stream.inbound:
                    extra = min(
                        stream.window,
                        self._max_window - stream.window,
                        self._growth_budget - self._grown,
                    )
                    if extra > 0:
                        increment += extra
                        stream.window += extra
                        self._grown += extra
                self._control.append(encode_window(stream.stream_id, increment))
                stream.recv_window += increment
                stream.unannounced = 0
        self._credit_connection(size)

    def _credit_connection(self, size: int) -> None:
        self._conn_unannounced += size
        if self._conn_unannounced >= self._conn_window // 2:
            self._control.append(encode_window(0, self._conn_unannounced))
            self._conn_recv += self._conn_unannounced
            self._conn_unannounced = 0

    def _release(self, stream: StreamState) -> None:
        """A stream gone: its bytes unread no longer count against the connection's
        window, nor its bytes queued against :attr:`queued`."""
        self._queued -= stream.out_bytes
        if stream.inbound_bytes:
            self._credit_connection(stream.inbound_bytes)
            stream.inbound.clear()
            stream.inbound_bytes = 0
