"""The tunnel against hostile and failing peers: a coordinator side that opens past the
agent's cap, an agent that sends garbage, a node the store does not know, a connection
gone silent or out of stream ids. Real coordinator, real sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support.tunnel_target import Target, exchange, pattern, request
from support.tunnel_world import (
    agent_handshake,
    make_tunnel,
    register,
    running_coordinator,
    running_node,
    running_target,
    until,
)
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from agent.link.identity import Identity
from agent.protocol import crypto
from agent.protocol.tunnel_frames import encode_data, encode_open, encode_window
from agent.services.tunnel import ServiceTunnel, tunnel_url
from coordinator.server import Coordinator
from coordinator.tunnel import StreamError


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


async def test_a_silent_older_connection_does_not_hold_up_the_newer_one(
    coordinator: Coordinator, target: Target
) -> None:
    identity = Identity.from_private_key(crypto.generate_private_key())
    register(coordinator, identity)
    async with connect(tunnel_url(coordinator.url)) as silent:
        await agent_handshake(silent, coordinator, identity)
        await until(lambda: identity.node_id in coordinator.tunnels.connected(), "the tunnel")
        older = coordinator.tunnels._links[identity.node_id]
        silent.transport.pause_reading()  # it will not answer the closing handshake
        newer = make_tunnel(coordinator, identity, target)
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


async def test_a_node_the_store_does_not_know_gets_no_data_connection(
    coordinator: Coordinator, target: Target
) -> None:
    identity = Identity.from_private_key(crypto.generate_private_key())
    tunnel = make_tunnel(coordinator, identity, target)
    tunnel.start()
    try:
        await until(lambda: tunnel.last_error is not None, "a refusal")
        assert tunnel.last_error == "handshake_refused"
        assert coordinator.tunnels.connected() == set()
    finally:
        await tunnel.stop()


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


@pytest.mark.parametrize(
    ("garbage", "code"),
    [
        (b"\xff" * 40, "frame_too_large"),
        (b"\x09" + bytes(8), "unknown_frame"),
        (b"\x02\x00", "bad_frame"),
        ("a text message", "bad_frame"),
        (encode_data(2, b"x"), "unknown_stream"),
        (encode_window(0, 2**31 - 1), "window_overflow"),
        # Agents open no streams: each is refused, and five thousand at once are a flood.
        (b"".join(encode_open(2 * i + 2, "x") for i in range(5000)), "flood"),
    ],
)
async def test_a_hostile_agent_is_closed_with_a_code_and_the_coordinator_serves_on(
    coordinator: Coordinator, target: Target, garbage: bytes | str, code: str
) -> None:
    identity = Identity.from_private_key(crypto.generate_private_key())
    register(coordinator, identity)
    url = tunnel_url(coordinator.url)
    async with connect(url) as ws:
        await agent_handshake(ws, coordinator, identity)
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
    register(coordinator, honest)
    tunnel = make_tunnel(coordinator, honest, target)
    tunnel.start()
    try:
        await until(lambda: honest.node_id in coordinator.tunnels.connected(), "the tunnel")
        answer = await exchange(
            coordinator.tunnels.open(honest.node_id, "web"), request("GET", "/bytes/3")
        )
        assert answer.endswith(pattern(3, seed=len("/bytes/3")))
    finally:
        await tunnel.stop()
