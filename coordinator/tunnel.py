"""The coordinator's side of the tunnel: nodes' data connections, streams to their services.

A node opens a second websocket, on :data:`TUNNEL_PATH`, beside its control link
(docs/protocol.md, "Tunnel"). It authenticates with the same mutual handshake
(:func:`coordinator.handshake.authenticate`), and only as a node the store knows under
the same key: the tunnel never admits a node. Then binary frames only, driven by the
sans-I/O :class:`agent.protocol.tunnel.TunnelMux`.

:meth:`Tunnels.open` gives a :class:`TunnelStream` to a service of a connected node:
``read`` (b"" at the service's EOF), ``write`` (waits under flow control), ``write_eof``
and ``reset``. A stream that ends any other way raises :class:`StreamError` with a code
from every call: the agent's reset (``unknown_target``, ``connect_failed``, ...), or
``connection_lost`` when the node's data connection goes, which resets every stream on
it at once: a caller never hangs on a dead node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable
from typing import Final

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from agent.protocol.errors import AuthError, LimitExceeded, TunnelError
from agent.protocol.messages import HelloBody, encode_frame
from agent.protocol.tunnel import (
    CONNECTION_WINDOW,
    MAX_STREAMS,
    STREAM_WINDOW,
    TUNNEL_PATH,
    ResetCode,
    Role,
    StreamEnded,
    StreamReadable,
    StreamReset,
    TunnelEvent,
    TunnelFailed,
    TunnelMux,
)
from coordinator.admission import admit
from coordinator.errors import StreamError
from coordinator.handshake import CLOSE_POLICY, Gate, authenticate, close, send

__all__ = ["TUNNEL_PATH", "StreamError", "TunnelStream", "Tunnels"]

_log = logging.getLogger(__name__)

#: Bytes a writer may have queued in the machine before ``write`` waits.
_HIGH_WATER: Final = 64 * 1024
#: RFC 6455 section 7.4.1: 1000, after a newer data connection of the node took over.
_CLOSE_SUPERSEDED: Final = 1000


class TunnelStream:
    """One stream to a node's service; use it as an async context manager or reset it."""

    def __init__(self, link: _Link, stream_id: int, target: str) -> None:
        self._link = link
        self.stream_id = stream_id
        self.node_id = link.node_id
        self.target = target
        self._readable = asyncio.Event()
        self._drained = asyncio.Event()
        self._eof = False
        self._ended = False
        self._error: str | None = None

    @property
    def reset_code(self) -> str | None:
        """Why the stream was reset (None: it was not)."""
        return self._error

    @property
    def usable(self) -> bool:
        """Whether more may be sent and received: not reset, no EOF, nothing unread (a
        kept-alive stream's server has not spoken or closed since its last answer)."""
        return (
            self._error is None
            and not self._eof
            and not self._ended
            and self.is_open
            and self.unread == 0
        )

    @property
    def unread(self) -> int:
        """Bytes received and not yet read: at most the stream's window."""
        return self._link.mux.readable(self.stream_id)

    async def read(self, max_bytes: int = 64 * 1024) -> bytes:
        """Up to ``max_bytes`` of the service's bytes; b"" once it sent all it will.

        Raises:
            StreamError: the stream was reset (the code says by what).
        """
        mux = self._link.mux
        while True:
            data = mux.read(self.stream_id, max_bytes)
            if data:
                if mux.wants_write:  # a window update due, or the stream finished
                    self._link.wake.set()
                return data
            if self._error is not None:
                raise StreamError(self._error, f"stream to {self.target} on {self.node_id}")
            if self._eof:
                return b""
            self._readable.clear()
            await self._readable.wait()

    async def write(self, data: bytes) -> None:
        """Send bytes to the service; returns once few enough are queued.

        Raises:
            StreamError: reset, or ``stream_ended`` after :meth:`write_eof`.
        """
        self._check()
        if self._ended:
            raise StreamError("stream_ended", "written after write_eof")
        mux = self._link.mux
        mux.send(self.stream_id, data)
        self._link.wake.set()
        while mux.buffered(self.stream_id) > _HIGH_WATER and self._error is None:
            self._drained.clear()
            self._link.waiting.add(self)
            await self._drained.wait()
        self._check()

    async def write_eof(self) -> None:
        """Send no more: the service reads EOF after what was written."""
        self._check()
        self._ended = True
        self._link.mux.end(self.stream_id)
        self._link.wake.set()

    def reset(self, code: str = ResetCode.CANCEL) -> None:
        """Abandon the stream: the agent closes the service's connection (idempotent)."""
        if self._error is None:
            self._error = code
            self._link.mux.reset(self.stream_id, code)
            self._link.forget(self)

    async def __aenter__(self) -> TunnelStream:
        return self

    @property
    def is_open(self) -> bool:
        """Whether the stream is still known (not reset, not over both ways)."""
        return self._link.mux.is_open(self.stream_id)

    async def __aexit__(self, *exc_info: object) -> None:
        """Reset the stream unless it ended both ways (a caller gone is a ``cancel``)."""
        if self.is_open:
            self.reset()

    def _check(self) -> None:
        if self._error is not None:
            raise StreamError(self._error, f"stream to {self.target} on {self.node_id}")

    def _on_reset(self, code: str) -> None:
        if self._error is None:
            self._error = code
        self._readable.set()
        self._drained.set()


class _Link:
    """One node's data connection: the machine, its writer, the streams over it."""

    def __init__(self, ws: ServerConnection, node_id: str, mux: TunnelMux) -> None:
        self.ws = ws
        self.node_id = node_id
        self.mux = mux
        self.streams: dict[int, TunnelStream] = {}
        self.waiting: set[TunnelStream] = set()
        self.wake = asyncio.Event()
        self.closing: asyncio.Task[None] | None = None

    async def retire(self) -> None:
        """A newer connection of the node took over: close this one."""
        with contextlib.suppress(ConnectionClosed):
            await self.ws.close(_CLOSE_SUPERSEDED, "superseded")

    def open(self, target: str) -> TunnelStream:
        if self.mux.closed:
            raise StreamError("no_tunnel", f"{self.node_id}'s data connection is closing")
        try:
            stream_id = self.mux.open(target)
        except LimitExceeded as exc:
            if exc.code == "ids_exhausted" and self.closing is None:
                # Once in 2^30 opens: the node opens a new connection, with new ids.
                self.closing = asyncio.create_task(self.ws.close(1000, exc.code))
            raise StreamError(exc.code, exc.detail) from None
        except ValueError as exc:
            raise StreamError("bad_target", str(exc)) from None
        stream = TunnelStream(self, stream_id, target)
        self.streams[stream_id] = stream
        self.wake.set()
        return stream

    def forget(self, stream: TunnelStream) -> None:
        self.streams.pop(stream.stream_id, None)
        self.waiting.discard(stream)
        self.wake.set()

    def sweep(self) -> None:
        """Forget the streams the machine finished (ended both ways, read out)."""
        for stream_id in self.mux.take_finished():
            stream = self.streams.pop(stream_id, None)
            if stream is not None:
                self.waiting.discard(stream)

    async def run(self) -> None:
        """Move frames until the connection closes or the node breaks the rules."""
        writer = asyncio.create_task(self._write())
        try:
            async for message in self.ws:
                events = self.mux.receive_data(message)
                failed = self._carry_out(events)
                self.wake.set()
                if failed is not None:
                    _log.info("%s: tunnel refused: %s", self.node_id, failed)
                    await close(self.ws, CLOSE_POLICY, failed.code)
                    return
        except ConnectionClosed:
            pass
        finally:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            self._carry_out(list(self.mux.connection_lost()))

    def _carry_out(self, events: list[TunnelEvent]) -> TunnelError | None:
        failed: TunnelError | None = None
        for event in events:
            if isinstance(event, StreamReset):
                stream = self.streams.pop(event.stream_id, None)
                if stream is not None:
                    self.waiting.discard(stream)
                    stream._on_reset(event.code)
            elif isinstance(event, StreamReadable | StreamEnded):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream._eof |= isinstance(event, StreamEnded)
                    stream._readable.set()
            elif isinstance(event, TunnelFailed):
                failed = event.error
            # A StreamOpened never comes: the machine refuses the agent's opens itself.
        return failed

    async def _write(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            while message := self.mux.data_to_send():
                await self.ws.send(message)
                self._notify_writers()
            self._notify_writers()
            # Whatever finished a stream (a read, an END sent or received) woke this loop.
            self.sweep()

    def _notify_writers(self) -> None:
        for stream in [s for s in self.waiting if self.mux.buffered(s.stream_id) <= _HIGH_WATER]:
            self.waiting.discard(stream)
            stream._drained.set()


class Tunnels:
    """The nodes' data connections, one per node (a newer one takes over), by node id.

    Args:
        gate: the coordinator's handshake gate (key, store, nonces, settings, clocks).
        max_streams: streams open at once per node (the agent caps its side alike).
        on_link: told ``(node_id, True)`` when a node's data connection is up here, and
            ``(node_id, False)`` when it is gone (what the other coordinators on the
            store route by).
    """

    def __init__(
        self,
        gate: Gate,
        *,
        max_streams: int = MAX_STREAMS,
        window: int = STREAM_WINDOW,
        connection_window: int = CONNECTION_WINDOW,
        on_link: Callable[[str, bool], None] | None = None,
    ) -> None:
        self._gate = gate
        self._on_link = on_link
        self._max_streams = max_streams
        self._window = window
        self._connection_window = connection_window
        self._links: dict[str, _Link] = {}

    def connected(self) -> set[str]:
        """The nodes with a data connection now."""
        return set(self._links)

    def open_streams(self, node_id: str) -> int:
        """How many streams to ``node_id`` are open now (kept track of here)."""
        link = self._links.get(node_id)
        return len(link.streams) if link is not None else 0

    def open(self, node_id: str, target: str) -> TunnelStream:
        """A new stream to the service ``target`` of ``node_id``.

        Opening sends one frame and waits for nothing: a target the node refuses shows as
        a StreamError from the stream's first read.

        Raises:
            StreamError: ``no_tunnel``, ``too_many_streams``, ``bad_target``,
                ``ids_exhausted`` (the node reconnects: try again in a moment).
        """
        link = self._links.get(node_id)
        if link is None:
            raise StreamError("no_tunnel", f"{node_id} has no data connection")
        return link.open(target)

    async def handle(self, ws: ServerConnection) -> None:
        """Serve one data connection until it closes."""
        try:
            conn = await authenticate(ws, self._gate, check_hello=_known_node)
            if conn is None:
                return
            hs = conn.handshake
            assert hs.hello is not None
            node_id = hs.hello.node_id
            settings = self._gate.settings
            hs.accept(
                session_id="t-" + secrets.token_hex(8),
                last_agent_seq=0,
                heartbeat_s=settings.heartbeat_s,
                telemetry_interval_s=settings.telemetry_interval_s,
            )
            await send(ws, [encode_frame(m) for m in hs.messages_to_send()])
        except ConnectionClosed:
            return
        mux = TunnelMux(
            Role.COORDINATOR,
            window=self._window,
            connection_window=self._connection_window,
            max_streams=self._max_streams,
            accept_opens=False,  # agents open nothing
        )
        link = _Link(ws, node_id, mux)
        old = self._links.get(node_id)
        self._links[node_id] = link
        # The older connection closes beside the newer one's serving: a node gone silent
        # would hold the newer one up for the whole closing timeout.
        retiring = None if old is None else asyncio.create_task(old.retire())
        if self._on_link is not None:
            self._on_link(node_id, True)
        try:
            await link.run()
        finally:
            if self._links.get(node_id) is link:
                del self._links[node_id]
                if self._on_link is not None:
                    self._on_link(node_id, False)
            if retiring is not None:
                await retiring


def _known_node(gate: Gate, hello: HelloBody) -> None:
    """A data connection is only for a node the store knows under this key, and admits."""
    settings = gate.settings
    if settings.admission == "allow_list":
        admit(settings, node_id=hello.node_id, public_key=hello.public_key, known=True, token=None)
    known = gate.store.nodes.public_key(hello.node_id)
    if known is None:
        raise AuthError("not_admitted", f"{hello.node_id}: open the control link first")
    if known != hello.public_key:
        raise AuthError("unknown_key", f"{hello.node_id} is registered with another key")
