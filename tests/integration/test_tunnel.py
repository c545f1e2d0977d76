"""The tunnel end to end: the real coordinator on 127.0.0.1:0, the agent's ServiceTunnel,
a plain HTTP server on loopback as the service; real sockets throughout."""

from __future__ import annotations

import asyncio
import os
import ssl
import sys
from collections.abc import AsyncIterator
from http import HTTPStatus
from pathlib import Path

import pytest
from support.coordinator_peer import Peer, connected
from support.tls import make_server_tls
from support.tunnel_target import Target, exchange, pattern, request
from support.tunnel_world import (
    make_tunnel,
    pinned,
    register,
    running_coordinator,
    running_node,
    running_target,
    until,
)
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response

from agent.link.identity import Identity, load_or_create
from agent.protocol import crypto
from agent.protocol.messages import TelemetryBody
from agent.protocol.tunnel import STREAM_WINDOW
from agent.services.tunnel import _HIGH_WATER, _QUEUE_BUDGET, ServiceTunnel, tunnel_url
from coordinator.server import Coordinator
from coordinator.tunnel import StreamError

_TESTS = Path(__file__).resolve().parents[1]


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


async def test_a_request_and_its_response_pass_byte_exact(
    coordinator: Coordinator, target: Target, node: ServiceTunnel
) -> None:
    # Bigger than a stream's window both ways: flow control has to turn.
    body = pattern(3 * STREAM_WINDOW + 17, seed=5)
    sent = request("POST", "/echo", body)
    stream = coordinator.tunnels.open(node.identity.node_id, "web")
    answer = await exchange(stream, sent)
    assert answer == await target.direct(sent)
    assert answer.endswith(body)
    await until(lambda: coordinator.tunnels.open_streams(node.identity.node_id) == 0, "closed")


async def test_200_concurrent_streams_each_get_their_own_answer(
    coordinator: Coordinator, target: Target, node: ServiceTunnel
) -> None:
    node_id = node.identity.node_id

    async def one(i: int) -> None:
        path = f"/bytes/{1000 + 997 * i}"
        answer = await exchange(coordinator.tunnels.open(node_id, "web"), request("GET", path))
        assert answer.endswith(pattern(1000 + 997 * i, seed=len(path)))

    await asyncio.gather(*(one(i) for i in range(200)))
    assert target.accepted == 200
    assert target.open_max > 1
    # Each stream, over both ways and read out, is forgotten on both sides.
    await until(lambda: coordinator.tunnels.open_streams(node_id) == 0, "streams forgotten")
    assert node.open_streams == 0


async def test_a_token_stream_passes_chunk_by_chunk(
    coordinator: Coordinator, target: Target, node: ServiceTunnel
) -> None:
    stream = coordinator.tunnels.open(node.identity.node_id, "web")
    await stream.write(request("GET", "/events"))
    assert (await stream.read()).startswith(b"HTTP/1.1 200 OK")
    for n in range(5):
        # The next token is written only once the client has read this one: nothing waits
        # for a buffer to fill on the way.
        event = b"data: token %d\n\n" % n
        target.events.put_nowait(event)
        assert await stream.read() == event
    target.events.put_nowait(None)
    assert await stream.read() == b""


async def test_a_service_that_resets_its_connection_resets_the_stream_target_error(
    coordinator: Coordinator, node: ServiceTunnel
) -> None:
    stream = coordinator.tunnels.open(node.identity.node_id, "web")
    await stream.write(request("GET", "/reset"))
    received: list[bytes] = []

    async def drain() -> None:
        while chunk := await stream.read():
            received.append(chunk)

    with pytest.raises(StreamError) as failed:
        await drain()
    assert failed.value.code == "target_error"
    assert b"HTTP/1.1 200 OK\r\n".startswith(b"".join(received))


async def test_a_newer_data_connection_of_the_node_takes_over(
    coordinator: Coordinator, target: Target, node: ServiceTunnel
) -> None:
    node_id = node.identity.node_id
    held = coordinator.tunnels.open(node_id, "web")
    await held.write(request("GET", "/hold"))
    assert (await held.read()).startswith(b"HTTP/1.1 200 OK")
    newer = make_tunnel(coordinator, node.identity, target)
    newer.start()
    try:
        with pytest.raises(StreamError) as failed:
            await held.read()
        assert failed.value.code == "connection_lost"
        await until(newer.connected.is_set, "the newer connection")
        answer = await exchange(
            coordinator.tunnels.open(node_id, "web"), request("GET", "/bytes/9")
        )
        assert answer.endswith(pattern(9, seed=len("/bytes/9")))
    finally:
        await newer.stop()


async def test_over_tls_the_tunnel_serves_and_another_certificate_is_refused(
    tmp_path: Path, target: Target
) -> None:
    tls = make_server_tls(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(tls.cert_file, tls.key_file)
    async with Coordinator(
        db_path=tmp_path / "c.db", state_dir=tmp_path / "state", ssl_context=server_context
    ) as coordinator:
        assert coordinator.url.startswith("wss://")
        identity = Identity.from_private_key(crypto.generate_private_key())
        register(coordinator, identity)
        for trusted in (False, True):
            tunnel = make_tunnel(coordinator, identity, target)
            # The system's CAs do not know the test's: a man in the middle, as far as the
            # node can tell.
            tunnel.ssl_context = ssl.create_default_context(
                cafile=str(tls.ca_file) if trusted else None
            )
            tunnel.start()
            try:
                if not trusted:
                    await until(lambda t=tunnel: t.last_error is not None, "a refusal")  # type: ignore[misc]
                    assert tunnel.last_error == "unreachable"
                    assert coordinator.tunnels.connected() == set()
                    continue
                await until(lambda: identity.node_id in coordinator.tunnels.connected(), "tls")
                stream = coordinator.tunnels.open(identity.node_id, "web")
                answer = await exchange(stream, request("GET", "/bytes/7"))
                assert answer.endswith(pattern(7, seed=len("/bytes/7")))
            finally:
                await tunnel.stop()


async def test_the_data_connection_offers_no_compression(
    coordinator: Coordinator, target: Target
) -> None:
    offered: list[str | None] = []

    def refuse(connection: ServerConnection, request: Request) -> Response:
        offered.append(request.headers.get("Sec-WebSocket-Extensions"))
        return connection.respond(HTTPStatus.FORBIDDEN, "")

    async with serve(lambda ws: ws.close(), "127.0.0.1", 0, process_request=refuse) as server:
        port = server.sockets[0].getsockname()[1] if server.sockets else 0
        tunnel = ServiceTunnel(
            url=f"ws://127.0.0.1:{port}/tunnel",
            identity=Identity.from_private_key(crypto.generate_private_key()),
            pinned_keys=pinned(coordinator),
            resolve=lambda name: asyncio.sleep(0, None),
        )
        tunnel.start()
        try:
            await until(lambda: bool(offered), "a connection attempt")
        finally:
            await tunnel.stop()
    # permessage-deflate would cost CPU, and leak secrets by length beside chosen bytes.
    assert offered == [None]


async def test_a_slow_reader_stalls_neither_another_stream_nor_the_control_link(
    coordinator: Coordinator, target: Target, tmp_path: Path
) -> None:
    peer = Peer()
    identity = Identity.from_private_key(peer.key)
    async with connected(coordinator.url, pinned(coordinator), peer) as link:
        tunnel = make_tunnel(coordinator, identity, target)
        tunnel.start()
        try:
            await until(lambda: peer.node_id in coordinator.tunnels.connected(), "the tunnel")
            slow = coordinator.tunnels.open(peer.node_id, "web")
            await slow.write(request("GET", "/bytes/100000000"))
            assert await slow.read(100)
            await until(lambda: slow.unread >= STREAM_WINDOW - 100, "the slow stream's window")
            # Another stream moves megabytes both ways meanwhile...
            body = pattern(4 << 20, seed=9)
            fast = coordinator.tunnels.open(peer.node_id, "web")
            assert (await exchange(fast, request("POST", "/echo", body))).endswith(body)
            # ...and the control link's messages are stored and acknowledged.
            for _ in range(3):
                await link.send(TelemetryBody(samples=[]))
            assert slow.unread <= STREAM_WINDOW
            assert slow.reset_code is None
            slow.reset()
        finally:
            await tunnel.stop()
    assert coordinator.store.nodes.all_seqs(peer.node_id) == [1, 2, 3]


async def test_a_client_gone_cancels_the_stream_and_the_service_sees_it_closed(
    coordinator: Coordinator, target: Target, node: ServiceTunnel
) -> None:
    async with coordinator.tunnels.open(node.identity.node_id, "web") as stream:
        await stream.write(request("GET", "/hold"))
        assert (await stream.read()).startswith(b"HTTP/1.1 200 OK")
    # Leaving the block before the end is the client going away: reset `cancel`.
    assert stream.reset_code == "cancel"
    async with asyncio.timeout(10):
        await target.held_closed.get()
    await until(lambda: node.open_streams == 0, "the agent to drop the stream")


async def test_stopping_the_tunnel_closes_its_services_connections_and_fails_its_streams(
    coordinator: Coordinator, target: Target, node: ServiceTunnel
) -> None:
    stream = coordinator.tunnels.open(node.identity.node_id, "web")
    await stream.write(request("GET", "/hold"))
    assert (await stream.read()).startswith(b"HTTP/1.1 200 OK")
    await node.stop()
    async with asyncio.timeout(10):
        await target.held_closed.get()
    with pytest.raises(StreamError) as failed:
        await stream.read()
    assert failed.value.code == "connection_lost"
    assert not node.connected.is_set()
    node.start()  # and it comes back when started again
    await until(lambda: node.identity.node_id in coordinator.tunnels.connected(), "again")


@pytest.mark.parametrize(
    ("name", "code"), [("nope", "unknown_target"), ("closed", "connect_failed")]
)
async def test_a_target_the_node_cannot_reach_resets_the_stream_with_a_code(
    coordinator: Coordinator, node: ServiceTunnel, name: str, code: str
) -> None:
    stream = coordinator.tunnels.open(node.identity.node_id, name)
    with pytest.raises(StreamError) as refused:
        await stream.read()
    assert refused.value.code == code
    with pytest.raises(StreamError):
        await stream.write(b"x")


async def test_a_node_without_a_data_connection_is_a_coded_error(
    coordinator: Coordinator,
) -> None:
    with pytest.raises(StreamError) as refused:
        coordinator.tunnels.open("node-aaaaaaaaaaaaaaaaaaaaaaaaaa", "web")
    assert refused.value.code == "no_tunnel"


async def test_the_agent_killed_fails_its_open_streams_at_once_with_a_code(
    coordinator: Coordinator, target: Target, tmp_path: Path
) -> None:
    identity = load_or_create(tmp_path / "identity")
    register(coordinator, identity)
    key = coordinator.key
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "support.tunnel_agent",
        tunnel_url(coordinator.url),
        str(tmp_path / "identity"),
        key.key_id,
        crypto.b64encode(key.public_key),
        str(target.port),
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(_TESTS), str(_TESTS.parent)])},
    )
    try:
        await until(lambda: identity.node_id in coordinator.tunnels.connected(), "the tunnel")
        stream = coordinator.tunnels.open(identity.node_id, "web")
        await stream.write(request("GET", "/hold"))
        assert (await stream.read()).startswith(b"HTTP/1.1 200 OK")
    finally:
        process.kill()
        await process.wait()
    with pytest.raises(StreamError) as failed:
        async with asyncio.timeout(10):  # a hang would be the bug
            await stream.read()
    assert failed.value.code == "connection_lost"
    assert coordinator.tunnels.connected() == set()


# ------------------------------------------------------------------ read-ahead
# How far ahead the agent reads a service whose stream's reader waits (docs/protocol.md,
# "Flow control"): a lone stream keeps reading while the connection's queue is short, so a
# bulk answer's reads are not paused and resumed one by one; the queue stays bounded.

#: asyncio's largest read of a socket: what one read may add past a bound.
_READ = 256 * 1024


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
