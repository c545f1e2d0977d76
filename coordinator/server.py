"""The reference coordinator's server: agents on ``/agent``, the read API and dashboard beside.

One port serves both: ``process_request`` answers plain HTTP requests (the read API, the
dashboard) and lets websocket upgrades to :data:`AGENT_PATH` through to the agent handler,
and to :data:`TUNNEL_PATH` to the nodes' data connections (:attr:`Coordinator.tunnels`).
With an ``ssl_context`` that port speaks TLS only: ``wss://`` for agents, ``https://`` for
the API and dashboard.

A third listener, on the same host and TLS, is the OpenAI-compatible gateway
(:mod:`coordinator.gateway`): clients' requests to the nodes' services, through the tunnel.

A second, plain-HTTP listener on 127.0.0.1 (:mod:`coordinator.admin`) serves the same API
plus the writes (job submission and cancel), behind a token written to ``admin.json`` in
the state directory. Both listeners and the agents' connections reach jobs through one
:class:`coordinator.job_service.JobService` (:attr:`Coordinator.jobs`), which offers
through the server's open sessions; :meth:`Coordinator.submit` and
:meth:`Coordinator.cancel` are its writes for a caller in the coordinator's own process.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import msgspec
from websockets.asyncio.server import Server, ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.http11 import Request, Response

from agent.protocol.limits import MAX_FRAME_BYTES
from agent.protocol.session import NonceBook
from agent.protocol.tunnel import MAX_STREAMS
from coordinator import api, keys, offers
from coordinator.admin import AdminFile, AdminListener, new_token, write_admin_file
from coordinator.admission import Settings, TokenBucket
from coordinator.api_util import HttpAnswer, HttpRequest, coded_error
from coordinator.artifacts import ArtifactStore, Retained, job_outputs
from coordinator.compression import agent_extensions
from coordinator.connection import AgentSessions, Shared, handle
from coordinator.db import DbTarget
from coordinator.deployments import DEFAULT_GRACE_S, DEFAULT_INTERVAL_S, Deployments
from coordinator.downsample import downsample
from coordinator.gateway.peer import PeerAuth
from coordinator.gateway.server import Gateway, GatewaySettings, Peers
from coordinator.group_commit import GroupCommit
from coordinator.images import ImagePinner
from coordinator.job_service import JobService

if TYPE_CHECKING:
    from coordinator.listener import Listener
from coordinator.presence_store import FORGET_S
from coordinator.retention import Quotas, run_passes
from coordinator.sessions import OpenSessions
from coordinator.store import Store
from coordinator.tunnel import TUNNEL_PATH, Tunnels

__all__ = ["AGENT_PATH", "Coordinator", "Settings", "serve"]

AGENT_PATH = "/agent"

_log = logging.getLogger(__name__)


#: The largest stored output the websocket port serves (from memory); the artifact and
#: admin listeners stream any size from disk.
_MAX_INLINE_OUTPUT = 16 << 20


class Coordinator:
    """A running coordinator: :meth:`start` it, read :attr:`port`, :meth:`stop` it."""

    def __init__(
        self,
        *,
        db_path: DbTarget,
        state_dir: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        settings: Settings | None = None,
        ping_interval_s: float | None = 20.0,
        clock: Callable[[], float] = time.time,
        ssl_context: ssl.SSLContext | None = None,
        admin_port: int = 0,
        pinner: ImagePinner | None = None,
        artifacts_port: int = 0,
        artifact_node_max_bytes: int = 16 << 30,
        artifacts_url: str | None = None,
        tunnel_max_streams: int = MAX_STREAMS,
        deploy_grace_s: float = DEFAULT_GRACE_S,
        deploy_interval_s: float = DEFAULT_INTERVAL_S,
        gateway_port: int = 0,
        gateway_settings: GatewaySettings | None = None,
        peer_url: str = "",
    ) -> None:
        self.host = host
        self.peer_url = peer_url
        """Where the other coordinators on the store reach this one's gateway (empty: they
        do not: the services of the nodes whose tunnel is here are served only here)."""
        self.pinner = pinner or ImagePinner()
        self.ssl_context = ssl_context
        self._requested_port = port
        self.db_path = db_path
        self.state_dir = state_dir
        self.settings = settings or Settings()
        self.key = keys.load_or_create(state_dir)
        self._ping_interval_s = ping_interval_s
        self._clock = clock
        self._server: Server | None = None
        self._shared: Shared | None = None
        self._tunnels: Tunnels | None = None
        self._tunnel_max_streams = tunnel_max_streams
        self._retention: asyncio.Task[None] | None = None
        self._deploy_grace_s = deploy_grace_s
        self._deploy_interval_s = deploy_interval_s
        self._deployments: Deployments | None = None
        self._reconciler: asyncio.Task[None] | None = None
        self.retained = asyncio.Event()
        """Set after each retention pass (cleared by whoever waits for the next one)."""
        self._admin = AdminListener(self._admin_request, port=admin_port)
        # Where nodes PUT outputs: reachable as the websocket port is, under the same TLS.
        self._artifact_listener = AdminListener(
            self._artifact_read,
            host=host,
            port=artifacts_port,
            ssl_context=ssl_context,
            stream=self._artifact_put,
        )
        self._artifact_node_max_bytes = artifact_node_max_bytes
        self._artifacts_public_url = artifacts_url
        self._gateway_port = gateway_port
        self._gateway_settings = gateway_settings
        self._gateway: Gateway | None = None
        self._listener: Listener | None = None
        self.artifacts: ArtifactStore | None = None
        self.admin_token = new_token()
        """The bearer token of the admin API's writes (also in :attr:`admin_file`)."""
        self.admin_file: Path | None = None
        """Where the admin URL and token were written (while started)."""

    @property
    def store(self) -> Store:
        """The open store (only while started)."""
        if self._shared is None:
            raise RuntimeError("the coordinator is not started")
        return self._shared.store

    @property
    def coordinator_id(self) -> str:
        """This coordinator among those on its store (a new one at each start)."""
        return self._started().coordinator_id

    @property
    def tunnels(self) -> Tunnels:
        """The nodes' data connections: streams to their services (only while started)."""
        if self._tunnels is None:
            raise RuntimeError("the coordinator is not started")
        return self._tunnels

    @property
    def gateway(self) -> Gateway:
        """The OpenAI-compatible gateway (only while started)."""
        if self._gateway is None:
            raise RuntimeError("the coordinator is not started")
        return self._gateway

    @property
    def gateway_url(self) -> str:
        """The gateway's base URL, as OpenAI's clients take it: ``http(s)://host:port/v1``."""
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{self._url_host()}:{self.gateway.port}/v1"

    @property
    def jobs(self) -> JobService:
        """The jobs: offers, cancels, what nodes report (only while started)."""
        return self._started().jobs

    @property
    def deployments(self) -> Deployments:
        """Deploy, undeploy, and the reconciler's state (only while started)."""
        if self._deployments is None:
            raise RuntimeError("the coordinator is not started")
        return self._deployments

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

    @property
    def artifacts_url(self) -> str:
        """The artifact listener's base URL, as nodes reach it (as given, or this host's)."""
        if self._artifacts_public_url is not None:
            return self._artifacts_public_url
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{self._url_host()}:{self._artifact_listener.port}"

    @property
    def admin_url(self) -> str:
        """The admin API's base URL: ``http://127.0.0.1:PORT``."""
        return self._admin.url

    def connected(self) -> set[str]:
        """The node ids with an open session now."""
        return set(self._shared.sessions) if self._shared is not None else set()

    async def start(self) -> None:
        """Open the store, start listening, and write the admin file."""
        settings = self.settings
        quotas = Quotas(
            node_bytes=settings.node_quota_bytes,
            unverified_node_bytes=settings.unverified_quota_bytes,
            store_bytes=settings.store_max_bytes,
        )
        # The loop's connection leaves the WAL's checkpoints to the writer's, which commits
        # many times a second under load: the loop never waits for one.
        store = Store(self.db_path, quotas, checkpoints=False)
        try:
            writer = GroupCommit(self.db_path, quotas)
        except BaseException:
            store.close()
            raise
        sessions: AgentSessions = OpenSessions()
        self.artifacts = ArtifactStore(
            self.state_dir,
            job_of=lambda job_id: job_outputs(store.jobs.get(job_id)),
            node_max_bytes=self._artifact_node_max_bytes,
            clock=self._clock,
        )
        self._shared = Shared(
            key=self.key,
            store=store,
            nonces=NonceBook(),
            settings=settings,
            clock=self._clock,
            monotonic=time.monotonic,
            new_keys=TokenBucket(
                settings.new_keys_per_s, settings.new_keys_burst, time.monotonic()
            ),
            sessions=sessions,
            writer=writer,
            jobs=JobService(
                store,
                self.key,
                sessions,
                self._clock,
                self.pinner,
                artifacts=self.artifacts,
                artifacts_url=lambda: self.artifacts_url,
            ),
        )
        shared = self._shared
        self._tunnels = Tunnels(
            shared,
            max_streams=self._tunnel_max_streams,
            on_link=self._tunnel_moved if store.shared else None,
        )
        self._deployments = Deployments(
            store,
            self._shared.jobs,
            self.key,
            # Several coordinators on the store: the lead's reconciler, over all their nodes.
            (lambda: store.presence.connected(self._clock())) if store.shared else self.connected,
            self._clock,
            pinner=self.pinner,
            grace_s=self._deploy_grace_s,
            interval_s=self._deploy_interval_s,
            leads=store.presence.lead,
        )
        try:
            self._server = await ws_serve(
                self._handler,
                self.host,
                self._requested_port,
                process_request=self._process_request,
                max_size=MAX_FRAME_BYTES,
                # Deflate negotiated, but acks and other small messages sent uncompressed.
                compression=None,
                extensions=agent_extensions(),
                # At most a few frames buffered per agent: with 1 MiB frames the default
                # (16) lets each connection hold 16 MiB of a hostile peer's data.
                max_queue=4,
                # 10,000 agents reconnecting after a restart: a SYN dropped from a full
                # accept queue is retried only 1 s, 3 s, 7 s... later (asyncio's default: 100).
                backlog=4096,
                ping_interval=self._ping_interval_s,
                ping_timeout=self._ping_interval_s,
                ssl=self.ssl_context,
            )
            if isinstance(self.db_path, str):  # PostgreSQL: others may share the store
                from coordinator.listener import Listener  # psycopg: the postgres extra

                self._listener = Listener(
                    self.db_path,
                    shared.coordinator_id,
                    shared.sessions,
                    alive=lambda: store.presence.alive(
                        shared.coordinator_id, self._clock(), self.peer_url
                    ),
                )
                await self._listener.start()
            await self._admin.start()
            await self._artifact_listener.start()
            self._gateway = Gateway(
                store,
                self._tunnels,
                host=self.host,
                port=self._gateway_port,
                ssl_context=self.ssl_context,
                settings=self._gateway_settings,
                peers=self._peers(store, shared.coordinator_id) if store.shared else None,
                clock=self._clock,
            )
            await self._gateway.start()
            if settings.retention_interval_s > 0:
                self._retention = asyncio.create_task(self._retain())
            self._reconciler = asyncio.create_task(self._deployments.run())
            admin = AdminFile(url=self._admin.url, token=self.admin_token)
            self.admin_file = write_admin_file(self.state_dir, admin)
        except BaseException:
            await self.stop()
            raise

    def _peers(self, store: Store, coordinator_id: str) -> Peers:
        """The other coordinators on the store, for the gateway."""
        return Peers(
            auth=PeerAuth(self.key, self._clock),
            elsewhere=lambda: store.presence.peer_tunnels(coordinator_id, self._clock()),
        )

    def _tunnel_moved(self, node_id: str, here: bool) -> None:
        """Tell the store that a node's data connection is up here, or gone."""
        shared = self._started()
        coordinator_id, now = shared.coordinator_id, self._clock()
        if here:
            shared.writer.submit(lambda s: s.presence.tunnel_opened(node_id, coordinator_id, now))
        else:
            shared.writer.submit(lambda s: s.presence.tunnel_closed(node_id, coordinator_id))

    async def stop(self) -> None:
        """Close every connection (1001, going away), stop listening, close the store."""
        for task in (self._retention, self._reconciler):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._retention = self._reconciler = self._deployments = None
        if self._listener is not None:
            await self._listener.stop()
            self._listener = None
        if self._gateway is not None:
            await self._gateway.stop()
            self._gateway = None
        await self._admin.stop()
        await self._artifact_listener.stop()
        if self.artifacts is not None:
            self.artifacts.close()
            self.artifacts = None
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self._tunnels = None
        if self._shared is not None:
            self._shared.writer.close()  # what sessions queued is stored first
            self._shared.store.close()
            self._shared = None

    async def submit(
        self,
        node_id: str,
        spec: dict[str, Any],
        *,
        job_id: str | None = None,
        ttl_s: float = offers.DEFAULT_TTL_S,
        uploads: dict[str, Any] | None = None,
        registry_logins: dict[str, Any] | None = None,
    ) -> str:
        """:meth:`JobService.submit`: sign an offer, store it, send it; returns the job id."""
        return await self.jobs.submit(
            node_id,
            spec,
            job_id=job_id,
            ttl_s=ttl_s,
            uploads=uploads,
            registry_logins=registry_logins,
        )

    async def cancel(self, job_id: str, reason: str = "") -> None:
        """:meth:`JobService.cancel`: ask the job's node to stop it."""
        await self.jobs.cancel(job_id, reason)

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

    def prune(self) -> int:
        """Delete the telemetry past its retention now; returns how many rows went."""
        settings = self.settings
        before = self._clock() - settings.telemetry_keep_s
        store = self._started().store
        if deleted := store.retention.prune_telemetry(before, settings.telemetry_keep_rows):
            _log.info("retention: %d telemetry row(s) deleted", deleted)
        return deleted

    async def downsample(self) -> int:
        """Fold the raw telemetry past its window into per-minute aggregates now (on a
        thread: :mod:`coordinator.downsample`); returns how many raw rows were folded."""
        settings, now = self.settings, self._clock()
        folded = await asyncio.to_thread(
            downsample,
            self.db_path,
            now - settings.telemetry_raw_s,
            now - settings.telemetry_keep_s,
        )
        if folded:
            _log.info("retention: %d raw telemetry row(s) folded into minutes", folded)
        return folded

    def expire_outputs(self) -> Retained:
        """Remove the stored outputs past their retention now (:meth:`ArtifactStore.retain`)."""
        assert self.artifacts is not None  # made with the store
        settings = self.settings
        return self.artifacts.retain(
            self._started().store.jobs.get,
            before=self._clock() - settings.artifacts_keep_s,
            max_bytes=settings.artifacts_max_bytes,
        )

    async def _retain(self) -> None:
        """Prune and expire at start, then every retention interval, until stopped. Of the
        coordinators sharing a store, the one that leads runs the store's passes (each
        would repeat the others' work); every one expires its own outputs."""
        store = self._started().store
        leads = store.presence.lead
        passes = (
            ("telemetry", lambda: self.prune() if leads() else 0),
            ("downsample", lambda: self.downsample() if leads() else 0),
            ("coordinators", lambda: store.shared and leads() and self._forget_coordinators()),
            ("outputs", self.expire_outputs),
        )
        await run_passes(passes, self.settings.retention_interval_s, self.retained)

    def _forget_coordinators(self) -> int:
        """Forget the coordinators on the store not alive for :data:`FORGET_S`."""
        return self._started().store.presence.forget_dead(self._clock() - FORGET_S)

    def _started(self) -> Shared:
        if self._shared is None:
            raise RuntimeError("the coordinator is not started")
        return self._shared

    async def _handler(self, ws: ServerConnection) -> None:
        if ws.request is not None and _path(ws.request) == TUNNEL_PATH:
            await self.tunnels.handle(ws)
            return
        await handle(ws, self._started())

    async def _admin_request(self, request: HttpRequest) -> HttpAnswer:
        return await api.admin_route(
            request,
            token=self.admin_token,
            store=self.store,
            connected=self.connected(),
            jobs=self.jobs,
            deployments=self.deployments,
        )

    async def _artifact_put(self, request: HttpRequest, reader: asyncio.StreamReader) -> HttpAnswer:
        assert self.artifacts is not None  # the listener runs only while started
        return await self.artifacts.receive(request, reader)

    async def _artifact_read(self, request: HttpRequest) -> HttpAnswer:
        """The artifact listener's other requests: the read API, as on the main port."""
        return api.route(request.method, request.target, self.store, self.jobs, self.connected())

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if _path(request) in (AGENT_PATH, TUNNEL_PATH):
            return None  # the websocket handshake goes on (426 if it is not an upgrade)
        answer = api.route(request.method, request.path, self.store, self.jobs, self.connected())
        if answer.file is not None:
            # The websocket server answers from memory: a stored output is served in full
            # only up to a bound here, and from disk, streamed, by the other listeners.
            path, size = answer.file
            if size > _MAX_INLINE_OUTPUT:
                answer = coded_error(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    "output_too_large",
                    f"over {_MAX_INLINE_OUTPUT} bytes: GET it from the artifact or admin port",
                )
            else:
                answer = msgspec.structs.replace(answer, body=Path(path).read_bytes(), file=None)
        response = connection.respond(answer.status, "")
        response.body = answer.body
        del response.headers["Content-Length"], response.headers["Content-Type"]
        response.headers["Content-Length"] = str(len(answer.body))
        response.headers["Content-Type"] = answer.content_type
        response.headers["Cache-Control"] = "no-store"
        for name, value in answer.headers:
            response.headers[name] = value
        return response

    def _url_host(self) -> str:
        host = self.host or "127.0.0.1"
        if host in ("0.0.0.0", "::"):  # a wildcard is not an address to browse to
            host = "127.0.0.1" if host == "0.0.0.0" else "::1"
        return f"[{host}]" if ":" in host else host


def _path(request: Request) -> str:
    return request.path.split("?", 1)[0]


async def serve(
    host: str,
    port: int,
    db_path: DbTarget,
    state_dir: Path,
    *,
    settings: Settings | None = None,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[Coordinator], None] | None = None,
    ssl_context: ssl.SSLContext | None = None,
    admin_port: int = 0,
    pinner: ImagePinner | None = None,
    artifacts_port: int = 0,
    artifacts_url: str | None = None,
    deploy_grace_s: float = DEFAULT_GRACE_S,
    gateway_port: int = 0,
    peer_url: str = "",
) -> None:
    """Run a coordinator until ``stop`` is set (or the task is cancelled)."""
    coordinator = Coordinator(
        db_path=db_path,
        state_dir=state_dir,
        host=host,
        port=port,
        settings=settings,
        ssl_context=ssl_context,
        admin_port=admin_port,
        pinner=pinner,
        artifacts_port=artifacts_port,
        artifacts_url=artifacts_url,
        deploy_grace_s=deploy_grace_s,
        gateway_port=gateway_port,
        peer_url=peer_url,
    )
    async with coordinator:
        if on_ready is not None:
            on_ready(coordinator)
        await (stop or asyncio.Event()).wait()
