"""Sans-I/O tunnel: byte streams multiplexed over one connection, with flow control.

The coordinator opens a stream to a service the agent names by target; bytes go both
ways, each direction half-closed by END, the whole stream cancelled by RESET with a code
(docs/protocol.md, "Tunnel"; frames in :mod:`agent.protocol.tunnel_frames`). As with
:mod:`agent.protocol.connection`, a driver feeds each received binary message in
(:meth:`TunnelMux.receive_data`), carries out the events it returns, and writes what
:meth:`TunnelMux.data_to_send` returns; nothing here touches a socket or a clock.

Flow control (per stream and per connection, as RFC 9113 section 5.2) and the sender's
round-robin scheduler are :class:`agent.protocol.tunnel_flow.FlowControl`'s, which this
machine is; here is its handling of what the application and the peer do.

Events::

    StreamOpened(id, target)   the peer opened a stream: connect it, or reset() it
    StreamReadable(id)         read() has bytes for it
    StreamEnded(id)            the peer sends no more: read() gives b"" once drained
    StreamReset(id, code, remote)  the stream is over (remote: the peer reset it)
    (a stream that ended both ways and was read out: take_finished())
    TunnelFailed(error)        the peer broke the rules: close with error.code (every
                               stream got its StreamReset first)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Final

from agent.protocol.errors import LimitExceeded, TunnelError
from agent.protocol.tunnel_events import (
    ResetCode,
    Role,
    StreamEnded,
    StreamOpened,
    StreamReadable,
    StreamReset,
    TunnelEvent,
    TunnelFailed,
)
from agent.protocol.tunnel_flow import CHUNK_BYTES, MAX_BATCH_BYTES, FlowControl
from agent.protocol.tunnel_frames import (
    MAX_STREAM_ID,
    MAX_WINDOW,
    Data,
    End,
    Open,
    Reset,
    Window,
    decode_frames,
    encode_open,
    encode_reset,
)
from agent.protocol.tunnel_stream import StreamState

__all__ = [
    "CHUNK_BYTES",
    "CONNECTION_WINDOW",
    "MAX_BATCH_BYTES",
    "MAX_CONTROL_BACKLOG",
    "MAX_STREAMS",
    "MAX_STREAM_WINDOW",
    "STREAM_WINDOW",
    "TUNNEL_PATH",
    "ResetCode",
    "Role",
    "StreamEnded",
    "StreamOpened",
    "StreamReadable",
    "StreamReset",
    "TunnelEvent",
    "TunnelFailed",
    "TunnelMux",
]

#: The websocket path of the data connection, beside the control link's ``/agent``.
TUNNEL_PATH: Final = "/tunnel"
#: Each side's initial window per stream, and per connection (both sides assume these).
STREAM_WINDOW: Final = 256 * 1024
CONNECTION_WINDOW: Final = 16 * 1024 * 1024
#: What a stream's receive window may grow to while its reader keeps up (TunnelMux._credit).
MAX_STREAM_WINDOW: Final = 4 * 1024 * 1024
#: Most streams open at once on one connection, as each side counts them.
MAX_STREAMS: Final = 256
#: Control frames queued and not yet sent past which the peer is flooding (``flood``).
MAX_CONTROL_BACKLOG: Final = 4096
#: Stream ids this side reset, remembered so that the peer's frames in flight are dropped.
_RESET_MEMORY = 4096


class TunnelMux(FlowControl):
    """One side of a tunnel connection.

    Args:
        role: which side; it fixes the parity of the ids this side opens.
        window, connection_window: the initial windows. Both sides must use the same
            values: they are the protocol's constants, parameters only so that tests can
            make them small.
        max_window: what this side lets a stream's receive window grow to while the
            application reads all it receives (this side's choice: the peer only sees
            larger WINDOW increments). The streams' growth together is held to a quarter
            of the connection's window.
        max_streams: the most streams open at once; the peer's opens past it are reset
            ``too_many_streams``, this side's refused with LimitExceeded.
        accept_opens: whether the peer may open streams; if not, each of its opens is
            reset ``refused`` here (counted as owed control frames, as any reset).
    """

    def __init__(
        self,
        role: Role,
        *,
        window: int = STREAM_WINDOW,
        connection_window: int = CONNECTION_WINDOW,
        max_window: int = MAX_STREAM_WINDOW,
        max_streams: int = MAX_STREAMS,
        accept_opens: bool = True,
    ) -> None:
        super().__init__(window=window, connection_window=connection_window, max_window=max_window)
        self.role = role
        self._accept_opens = accept_opens
        self._max_streams = max_streams
        self._next_id = role.value
        self._last_peer_id = 0
        self._reset_ids: set[int] = set()
        self._reset_order: deque[int] = deque()

    # -- what the application does ------------------------------------------------------

    def open(self, target: str) -> int:
        """Open a stream to ``target``; its id.

        Raises:
            LimitExceeded: ``too_many_streams``; ``ids_exhausted`` after 2^30 opens on one
                connection (a new connection starts again).
            ValueError: a target name the peer would refuse.
        """
        if self.closed:
            raise RuntimeError("the tunnel is closed")
        if len(self._streams) >= self._max_streams:
            raise LimitExceeded("too_many_streams", f"{self._max_streams} streams are open")
        if self._next_id > MAX_STREAM_ID:
            raise LimitExceeded("ids_exhausted", "stream ids are used up: reconnect")
        frame = encode_open(self._next_id, target)
        stream_id, self._next_id = self._next_id, self._next_id + 2
        self._streams[stream_id] = StreamState(stream_id, self._window)
        self._control.append(frame)
        return stream_id

    def send(self, stream_id: int, data: bytes) -> bool:
        """Queue bytes of a stream; False if the stream is gone or ended (nothing queued)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.end_queued:
            return False
        if data:
            stream.queue(data)
            self._queued += len(data)
            self._schedule(stream)
        return True

    def end(self, stream_id: int) -> None:
        """Send no more on a stream: END follows the bytes queued."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.end_queued:
            return
        stream.end_queued = True
        if not stream.out:
            self._send_end(stream)

    def reset(self, stream_id: int, code: str = ResetCode.CANCEL) -> None:
        """Abandon a stream both ways; what it had queued is dropped."""
        stream = self._streams.pop(stream_id, None)
        if stream is None:
            return
        self._grown -= stream.window - self._window
        self._remember_reset(stream_id)
        self._control.append(encode_reset(stream_id, code))
        self._release(stream)

    def read(self, stream_id: int, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` received bytes of a stream (b"": none now, or gone)."""
        stream = self._streams.get(stream_id)
        if stream is None or not stream.inbound:
            return b""
        data = stream.read(max_bytes)
        self._credit(stream, len(data))
        self._forget_if_done(stream)
        return data

    def readable(self, stream_id: int) -> int:
        """Bytes received on a stream and not yet read."""
        stream = self._streams.get(stream_id)
        return stream.inbound_bytes if stream is not None else 0

    def buffered(self, stream_id: int) -> int:
        """Bytes of a stream queued and not yet framed."""
        stream = self._streams.get(stream_id)
        return stream.out_bytes if stream is not None else 0

    def is_open(self, stream_id: int) -> bool:
        """Whether the stream is still known (not reset, not over both ways)."""
        return stream_id in self._streams

    def take_finished(self) -> list[int]:
        """The streams that ended both ways and were read out since the last call.

        A driver calls it after what may finish a stream (reading, :meth:`data_to_send`,
        :meth:`receive_data`) and forgets them: no event says so.
        """
        finished, self._finished = self._finished, []
        return finished

    @property
    def wants_write(self) -> bool:
        """Whether the driver's writer has work: frames to send (data_to_send), or
        streams finished (take_finished). A read that grants no window makes none."""
        return bool(self._control or self._ready or self._finished)

    @property
    def open_streams(self) -> int:
        """How many streams are open."""
        return len(self._streams)

    def connection_lost(self) -> list[StreamReset]:
        """The connection went: every stream is reset ``connection_lost``."""
        self.closed = True
        events = [
            StreamReset(sid, ResetCode.CONNECTION_LOST, remote=False) for sid in self._streams
        ]
        self._streams.clear()
        self._grown = 0
        self._queued = 0
        self._control.clear()
        return events

    # -- what the peer sent ---------------------------------------------------------------

    def receive_data(self, message: bytes | str) -> list[TunnelEvent]:
        """Take one message of the peer's: binary; a text message breaks the rules."""
        if isinstance(message, str):
            return self.fail(TunnelError("bad_frame", "a text message"))
        if self.closed:
            return []
        events: list[TunnelEvent] = []
        try:
            for frame in decode_frames(message):
                self._receive_frame(frame, events)
            if len(self._control) > MAX_CONTROL_BACKLOG:
                raise TunnelError("flood", f"over {MAX_CONTROL_BACKLOG} control frames owed")
        except TunnelError as exc:
            return self.fail(exc, events)
        # One StreamReadable per stream and message, however many DATA frames it held.
        seen: set[int] = set()
        deduped: list[TunnelEvent] = []
        for event in events:
            if isinstance(event, StreamReadable):
                if event.stream_id in seen:
                    continue
                seen.add(event.stream_id)
            deduped.append(event)
        return deduped

    def _receive_frame(
        self, frame: Data | Window | End | Reset | Open, out: list[TunnelEvent]
    ) -> None:
        sid = frame.stream_id
        if isinstance(frame, Window) and sid == 0:
            self._conn_send += frame.increment
            if self._conn_send > MAX_WINDOW:
                raise TunnelError("window_overflow", f"connection window {self._conn_send}")
            return
        if sid == 0:
            raise TunnelError("bad_stream_id", f"{type(frame).__name__.upper()} on stream 0")
        if isinstance(frame, Open):
            self._on_open(frame, out)
            return
        stream = self._streams.get(sid)
        if stream is None:
            self._on_unknown(frame)
            return
        if isinstance(frame, Data):
            if stream.remote_ended:
                raise TunnelError("stream_closed", f"DATA on stream {sid} after its END")
            size = len(frame.data)
            if size > stream.recv_window or size > self._conn_recv:
                raise TunnelError(
                    "flow_control",
                    f"{size} bytes on stream {sid}; windows {stream.recv_window}, "
                    f"connection {self._conn_recv}",
                )
            stream.recv_window -= size
            self._conn_recv -= size
            stream.receive(frame.data)
            out.append(StreamReadable(sid))
        elif isinstance(frame, Window):
            stream.send_window += frame.increment
            if stream.send_window > MAX_WINDOW:
                raise TunnelError("window_overflow", f"stream {sid} window {stream.send_window}")
            if stream.out:
                self._schedule(stream)
        elif isinstance(frame, End):
            if stream.remote_ended:
                raise TunnelError("stream_closed", f"a second END on stream {sid}")
            stream.remote_ended = True
            out.append(StreamEnded(sid))
            self._forget_if_done(stream)
        else:
            del self._streams[sid]
            self._grown -= stream.window - self._window
            self._release(stream)
            out.append(StreamReset(sid, frame.code, remote=True))

    def _on_open(self, frame: Open, out: list[TunnelEvent]) -> None:
        sid = frame.stream_id
        if sid % 2 == self.role.value % 2:
            raise TunnelError("bad_stream_id", f"stream {sid} has this side's parity")
        if sid <= self._last_peer_id:
            raise TunnelError("bad_stream_id", f"stream {sid} after {self._last_peer_id}")
        self._last_peer_id = sid
        refusal = (
            ResetCode.REFUSED
            if not self._accept_opens
            else ResetCode.TOO_MANY_STREAMS
            if len(self._streams) >= self._max_streams
            else None
        )
        if refusal is not None:
            self._remember_reset(sid)
            self._control.append(encode_reset(sid, refusal))
            return
        self._streams[sid] = StreamState(sid, self._window)
        out.append(StreamOpened(sid, frame.target))

    def _on_unknown(self, frame: Data | Window | End | Reset) -> None:
        """A frame of a stream not open: in flight after this side reset it, or an error."""
        sid = frame.stream_id
        ours = sid % 2 == self.role.value % 2
        if (ours and sid >= self._next_id) or (not ours and sid > self._last_peer_id):
            raise TunnelError("unknown_stream", f"stream {sid} was never opened")
        if isinstance(frame, Data):
            # Counted against the connection's window all the same: grant it back.
            size = len(frame.data)
            if size > self._conn_recv:
                raise TunnelError("flow_control", f"{size} bytes; connection {self._conn_recv}")
            self._conn_recv -= size
            self._credit_connection(size)
        if sid in self._reset_ids or isinstance(frame, Window | Reset):
            return  # a WINDOW or RESET may cross this side's END or RESET
        raise TunnelError("stream_closed", f"{type(frame).__name__.upper()} on closed stream {sid}")

    def fail(self, error: TunnelError, events: Sequence[TunnelEvent] = ()) -> list[TunnelEvent]:
        """The peer broke the rules: every stream the driver knows of is reset, then close.

        A driver calls it for what the machine cannot see (a text message). Of ``events``,
        what the failing message did before the error, only the resets stand: a stream it
        opened was never heard of, data and ends no longer matter.
        """
        fresh = {e.stream_id for e in events if isinstance(e, StreamOpened)}
        kept: list[TunnelEvent] = [e for e in events if isinstance(e, StreamReset)]
        kept += [
            StreamReset(sid, error.code, remote=False) for sid in self._streams if sid not in fresh
        ]
        kept.append(TunnelFailed(error))
        self.closed = True
        self._streams.clear()
        self._grown = 0
        self._queued = 0
        self._control.clear()
        return kept

    # -- helpers ----------------------------------------------------------------------------

    def _remember_reset(self, stream_id: int) -> None:
        self._reset_ids.add(stream_id)
        self._reset_order.append(stream_id)
        if len(self._reset_order) > _RESET_MEMORY:
            self._reset_ids.discard(self._reset_order.popleft())
