"""The gateway's listener: client connections, one request at a time each, kept alive.

Each connection is a task; at most ``max_connections`` are served at once, and
``max_connections_per_source`` of one client's address (:mod:`.caps`): one more is
answered 503 and closed; each is bounded in time and bytes
(:class:`coordinator.gateway.client_conn.Limits`). A request is answered by
:class:`coordinator.gateway.proxy.Proxy`: its key checked from its head, then its body
read, then, while it is sent to a replica and answered, the client's side of the
connection watched: the client closing it cancels the request, and the request's tunnel
stream is reset (``cancel``): the service sees its connection closed.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable, Mapping

import h11
import msgspec

from coordinator.errors import GatewayError
from coordinator.gateway import answers
from coordinator.gateway.caps import BodyBudget, Sources, source_of
from coordinator.gateway.client_conn import ClientConnection, ClientGone, Limits, linger
from coordinator.gateway.peer import PATH_PREFIX, PeerAuth, serve_peer
from coordinator.gateway.proxy import Proxy, Timeouts
from coordinator.gateway.records import RecordWriter
from coordinator.gateway.replicas import ReplicaView
from coordinator.store import Store
from coordinator.tunnel import Tunnels

__all__ = ["Gateway", "GatewaySettings", "Peers"]

_log = logging.getLogger(__name__)

_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"retry-after: 1\r\nconnection: close\r\ncontent-length: %d\r\n\r\n"
)


class GatewaySettings(msgspec.Struct, frozen=True, kw_only=True):
    """The gateway's bounds, timeouts and record keeping."""

    limits: Limits = msgspec.field(default_factory=Limits)
    timeouts: Timeouts = msgspec.field(default_factory=Timeouts)
    record_flush_s: float = 1.0
    record_keep_rows: int = 100_000


class Peers(msgspec.Struct, frozen=True, kw_only=True):
    """The other coordinators on the store, as the gateway sees them."""

    auth: PeerAuth
    elsewhere: Callable[[], Mapping[str, str]]
    """The nodes whose tunnel another coordinator holds, and its gateway's URL."""


class Gateway:
    """The OpenAI-compatible listener: :meth:`start` it, read :attr:`port`, :meth:`stop` it."""

    def __init__(
        self,
        store: Store,
        tunnels: Tunnels,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        settings: GatewaySettings | None = None,
        peers: Peers | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``peers``: the other coordinators on the store, whose nodes' services this
        gateway reaches through theirs, and which reach ours through it."""
        self.settings = settings or GatewaySettings()
        self._tunnels = tunnels
        self._peers = peers
        self._host = host
        self._requested_port = port
        self._ssl = ssl_context
        self.records = RecordWriter(
            store.requests,
            flush_s=self.settings.record_flush_s,
            keep_rows=self.settings.record_keep_rows,
        )
        self.proxy = Proxy(
            keys=store.api_keys,
            view=ReplicaView(
                store.services, tunnels.connected, None if peers is None else peers.elsewhere
            ),
            tunnels=tunnels,
            peer_auth=None if peers is None else peers.auth,
            records=self.records,
            timeouts=self.settings.timeouts,
            clock=clock,
        )
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._refusing: set[asyncio.Task[None]] = set()
        """Connections refused, their 503 being read."""
        self._sources = Sources(self.settings.limits.max_connections_per_source)
        self._bodies = BodyBudget(self.settings.limits.max_held_body_bytes)

    @property
    def port(self) -> int:
        """The bound TCP port (useful with port 0)."""
        if self._server is None:
            raise RuntimeError("the gateway is not started")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def connections(self) -> int:
        """Client connections served now."""
        return len(self._connections)

    @property
    def body_bytes_held(self) -> int:
        """Bytes of request bodies read and not yet answered, over every connection."""
        return self._bodies.held

    async def start(self) -> None:
        """Listen, and start writing request records."""
        self._server = await asyncio.start_server(
            self._serve,
            self._host,
            self._requested_port,
            ssl=self._ssl,
            ssl_handshake_timeout=self.settings.limits.head_timeout_s if self._ssl else None,
        )
        self.records.start()

    async def stop(self) -> None:
        """Stop listening; cancel the requests under way; close the kept streams; write
        the last records."""
        if self._server is not None:
            self._server.close()
            tasks = self._connections | self._refusing
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None
        self.proxy.pool.close()
        await self.records.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        limits = self.settings.limits
        source = source_of(writer.get_extra_info("peername"))
        if len(self._connections) >= limits.max_connections or not self._sources.admit(source):
            await self._busy(task, reader, writer)
            return
        self._connections.add(task)
        client = ClientConnection(reader, writer, limits, self._bodies)
        counted = True
        try:
            while (request := await self._head(client)) is not None:
                if request.target.startswith(PATH_PREFIX):
                    # A peer's stream: a coordinator relays its clients' streams, one
                    # connection each, from its one address; not one client's share.
                    self._sources.release(source)
                    counted = False
                    await self._peer(request, client)
                    break
                await self.proxy.handle(request, client)
                if not client.keep_alive:
                    break
        except (ClientGone, ConnectionError):
            pass  # nobody to answer
        except Exception:  # a bug: said, and this connection closed; the others go on
            _log.exception("gateway: a request failed")
        finally:
            try:
                await client.close()  # counted until closed: a lingering close holds a socket
            finally:
                self._connections.discard(task)
                if counted:
                    self._sources.release(source)

    async def _busy(
        self, task: asyncio.Task[None], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Refuse a connection 503, in a way the client reads (:func:`linger`); in a flood
        of refusals, closed at once."""
        body = answers.error_body(GatewayError("replicas_busy", "too many connections"))[1]
        writer.write(_BUSY % len(body) + body)
        if len(self._refusing) >= self.settings.limits.max_connections:
            writer.close()
            return
        self._refusing.add(task)
        try:
            await linger(reader, writer)
        finally:
            self._refusing.discard(task)
            writer.close()

    async def _head(self, client: ClientConnection) -> h11.Request | None:
        """The connection's next request's head; None when it is to be closed (a head
        that broke a bound is answered first)."""
        try:
            return await client.next_head()
        except GatewayError as exc:
            if client.can_answer:
                status, body = answers.error_body(exc)
                await client.answer(status, [("content-type", "application/json")], body)
            return None

    async def _peer(self, request: h11.Request, client: ClientConnection) -> None:
        """A peer's request for a stream (a coordinator's own path: no client's)."""
        try:
            if self._peers is None:
                raise GatewayError("not_found", "this coordinator has no peers")
            await serve_peer(request, client, self._tunnels, self._peers.auth)
        except GatewayError as exc:
            if client.can_answer:
                status, body = answers.error_body(exc)
                await client.answer(status, [("content-type", "application/json")], body)
