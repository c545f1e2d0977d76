"""One client's HTTP/1.1 connection to the gateway, spoken with h11 over asyncio streams.

Bounded whatever the client does (slowloris-proof): a request's line and headers must
arrive whole within ``head_timeout_s`` of the connection's start or of the previous
answer's end (the keep-alive allowance too), at most ``max_header_bytes`` of them; its body
within ``body_timeout_s``, at most ``max_body_bytes`` (and ``max_held_body_bytes`` over
every connection: :mod:`.caps`); each write must be taken by the
client within ``write_timeout_s``. A client that breaks a bound is answered (400, 408,
413, 431) when it can be, and closed.

While an answer is written, :meth:`ClientConnection.guarded` reads on: the client closing
its side is seen at once (the request is cancelled, and with it the tunnel stream), and
bytes of a next (pipelined) request are kept for later, to a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from http import HTTPStatus
from typing import Any

import h11
import msgspec

from coordinator.errors import GatewayError
from coordinator.gateway.caps import BodyBudget
from coordinator.gateway.pieces import Pieces

__all__ = ["ClientConnection", "ClientGone", "Limits", "linger"]

_READ = 64 * 1024
#: Bytes written and not yet taken by the client before a write waits (asyncio's default
#: high-water mark): the answer's memory per client, beside the tunnel's window.
_WRITE_HIGH = 64 * 1024
#: How long, and how many bytes, a client cut off mid-request is read for (and dropped).
_LINGER_S = 1.0
_LINGER_BYTES = 1 << 20


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    """The bounds of every client connection."""

    max_header_bytes: int = 16 * 1024
    max_body_bytes: int = 8 << 20
    head_timeout_s: float = 15.0
    body_timeout_s: float = 60.0
    write_timeout_s: float = 30.0
    max_connections: int = 1024
    max_connections_per_source: int = 128
    """Of one IPv4 address or IPv6 /64: one source cannot hold every connection."""
    max_held_body_bytes: int = 256 << 20
    """Of request bodies read and not yet answered, over every connection (32 of the
    largest): past it a request is refused ``gateway_busy`` as its body comes."""


class ClientGone(Exception):
    """The client closed, reset, or stopped reading: nobody to answer."""


class ClientConnection:
    """Requests in, answers out, over one client connection."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        limits: Limits,
        bodies: BodyBudget,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._limits = limits
        self._bodies = bodies
        self._held = 0
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
        self.gone = asyncio.Event()
        """Set when the client closed its side while an answer was being written."""

    @property
    def can_answer(self) -> bool:
        """Whether no response to the current request has started yet."""
        return self._conn.our_state in (h11.IDLE, h11.SEND_RESPONSE)

    async def next_head(self) -> h11.Request | None:
        """The next request's line and headers; None when the client is done or idle.

        Raises:
            GatewayError: the request broke HTTP or a bound (``bad_request``,
                ``headers_too_large``, ``request_too_large``, ``request_timeout``): answer
                it, then close.
        """
        self._give_back()  # the previous request's body is answered
        if self._conn.our_state is h11.DONE and self._conn.their_state is h11.DONE:
            self._conn.start_next_cycle()
        try:
            async with asyncio.timeout(self._limits.head_timeout_s):
                event = await self._next_event()
        except TimeoutError:
            if self._conn.their_state is h11.IDLE and not self._conn.trailing_data[0]:
                return None  # an idle keep-alive connection: closed without a word
            raise GatewayError(
                "request_timeout", "the request's head was not sent in time"
            ) from None
        if not isinstance(event, h11.Request):
            return None  # the client closed
        # h11 bounds a head that arrives in pieces; one that came whole is counted here.
        if sum(len(n) + len(v) + 4 for n, v in event.headers) > self._limits.max_header_bytes:
            raise GatewayError("headers_too_large", "the request's headers are too large")
        length = _content_length(event)
        if length is not None and length > self._limits.max_body_bytes:
            raise GatewayError(
                "request_too_large", f"a body is at most {self._limits.max_body_bytes} bytes"
            )
        return event

    async def read_body(self) -> bytes:
        """The current request's whole body, counted held until the next request's head
        or the connection's close.

        Raises:
            GatewayError: ``request_too_large``, ``request_timeout``, ``bad_request``
                (not HTTP, or chunks far smaller than a body's: :mod:`.pieces`),
                ``gateway_busy`` (the bodies held over all connections are at their bound).
            ClientGone: the client closed before the end of its body.
        """
        if self._conn.they_are_waiting_for_100_continue:
            await self._send(h11.InformationalResponse(status_code=100, headers=[]))
        body = bytearray()
        pieces = Pieces()
        try:
            async with asyncio.timeout(self._limits.body_timeout_s):
                while not isinstance(part := await self._next_event(), h11.EndOfMessage):
                    if not isinstance(part, h11.Data):
                        raise ClientGone("closed before the end of its body")
                    if not pieces.add(len(part.data)):  # each costs the loop: bounded
                        raise GatewayError("bad_request", f"a body in {pieces.refusal()}")
                    if not self._bodies.take(len(part.data)):
                        raise GatewayError(
                            "gateway_busy", "too many bodies held", retry_after_s=1.0
                        )
                    self._held += len(part.data)
                    body += part.data
                    if len(body) > self._limits.max_body_bytes:
                        raise GatewayError(
                            "request_too_large",
                            f"a body is at most {self._limits.max_body_bytes} bytes",
                        )
        except TimeoutError:
            raise GatewayError(
                "request_timeout", "the request's body was not sent in time"
            ) from None
        return bytes(body)

    async def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        """Send a response's head."""
        response = h11.Response(
            status_code=status, headers=_encode(headers), reason=_phrase(status)
        )
        await self._send(response)

    async def send(self, data: bytes) -> None:
        """Send a piece of the response's body."""
        if data:
            await self._send(h11.Data(data=data))

    async def end(self) -> None:
        """End the response."""
        await self._send(h11.EndOfMessage())

    async def answer(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        """A whole response at once."""
        headers = [*headers, ("content-length", str(len(body)))]
        if self._conn.our_state is h11.IDLE and self._conn.their_state is not h11.ERROR:
            # A request whose head never came whole: h11 has none to answer, so the
            # refusal is written as it is, and the connection closes after it.
            head = [
                f"HTTP/1.1 {status} {_phrase(status).decode()}",
                *(f"{n}: {v}" for n, v in headers),
            ]
            self._writer.write("\r\n".join([*head, "connection: close", "", ""]).encode() + body)
            await self._drain()
            return
        await self.start(status, headers)
        await self.send(body)
        await self.end()

    @property
    def keep_alive(self) -> bool:
        """Whether the connection may carry another request."""
        return self._conn.our_state is h11.DONE and self._conn.their_state is h11.DONE

    async def guarded(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` (once the request is read whole) while watching the client: if it
        closes its side, ``work`` is cancelled and ClientGone raised."""
        task = asyncio.create_task(work)
        watcher = asyncio.create_task(self._watch())
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            task.cancel()  # no-op when it is done
            # Cancelled, the request's stream is reset (``cancel``) on its way out.
            (outcome,) = await asyncio.gather(task, return_exceptions=True)
            await asyncio.gather(watcher, return_exceptions=True)
        if self.gone.is_set() and isinstance(outcome, asyncio.CancelledError):
            raise ClientGone("the client closed its side")
        if isinstance(outcome, BaseException):
            raise outcome

    async def close(self) -> None:
        """Close the connection (after what was written); a client cut off in the middle
        of its request is let read its answer first (:func:`linger`)."""
        self._give_back()
        their = self._conn.their_state
        if their is h11.SEND_BODY or their is h11.ERROR or self._conn.trailing_data[0]:
            await linger(self._reader, self._writer)
        self._writer.close()
        with contextlib.suppress(ConnectionError, TimeoutError):
            async with asyncio.timeout(self._limits.write_timeout_s):
                await self._writer.wait_closed()

    def take_over(self, request: h11.Request) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The connection's streams, for bytes that are not HTTP any more (an upgrade),
        after ``request``, which has no body.

        Raises:
            GatewayError: ``bad_request``: the request has a body, or the client sent
                bytes past its head before it was answered.
        """
        bodied = any(n == b"transfer-encoding" for n, _ in request.headers)
        if bodied or _content_length(request) or self._conn.trailing_data[0]:
            raise GatewayError("bad_request", "nothing may follow an upgrade's request")
        return self._reader, self._writer

    def abort(self) -> None:
        """Drop the connection at once (a response that cannot end well)."""
        self._writer.transport.abort()

    def _give_back(self) -> None:
        self._bodies.give_back(self._held)
        self._held = 0

    async def _watch(self) -> None:
        kept = 0
        try:
            # Bytes of a next request are kept, up to one header block's worth: then
            # reading stops (the client waits, as TCP makes it) while the work goes on.
            while kept <= self._limits.max_header_bytes:
                data = await self._reader.read(_READ)
                if not data:
                    self.gone.set()
                    return
                kept += len(data)
                self._conn.receive_data(data)
            await asyncio.get_running_loop().create_future()  # until cancelled: not done
        except ConnectionError:
            self.gone.set()

    async def _next_event(self) -> h11.Event | type[h11.PAUSED] | type[h11.NEED_DATA]:
        while True:
            try:
                event = self._conn.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                code = "headers_too_large" if status == 431 else "bad_request"
                raise GatewayError(code, str(exc)) from None
            if event is not h11.NEED_DATA:
                return event
            try:
                data = await self._reader.read(_READ)
            except ConnectionError:
                data = b""
            self._conn.receive_data(data)

    async def _send(self, event: h11.Event) -> None:
        try:
            data = self._conn.send(event)
        except h11.LocalProtocolError as exc:
            raise ClientGone(str(exc)) from None
        if data:
            self._writer.write(data)
        await self._drain()

    async def _drain(self) -> None:
        transport = self._writer.transport
        if transport.get_write_buffer_size() < _WRITE_HIGH and not transport.is_closing():
            return  # taken as fast as written: no timer per token event
        try:
            async with asyncio.timeout(self._limits.write_timeout_s):
                await self._writer.drain()
        except (ConnectionError, TimeoutError) as exc:
            self.abort()
            raise ClientGone(f"the client did not take the answer: {exc!r}") from None


async def linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Before closing a connection whose client may still be sending: closed with bytes
    unread, its socket is reset, and the client's kernel drops the answer before it is
    read. So our end goes first (half-close, after the answer), and what the client sends
    is read and dropped until its end, for at most :data:`_LINGER_S` and
    :data:`_LINGER_BYTES` (a client still sending past them is reset)."""
    try:
        if writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(_LINGER_S):
            dropped = 0
            while dropped < _LINGER_BYTES and (data := await reader.read(_LINGER_BYTES)):
                dropped += len(data)
    except (ConnectionError, TimeoutError):
        pass  # gone, or still sending: closed now


def _content_length(request: h11.Request) -> int | None:
    for name, value in request.headers:
        if name == b"content-length":
            return int(value)
    return None


def _phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _encode(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(n.encode("latin-1"), v.encode("latin-1")) for n, v in headers]
