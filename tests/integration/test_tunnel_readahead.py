"""How far ahead the agent reads a service whose stream's reader waits (docs/protocol.md,
"Flow control"): a lone stream keeps reading while the connection's queue is short, so a
bulk answer's reads are not paused and resumed one by one; the queue stays bounded."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support.tunnel_target import Target, request
from support.tunnel_world import running_coordinator, running_node, running_target, until

from agent.services.tunnel import _HIGH_WATER, _QUEUE_BUDGET, ServiceTunnel
from coordinator.server import Coordinator

#: asyncio's largest read of a socket: what one read may add past a bound.
_READ = 256 * 1024


@pytest.fixture
async def coordinator(tmp_path: Path) -> AsyncIterator[Coordinator]:
    async with running_coordinator(tmp_path) as server:
        yield server


@pytest.fixture
async def target() -> AsyncIterator[Target]:
    async with running_target() as server:
        yield server


@pytest.fixture
async def node(coordinator: Coordinator, target: Target) -> AsyncIterator[ServiceTunnel]:
    async with running_node(coordinator, target) as tunnel:
        yield tunnel


def _queued(node: ServiceTunnel) -> int:
    session = node._session
    return session.mux.queued if session is not None else 0


def _paused(node: ServiceTunnel) -> bool:
    """Whether the agent stopped reading the (one) stream's service."""
    session = node._session
    assert session is not None
    return any(p.conn is not None and p.conn.paused for p in session.pipes.values())


async def test_a_lone_stream_reads_its_service_ahead_up_to_the_queue_budget(
    coordinator: Coordinator, node: ServiceTunnel
) -> None:
    stream = coordinator.tunnels.open(node.identity.node_id, "web")
    await stream.write(request("GET", f"/bytes/{8 << 20}"))
    await stream.write_eof()
    # Nothing is read here: past the stream's window the agent queues what it reads, well
    # past one stream's high-water mark (it used to pause there, at each read), then stops
    # (the service feels the backpressure) once the queue is over the budget.
    await until(lambda: _paused(node), "the agent to stop reading the service")
    queued = _queued(node)
    assert queued > _HIGH_WATER + _READ
    assert _QUEUE_BUDGET <= queued <= _QUEUE_BUDGET + _READ
    received = 0
    while data := await stream.read(1 << 20):
        received += len(data)
    assert received > 8 << 20
