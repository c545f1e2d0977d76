"""One tunnel stream's state: its windows, and the bytes queued each way (for
:class:`agent.protocol.tunnel.TunnelMux`, which alone decides what they may do)."""

from __future__ import annotations

from collections import deque
from typing import TypeAlias

__all__ = ["Buffer", "StreamState"]

Buffer: TypeAlias = bytes | bytearray | memoryview
"""A piece of a message: a frame's header, or (a view of) bytes queued."""


class StreamState:
    """Windows, ends and buffers of one stream."""

    __slots__ = (
        "end_queued",
        "end_sent",
        "inbound",
        "inbound_bytes",
        "out",
        "out_bytes",
        "recv_window",
        "remote_ended",
        "send_window",
        "stream_id",
        "unannounced",
        "window",
    )

    def __init__(self, stream_id: int, window: int) -> None:
        self.stream_id = stream_id
        self.send_window = window
        self.recv_window = window
        self.window = window
        """The receive window this side grants the stream now (it grows: TunnelMux)."""
        self.unannounced = 0
        """Read by the application, not yet granted back to the peer."""
        # What the application queued, as it came: a chunk that fits a frame goes out
        # without a copy of its own.
        self.out: deque[bytes | memoryview] = deque()
        self.out_bytes = 0
        self.end_queued = False
        self.end_sent = False
        self.inbound: deque[bytes | memoryview] = deque()
        self.inbound_bytes = 0
        self.remote_ended = False

    def queue(self, data: bytes) -> None:
        """Queue bytes to send (a copy of a mutable buffer: the caller may reuse it)."""
        self.out.append(data if isinstance(data, bytes) else bytes(data))
        self.out_bytes += len(data)

    def take(self, size: int, parts: list[Buffer]) -> None:
        """Move the first ``size`` bytes queued to ``parts``."""
        out = self.out
        self.out_bytes -= size
        while size:
            head = out[0]
            if len(head) <= size:
                parts.append(out.popleft())
                size -= len(head)
            else:
                view = memoryview(head)
                parts.append(view[:size])
                out[0] = view[size:]
                size = 0

    def receive(self, data: bytes | memoryview) -> None:
        """Keep bytes received until the application reads them."""
        self.inbound.append(data)
        self.inbound_bytes += len(data)

    def read(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` of the bytes received, oldest first."""
        parts: list[bytes | memoryview] = []
        taken = 0
        while self.inbound and taken < max_bytes:
            part = self.inbound.popleft()
            room = max_bytes - taken
            if len(part) > room:
                self.inbound.appendleft(part[room:])
                part = part[:room]
            parts.append(part)
            taken += len(part)
        self.inbound_bytes -= taken
        return b"".join(parts)
