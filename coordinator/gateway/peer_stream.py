"""The asking side of a stream through a peer (:mod:`coordinator.gateway.peer`): a byte
stream to a replica whose node's tunnel another coordinator holds.

Kept alive as a tunnel stream is (:mod:`coordinator.gateway.pool`): the holder relays the
bytes both ways until either end closes, so the next request to the replica goes on the
same connection, the same tunnel stream and the same connection to the service. Whether a
kept one is still fit is known without reading it: the connection's protocol here holds
what arrived (:class:`_Received`), so a service that spoke or closed while the stream was
idle is seen, and the stream is not reused (its bytes would be taken for the next answer).
"""

from __future__ import annotations

import asyncio
import ssl
import urllib.parse
from typing import Final

from coordinator.errors import StreamError
from coordinator.gateway.peer import UPGRADE, PeerAuth

__all__ = ["OPEN_TIMEOUT_S", "PeerStream"]

#: Opening a stream through a peer: connecting and its answer, at most.
OPEN_TIMEOUT_S: Final = 5.0
_READ: Final = 64 * 1024
_MAX_HEAD: Final = 16 * 1024
#: What arrived and was not read yet, at most, before the connection's reading pauses.
_HIGH_WATER: Final = 4 * _READ


class _Received(asyncio.Protocol):
    """A peer connection's protocol: what arrived, until read; EOF; writes' flow control."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.eof = False
        """No more will arrive: the peer half-closed, or the connection is gone."""
        self.lost = False
        self.error: Exception | None = None
        """Why the connection was lost, when not by a clean close (a reset)."""
        self._arrived = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._arrived.set()
        if len(self.buffer) > _HIGH_WATER and self.transport is not None:
            self.transport.pause_reading()
            self._paused = True

    def eof_received(self) -> bool:
        self.eof = True
        self._arrived.set()
        return True  # half-closed: the request may still be written

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = self.lost = True
        self.error = exc
        self._arrived.set()
        self._writable.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    async def more(self) -> None:
        """Until more arrives, or EOF."""
        if not self.eof:
            self._arrived.clear()
            await self._arrived.wait()

    async def read(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` of what arrived, waiting for some; b"" at EOF.

        Raises:
            ConnectionResetError: the connection was lost, not closed (nothing unread).
        """
        while not self.buffer and not self.eof:
            await self.more()
        if not self.buffer and self.error is not None:
            raise ConnectionResetError(str(self.error))
        data = bytes(self.buffer[:max_bytes])
        del self.buffer[:max_bytes]
        if self._paused and len(self.buffer) <= _HIGH_WATER // 2 and not self.lost:
            assert self.transport is not None
            self.transport.resume_reading()
            self._paused = False
        return data

    async def drain(self) -> None:
        """Until the transport takes more (or the connection is gone)."""
        await self._writable.wait()
        if self.lost:
            raise ConnectionResetError("the peer's connection was lost")


class PeerStream:
    """A byte stream to a replica through the coordinator holding its node's tunnel: what
    :class:`coordinator.gateway.upstream.Upstream` uses a tunnel stream for."""

    def __init__(self, transport: asyncio.Transport, received: _Received) -> None:
        self._transport = transport
        self._received = received
        self._sent_eof = False
        self._reset = False

    @classmethod
    async def open(cls, peer_url: str, node_id: str, job_id: str, auth: PeerAuth) -> PeerStream:
        """Ask the gateway at ``peer_url`` for a stream to ``job_id`` on ``node_id``.

        Raises:
            StreamError: ``peer_failed``: the peer could not be reached, refused, or has
                no stream to give (nothing reached the service: another replica may serve).
        """
        url = urllib.parse.urlsplit(peer_url)
        if not url.hostname:  # what the store says: checked at `serve --peer-url`
            raise StreamError("peer_failed", f"no host in {peer_url!r}")
        tls = ssl.create_default_context() if url.scheme == "https" else None
        port = url.port or (443 if tls else 80)
        head = (
            f"GET /_peer/streams/{_quote(node_id)}/{_quote(job_id)} HTTP/1.1\r\n"
            f"host: {url.netloc}\r\n"
            f"connection: upgrade\r\nupgrade: {UPGRADE.decode()}\r\n"
            f"gpu-peer-auth: {auth.header(node_id, job_id)}\r\n\r\n"
        )
        loop = asyncio.get_running_loop()
        transport: asyncio.Transport | None = None
        try:
            async with asyncio.timeout(OPEN_TIMEOUT_S):
                transport, received = await loop.create_connection(
                    _Received, url.hostname, port, ssl=tls
                )
                transport.write(head.encode())
                answer = await _head(received)
        except (OSError, TimeoutError, StreamError):
            if transport is not None:
                transport.abort()
            raise StreamError("peer_failed", f"no stream from {peer_url}") from None
        if not answer.startswith(b"HTTP/1.1 101 "):
            transport.abort()
            status = answer.split(b"\r\n", 1)[0].decode("latin-1", "replace")
            raise StreamError("peer_failed", f"{peer_url} answered {status!r}")
        return cls(transport, received)

    @property
    def usable(self) -> bool:
        """Whether more may be sent and received: not reset, no EOF either way, nothing
        unread (the service has not spoken or closed since its last answer)."""
        received = self._received
        return not (self._reset or self._sent_eof or received.eof or received.buffer)

    @property
    def is_open(self) -> bool:
        """Whether its connection is still open (until :meth:`reset`, which closes it)."""
        return not self._reset

    async def read(self, max_bytes: int = _READ) -> bytes:
        """Up to ``max_bytes`` of the service's bytes; b"" once it sent all.

        Raises:
            StreamError: ``connection_lost``: the peer's relay failed or was reset.
        """
        self._check()
        try:
            return await self._received.read(max_bytes)
        except ConnectionError:
            raise StreamError("connection_lost", "the peer's stream broke") from None

    async def write(self, data: bytes) -> None:
        """Send bytes to the service.

        Raises:
            StreamError: ``connection_lost``, or ``stream_ended`` after :meth:`write_eof`.
        """
        self._check()
        if self._sent_eof:
            raise StreamError("stream_ended", "written after write_eof")
        if self._received.lost:
            raise StreamError("connection_lost", "the peer's stream broke")
        self._transport.write(data)
        try:
            await self._received.drain()
        except ConnectionError:
            raise StreamError("connection_lost", "the peer's stream broke") from None

    async def write_eof(self) -> None:
        """Send no more: the service reads EOF after what was written."""
        self._check()
        self._sent_eof = True
        if self._transport.can_write_eof() and not self._transport.is_closing():
            self._transport.write_eof()

    def reset(self, code: str = "cancel") -> None:
        """Close the connection: at once (the peer resets its tunnel stream ``cancel``)
        unless the stream ended both ways (idempotent)."""
        del code  # a reset is the connection aborted, whatever the reason
        if self._reset:
            return
        self._reset = True
        if self._sent_eof and self._received.eof:
            self._transport.close()
        else:
            self._transport.abort()

    def _check(self) -> None:
        if self._reset:
            raise StreamError("cancel", "the stream was reset")


async def _head(received: _Received) -> bytes:
    """The peer's answer's head (its bytes after it stay, the service's)."""
    while (end := received.buffer.find(b"\r\n\r\n")) < 0:
        if len(received.buffer) > _MAX_HEAD or received.eof:
            raise StreamError("peer_failed", "no answer's head")
        await received.more()
    head = bytes(received.buffer[: end + 4])
    del received.buffer[: end + 4]
    return head


def _quote(part: str) -> str:
    return urllib.parse.quote(part, safe="")
