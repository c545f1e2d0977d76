"""The reference coordinator's server: agents on ``/agent``, the read API and dashboard beside.

One port serves both: ``process_request`` answers plain HTTP requests (the read API, the
dashboard) and lets websocket upgrades to :data:`AGENT_PATH` through to the agent handler.
With an ``ssl_context`` that port speaks TLS only: ``wss://`` for agents, ``https://`` for
the API and dashboard.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from websockets.asyncio.server import Server, ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.http11 import Request, Response

from agent.protocol.limits import MAX_FRAME_BYTES
from agent.protocol.session import NonceBook
from coordinator import api, keys
from coordinator.connection import Settings, Shared, handle
from coordinator.store import Store

__all__ = ["AGENT_PATH", "Coordinator", "Settings", "serve"]

AGENT_PATH = "/agent"


class Coordinator:
    """A running coordinator: :meth:`start` it, read :attr:`port`, :meth:`stop` it."""

    def __init__(
        self,
        *,
        db_path: Path,
        state_dir: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        settings: Settings | None = None,
        ping_interval_s: float | None = 20.0,
        clock: Callable[[], float] = time.time,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.ssl_context = ssl_context
        self._requested_port = port
        self.db_path = db_path
        self.settings = settings or Settings()
        self.key = keys.load_or_create(state_dir)
        self._ping_interval_s = ping_interval_s
        self._clock = clock
        self._server: Server | None = None
        self._shared: Shared | None = None

    @property
    def store(self) -> Store:
        """The open store (only while started)."""
        if self._shared is None:
            raise RuntimeError("the coordinator is not started")
        return self._shared.store

    @property
    def port(self) -> int:
        """The bound TCP port (useful with port 0)."""
        if self._server is None:
            raise RuntimeError("the coordinator is not started")
        return int(next(iter(self._server.sockets)).getsockname()[1])

    @property
    def url(self) -> str:
        """The websocket URL agents connect to."""
        scheme = "wss" if self.ssl_context is not None else "ws"
        return f"{scheme}://{self._url_host()}:{self.port}{AGENT_PATH}"

    @property
    def dashboard_url(self) -> str:
        """The dashboard's URL."""
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{self._url_host()}:{self.port}/"

    def connected(self) -> set[str]:
        """The node ids with an open session now."""
        return set(self._shared.sessions) if self._shared is not None else set()

    async def start(self) -> None:
        """Open the store and start listening."""
        store = Store(self.db_path)
        self._shared = Shared(
            key=self.key,
            store=store,
            nonces=NonceBook(),
            settings=self.settings,
            clock=self._clock,
            sessions={},
        )
        try:
            self._server = await ws_serve(
                self._handler,
                self.host,
                self._requested_port,
                process_request=self._process_request,
                max_size=MAX_FRAME_BYTES,
                # At most a few frames buffered per agent: with 1 MiB frames the default
                # (16) lets each connection hold 16 MiB of a hostile peer's data.
                max_queue=4,
                ping_interval=self._ping_interval_s,
                ping_timeout=self._ping_interval_s,
                ssl=self.ssl_context,
            )
        except OSError:
            store.close()
            self._shared = None
            raise

    async def stop(self) -> None:
        """Close every connection (1001, going away), stop listening, close the store."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self._shared is not None:
            self._shared.store.close()
            self._shared = None

    async def __aenter__(self) -> Coordinator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _handler(self, ws: ServerConnection) -> None:
        assert self._shared is not None
        await handle(ws, self._shared)

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path.split("?", 1)[0] == AGENT_PATH:
            return None  # the websocket handshake goes on (426 if it is not an upgrade)
        answer = api.route(request.method, request.path, self.store, self.connected())
        response = connection.respond(answer.status, "")
        response.body = answer.body
        del response.headers["Content-Length"], response.headers["Content-Type"]
        response.headers["Content-Length"] = str(len(answer.body))
        response.headers["Content-Type"] = answer.content_type
        response.headers["Cache-Control"] = "no-store"
        return response

    def _url_host(self) -> str:
        host = self.host or "127.0.0.1"
        if host in ("0.0.0.0", "::"):  # a wildcard is not an address to browse to
            host = "127.0.0.1" if host == "0.0.0.0" else "::1"
        return f"[{host}]" if ":" in host else host


async def serve(
    host: str,
    port: int,
    db_path: Path,
    state_dir: Path,
    *,
    settings: Settings | None = None,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[Coordinator], None] | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> None:
    """Run a coordinator until ``stop`` is set (or the task is cancelled)."""
    coordinator = Coordinator(
        db_path=db_path,
        state_dir=state_dir,
        host=host,
        port=port,
        settings=settings,
        ssl_context=ssl_context,
    )
    async with coordinator:
        if on_ready is not None:
            on_ready(coordinator)
        await (stop or asyncio.Event()).wait()
