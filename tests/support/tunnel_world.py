"""The pieces of the tunnel's integration tests: the real coordinator, the HTTP service,
a node's ServiceTunnel, and a bare agent handshake for a hostile peer."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from websockets.asyncio.client import ClientConnection

from agent.link.identity import Identity
from agent.protocol import crypto
from agent.protocol.messages import decode_frame, encode_frame, require_text
from agent.protocol.session import AgentHandshake, HandshakeState
from agent.services.tunnel import ServiceTunnel, tunnel_url
from coordinator.admission import Settings
from coordinator.server import Coordinator
from support.processes import free_port
from support.tunnel_target import Target

__all__ = [
    "agent_handshake",
    "make_tunnel",
    "pinned",
    "register",
    "running_coordinator",
    "running_node",
    "running_target",
    "until",
]


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    """Wait for a condition nothing signals (a count in another component)."""
    try:
        async with asyncio.timeout(timeout_s):
            while not condition():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


@asynccontextmanager
async def running_coordinator(tmp_path: Path) -> AsyncIterator[Coordinator]:
    """The coordinator on 127.0.0.1:0, whose side may open past the agent's cap."""
    server = Coordinator(
        db_path=tmp_path / "coordinator.db",
        state_dir=tmp_path / "state",
        settings=Settings(handshake_timeout_s=5.0),
        tunnel_max_streams=20_000,
    )
    async with server:
        yield server


@asynccontextmanager
async def running_target() -> AsyncIterator[Target]:
    """The HTTP service on 127.0.0.1:0."""
    server = Target()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def pinned(coordinator: Coordinator) -> dict[str, bytes]:
    """The coordinator's key, as a node pins it."""
    return {coordinator.key.key_id: coordinator.key.public_key}


def register(coordinator: Coordinator, identity: Identity) -> None:
    """The node as the store knows it after its first control session."""
    coordinator.store.nodes.seen(identity.node_id, identity.public_key_b64, time.time())


def make_tunnel(coordinator: Coordinator, identity: Identity, target: Target) -> ServiceTunnel:
    """A node's tunnel (not started) serving ``web`` (the target) and ``closed`` (a port
    nothing listens on), with a short backoff."""
    closed = free_port()

    async def resolve(name: str) -> tuple[str, int] | None:
        return {"web": ("127.0.0.1", target.port), "closed": ("127.0.0.1", closed)}.get(name)

    return ServiceTunnel(
        url=tunnel_url(coordinator.url),
        identity=identity,
        pinned_keys=pinned(coordinator),
        resolve=resolve,
        backoff_initial_s=0.05,
        backoff_max_s=0.2,
    )


@asynccontextmanager
async def running_node(coordinator: Coordinator, target: Target) -> AsyncIterator[ServiceTunnel]:
    """A registered node whose tunnel is connected."""
    identity = Identity.from_private_key(crypto.generate_private_key())
    register(coordinator, identity)
    tunnel = make_tunnel(coordinator, identity, target)
    tunnel.start()
    try:
        await until(lambda: identity.node_id in coordinator.tunnels.connected(), "the tunnel")
        yield tunnel
    finally:
        await tunnel.stop()


async def agent_handshake(
    ws: ClientConnection, coordinator: Coordinator, identity: Identity
) -> None:
    """The agent's side of the handshake on a bare websocket, up to ``welcome``."""
    hs = AgentHandshake(
        node_id=identity.node_id,
        public_key=identity.public_key,
        sign=lambda data: crypto.sign(identity.private_key, data),
        verify=crypto.verify,
        pinned_keys=pinned(coordinator),
        agent_version="0",
        nonce=crypto.b64encode(os.urandom(32)),
        last_coordinator_seq=0,
        now=time.monotonic(),
    )
    while hs.state is not HandshakeState.OPEN:
        for message in hs.messages_to_send():
            await ws.send(encode_frame(message))
        hs.receive(decode_frame(require_text(await ws.recv())), time.monotonic())
