"""One request to a service over a tunnel stream: HTTP/1.1 spoken with h11, as a client.

One stream per request, ``Connection: close``: the service's connection ends with its
answer, and a stream never carries two clients' requests. The request is not
half-closed after its body: some servers (llama.cpp's among them) take a peer's EOF for
a client gone, and stop generating.

:attr:`Upstream.received` says whether any byte of the answer came: before it, a failed
request may go to another replica (nothing reached the client); after it, it may not.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import h11

from coordinator.errors import GatewayError, StreamError
from coordinator.tunnel import TunnelStream

__all__ = ["Upstream"]

_READ = 64 * 1024
#: A service's response head, at most.
_MAX_HEAD_BYTES = 64 * 1024


class Upstream:
    """The client side of one exchange with a service."""

    def __init__(self, stream: TunnelStream) -> None:
        self._stream = stream
        self._conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_HEAD_BYTES)
        self.received = False
        """Whether any byte of the answer came."""

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
                ("connection", "close"),
            ],
        )
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
        """The answer's body, piece by piece as it comes.

        Raises:
            GatewayError: ``upstream_timeout`` (nothing came for ``idle_timeout_s``),
                ``upstream_error`` (the stream failed or the answer broke off).
        """
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
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return
            else:
                raise GatewayError("upstream_error", "the service's answer broke off")

    async def finish(self) -> None:
        """After the whole answer: half-close, so that the stream ends both ways."""
        await self._stream.write_eof()

    async def _next(self) -> h11.Event | type[h11.PAUSED] | type[h11.NEED_DATA]:
        while True:
            try:
                event = self._conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise GatewayError("upstream_error", f"the service's answer: {exc}") from None
            if event is not h11.NEED_DATA:
                return event
            data = await self._stream.read(_READ)
            if data:
                self.received = True
            self._conn.receive_data(data)
