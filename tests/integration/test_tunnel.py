"""The tunnel end to end: the real coordinator on 127.0.0.1:0, the agent's ServiceTunnel,
a plain HTTP server on loopback as the service; real sockets throughout."""

from __future__ import annotations

import asyncio
import os
import ssl
import sys
import time
from collections.abc import AsyncIterator, Callable
from http import HTTPStatus
from pathlib import Path

import pytest
from support.coordinator_peer import Peer, connected
from support.processes import free_port
from support.tls import make_server_tls
from support.tunnel_target import Target, exchange, pattern, request
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from agent.link.identity import Identity, load_or_create
from agent.protocol import crypto
from agent.protocol.messages import TelemetryBody, decode_frame, encode_frame, require_text
from agent.protocol.session import AgentHandshake, HandshakeState
from agent.protocol.tunnel import STREAM_WINDOW
from agent.protocol.tunnel_frames import encode_data, encode_window
from agent.services.tunnel import ServiceTunnel, tunnel_url
from coordinator.admission import Settings
from coordinator.server import Coordinator
from coordinator.tunnel import StreamError

_TESTS = Path(__file__).resolve().parents[1]


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    """Wait for a condition nothing signals (a count in another component)."""
    try:
        async with asyncio.timeout(timeout_s):
            while not condition():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


@pytest.fixture
async def coordinator(tmp_path: Path) -> AsyncIterator[Coordinator]:
    server = Coordinator(
        db_path=tmp_path / "coordinator.db",
        state_dir=tmp_path / "state",
        settings=Settings(handshake_timeout_s=5.0),
        tunnel_max_streams=20_000,  # a coordinator side that opens past the agent's cap
    )
    async with server:
        yield server


@pytest.fixture
async def target() -> AsyncIterator[Target]:
    server = Target()
    await server.start()
    yield server
    await server.stop()


def _pinned(coordinator: Coordinator) -> dict[str, bytes]:
    return {coordinator.key.key_id: coordinator.key.public_key}


def _register(coordinator: Coordinator, identity: Identity) -> None:
    """The node as the store knows it after its first control session."""
    coordinator.store.nodes.seen(identity.node_id, identity.public_key_b64, time.time())


def _tunnel(coordinator: Coordinator, identity: Identity, target: Target) -> ServiceTunnel:
    closed = free_port()

    async def resolve(name: str) -> tuple[str, int] | None:
        return {"web": ("127.0.0.1", target.port), "closed": ("127.0.0.1", closed)}.get(name)

    return ServiceTunnel(
        url=tunnel_url(coordinator.url),
        identity=identity,
        pinned_keys=_pinned(coordinator),
        resolve=resolve,
        backoff_initial_s=0.05,
        backoff_max_s=0.2,
    )


@pytest.fixture
async def node(coordinator: Coordinator, target: Target) -> AsyncIterator[ServiceTunnel]:
    identity = Identity.from_private_key(crypto.generate_private_key())
    _register(coordinator, identity)
    tunnel = _tunnel(coordinator, identity, target)
    tunnel.start()
    await until(lambda: identity.node_id in coordinator.tunnels.connected(), "the tunnel")
    yield tunnel
    await tunnel.stop()


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
    newer = _tunnel(coordinator, node.identity, target)
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
        _register(coordinator, identity)
        for trusted in (False, True):
            tunnel = _tunnel(coordinator, identity, target)
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


async def test_a_silent_older_connection_does_not_hold_up_the_newer_one(
    coordinator: Coordinator, target: Target
) -> None:
    identity = Identity.from_private_key(crypto.generate_private_key())
    _register(coordinator, identity)
    async with connect(tunnel_url(coordinator.url)) as silent:
        await _handshake(silent, coordinator, identity)
        await until(lambda: identity.node_id in coordinator.tunnels.connected(), "the tunnel")
        older = coordinator.tunnels._links[identity.node_id]
        silent.transport.pause_reading()  # it will not answer the closing handshake
        newer = _tunnel(coordinator, identity, target)
        newer.start()
        try:
            await until(newer.connected.is_set, "the newer connection")
            stream = coordinator.tunnels.open(identity.node_id, "web")
            answer = await exchange(stream, request("GET", "/bytes/6"))
            assert answer.endswith(pattern(6, seed=len("/bytes/6")))
            # Served while the older one still waits for its closing handshake.
            assert older.ws.state is State.CLOSING
        finally:
            await newer.stop()
            silent.transport.resume_reading()


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
            pinned_keys=_pinned(coordinator),
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
    async with connected(coordinator.url, _pinned(coordinator), peer) as link:
        tunnel = _tunnel(coordinator, identity, target)
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


async def test_a_connection_whose_stream_ids_are_used_up_is_replaced(
    coordinator: Coordinator, target: Target, node: ServiceTunnel
) -> None:
    node_id = node.identity.node_id
    link = coordinator.tunnels._links[node_id]
    link.mux._next_id = 2**31 - 1  # as after 2^30 opens
    last = coordinator.tunnels.open(node_id, "web")
    assert last.stream_id == 2**31 - 1
    with pytest.raises(StreamError) as refused:
        coordinator.tunnels.open(node_id, "web")
    assert refused.value.code == "ids_exhausted"
    # The coordinator closes the connection; the node opens a new one, with new ids.
    await until(lambda: coordinator.tunnels._links.get(node_id) not in (None, link), "anew")
    answer = await exchange(coordinator.tunnels.open(node_id, "web"), request("GET", "/bytes/4"))
    assert answer.endswith(pattern(4, seed=len("/bytes/4")))


async def test_a_node_without_a_data_connection_is_a_coded_error(
    coordinator: Coordinator,
) -> None:
    with pytest.raises(StreamError) as refused:
        coordinator.tunnels.open("node-aaaaaaaaaaaaaaaaaaaaaaaaaa", "web")
    assert refused.value.code == "no_tunnel"


async def test_a_node_the_store_does_not_know_gets_no_data_connection(
    coordinator: Coordinator, target: Target
) -> None:
    identity = Identity.from_private_key(crypto.generate_private_key())
    tunnel = _tunnel(coordinator, identity, target)
    tunnel.start()
    try:
        await until(lambda: tunnel.last_error is not None, "a refusal")
        assert tunnel.last_error == "handshake_refused"
        assert coordinator.tunnels.connected() == set()
    finally:
        await tunnel.stop()


async def test_the_agent_killed_fails_its_open_streams_at_once_with_a_code(
    coordinator: Coordinator, target: Target, tmp_path: Path
) -> None:
    identity = load_or_create(tmp_path / "identity")
    _register(coordinator, identity)
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


async def test_ten_thousand_opens_are_capped_by_the_agent(
    coordinator: Coordinator, target: Target, node: ServiceTunnel
) -> None:
    node_id = node.identity.node_id
    streams = []
    for _ in range(100):
        streams += [coordinator.tunnels.open(node_id, "web") for _ in range(100)]
        await asyncio.sleep(0)  # the writer sends them in many messages
    await until(
        lambda: (
            sum(s.reset_code == "too_many_streams" for s in streams) == 10_000 - node.max_streams
        ),
        "the opens past the cap refused",
    )
    assert node.open_streams == node.max_streams
    await until(lambda: target.accepted == node.max_streams, "the accepted ones connected")
    assert target.open_max == node.max_streams
    for stream in streams:
        stream.reset()
    await until(lambda: target.open_now == 0 and node.open_streams == 0, "all closed")
    # The node serves on.
    answer = await exchange(coordinator.tunnels.open(node_id, "web"), request("GET", "/bytes/5"))
    assert answer.endswith(pattern(5, seed=len("/bytes/5")))


async def test_ten_thousand_opens_in_one_message_close_the_connection_as_a_flood(
    coordinator: Coordinator, target: Target, node: ServiceTunnel
) -> None:
    node_id = node.identity.node_id
    streams = [coordinator.tunnels.open(node_id, "web") for _ in range(10_000)]
    await until(lambda: node.last_error == "flood", "the agent to refuse the flood")
    await until(lambda: all(s.reset_code == "connection_lost" for s in streams), "resets")
    # It reconnects, and serves.
    await until(lambda: node_id in coordinator.tunnels.connected(), "the tunnel again")
    answer = await exchange(coordinator.tunnels.open(node_id, "web"), request("GET", "/bytes/5"))
    assert answer.endswith(pattern(5, seed=len("/bytes/5")))


# -- a hostile agent ------------------------------------------------------------------------


async def _handshake(ws: ClientConnection, coordinator: Coordinator, identity: Identity) -> None:
    hs = AgentHandshake(
        node_id=identity.node_id,
        public_key=identity.public_key,
        sign=lambda data: crypto.sign(identity.private_key, data),
        verify=crypto.verify,
        pinned_keys=_pinned(coordinator),
        agent_version="0",
        nonce=crypto.b64encode(os.urandom(32)),
        last_coordinator_seq=0,
        now=time.monotonic(),
    )
    while hs.state is not HandshakeState.OPEN:
        for message in hs.messages_to_send():
            await ws.send(encode_frame(message))
        hs.receive(decode_frame(require_text(await ws.recv())), time.monotonic())


@pytest.mark.parametrize(
    ("garbage", "code"),
    [
        (b"\xff" * 40, "frame_too_large"),
        (b"\x09" + bytes(8), "unknown_frame"),
        (b"\x02\x00", "bad_frame"),
        ("a text message", "bad_frame"),
        (encode_data(2, b"x"), "unknown_stream"),
        (encode_window(0, 2**31 - 1), "window_overflow"),
    ],
)
async def test_a_hostile_agent_is_closed_with_a_code_and_the_coordinator_serves_on(
    coordinator: Coordinator, target: Target, garbage: bytes | str, code: str
) -> None:
    identity = Identity.from_private_key(crypto.generate_private_key())
    _register(coordinator, identity)
    url = tunnel_url(coordinator.url)
    async with connect(url) as ws:
        await _handshake(ws, coordinator, identity)
        await until(lambda: identity.node_id in coordinator.tunnels.connected(), "the tunnel")
        await ws.send(garbage)
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(10):
                await ws.recv()
        assert ws.close_code == 1008
        assert ws.close_reason == code
    await until(lambda: coordinator.tunnels.connected() == set(), "the link dropped")
    # The coordinator serves on: another node's tunnel works.
    honest = Identity.from_private_key(crypto.generate_private_key())
    _register(coordinator, honest)
    tunnel = _tunnel(coordinator, honest, target)
    tunnel.start()
    try:
        await until(lambda: honest.node_id in coordinator.tunnels.connected(), "the tunnel")
        answer = await exchange(
            coordinator.tunnels.open(honest.node_id, "web"), request("GET", "/bytes/3")
        )
        assert answer.endswith(pattern(3, seed=len("/bytes/3")))
    finally:
        await tunnel.stop()
