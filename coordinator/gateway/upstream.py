"""Requests to a service over a tunnel stream: HTTP/1.1 spoken with h11, as a client.

A stream carries one request at a time, and, kept alive, the next ones after it
(:mod:`coordinator.gateway.pool`): :attr:`Upstream.reusable` says whether the last
exchange allows another (h11 follows RFC 9112 section 9.3: no ``Connection: close`` either
way, a body framed by its length or chunks). The request is not half-closed after its
body: some servers (llama.cpp's among them) take a peer's EOF for a client gone, and stop
generating.

:attr:`Upstream.received` says whether any byte of the answer came: before it, a failed
request may go to another replica (nothing reached the client); after it, it may not.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import h11

from coordinator.errors import GatewayError, StreamError
from coordinator.gateway.peer_stream import PeerStream
from coordinator.gateway.pieces import Pieces
from coordinator.tunnel import TunnelStream

__all__ = ["Upstream"]

#: What one read of the stream takes at most: what a bulk answer's stream holds by the time
#: it is read (two of the node's messages), so that each read leaves it empty. A reader that
#: left bytes behind at each grant looked slow to the tunnel, whose stream window then never
#: grew past 256 KiB: the node waited on a WINDOW per 128 KiB, and the loop turned once
#: per 64 KiB here (docs/services.md, "What is left"). Under glibc's mmap threshold as
#: :mod:`agent.protocol.memory` sets it: each read's bytes reuse freed pages.
_READ = 512 * 1024
#: A service's response head, at most.
_MAX_HEAD_BYTES = 64 * 1024


class Upstream:
    """The client side of one exchange with a service."""

    def __init__(self, stream: TunnelStream | PeerStream) -> None:
        self._stream = stream
        self._conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_HEAD_BYTES)
        self.received = False
        """Whether any byte of the answer came."""
        self.exchanges = 0
        """Requests sent on this stream so far (more than one: kept alive)."""

    @property
    def reusable(self) -> bool:
        """Whether another request may follow: the answer ended, both sides keep the
        connection, nothing came after the answer, the stream is up."""
        conn, stream = self._conn, self._stream
        return (
            conn.our_state is h11.DONE
            and conn.their_state is h11.DONE
            and not conn.trailing_data[0]
            and stream.usable
        )

    @property
    def idle_usable(self) -> bool:
        """Whether a kept stream is still fit for a request: up, its server silent."""
        return self._stream.usable

    def next_cycle(self) -> None:
        """Ready for the next request, once :attr:`reusable`."""
        self._conn.start_next_cycle()
        self.received = False

    def close(self) -> None:
        """Drop the stream: the agent closes the server's connection."""
        self._stream.reset()

    def close_unless_over(self) -> None:
        """Drop the stream unless it ended both ways (the client gone: ``cancel``)."""
        if self._stream.is_open:
            self._stream.reset()

    async def request(self, method: str, path: str, host: str, body: bytes) -> None:
        """Send the request, whole.

        Raises:
            StreamError: the stream failed (nothing of the answer came: retryable).
        """
        head = h11.Request(
            method=method,
            target=path,
            headers=[
                ("host", host),
                ("content-type", "application/json"),
                ("content-length", str(len(body))),
                ("accept", "application/json, text/event-stream"),
            ],
        )
        self.exchanges += 1
        await self._stream.write(self._conn.send(head) or b"")
        if body:
            await self._stream.write(self._conn.send(h11.Data(data=body)) or b"")
        self._conn.send(h11.EndOfMessage())

    async def response(self) -> h11.Response:
        """The answer's head.

        Raises:
            StreamError: the stream failed before any byte came (retryable).
            GatewayError: ``upstream_error``: the answer is not HTTP, or ended early.
        """
        event = await self._next()
        while isinstance(event, h11.InformationalResponse):  # 100 Continue and the like
            event = await self._next()
        if not isinstance(event, h11.Response):
            raise GatewayError("upstream_error", "the service closed without an answer")
        return event

    async def body(self, idle_timeout_s: float) -> AsyncIterator[bytes]:
        """The answer's body, piece by piece as it comes: the pieces already read are
        joined into one (a token that came alone passes alone; a flood of tiny chunks is
        one write on, not one each).

        Raises:
            GatewayError: ``upstream_timeout`` (nothing came for ``idle_timeout_s``),
                ``upstream_error`` (the stream failed, the answer broke off, or came in
                far more pieces than its bytes justify: :mod:`.pieces`).
        """
        pieces = Pieces()
        while True:
            try:
                async with asyncio.timeout(idle_timeout_s):
                    event = await self._next()
            except TimeoutError:
                raise GatewayError(
                    "upstream_timeout", f"the service sent nothing for {idle_timeout_s:g} s"
                ) from None
            except StreamError as exc:
                raise GatewayError("upstream_error", f"the service's stream: {exc.code}") from None
            if isinstance(event, h11.Data):
                joined = bytearray()
                while isinstance(event, h11.Data):
                    if not pieces.add(len(event.data)):
                        raise GatewayError(
                            "upstream_error", f"the service's answer came in {pieces.refusal()}"
                        )
                    joined += event.data
                    event = self._parsed()
                yield bytes(joined)
                if event is h11.NEED_DATA:
                    continue
            if isinstance(event, h11.EndOfMessage):
                return
            raise GatewayError("upstream_error", "the service's answer broke off")

    def _parsed(self) -> h11.Event | type[h11.PAUSED] | type[h11.NEED_DATA]:
        """The next event of what was read already (``NEED_DATA`` when none is whole)."""
        try:
            return self._conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise GatewayError("upstream_error", f"the service's answer: {exc}") from None

    async def finish(self) -> None:
        """After the whole answer: half-close, so that the stream ends both ways."""
        await self._stream.write_eof()

    async def _next(self) -> h11.Event | type[h11.PAUSED] | type[h11.NEED_DATA]:
        while True:
            event = self._parsed()
            if event is not h11.NEED_DATA:
                return event
            data = await self._stream.read(_READ)
            if data:
                self.received = True
            self._conn.receive_data(data)
