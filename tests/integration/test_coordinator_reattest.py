"""Re-attestation: a node reconnecting with the verified profile it had is not asked again.

The reference coordinator on a real socket (127.0.0.1:0) and a real store. The agent side
is the protocol's own machines: a ``hello`` naming the digest of the profile the agent
would attest (docs/protocol.md, "Re-attestation").
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
from support.nodes import Clock, Node
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from agent.protocol import crypto, dsse
from agent.protocol.messages import (
    COORDINATOR_SENDS,
    Ack,
    AckBody,
    AttestRequest,
    AttestRequestBody,
    EnvelopeBody,
    Error,
    Message,
    ProfileBody,
    TelemetryBody,
    decode_frame,
    encode_frame,
    wrap,
)
from agent.protocol.session import AgentHandshake, HandshakeState
from coordinator.db import DbTarget
from coordinator.server import Coordinator, Settings

PROFILE: dict[str, Any] = {
    "gpus": [{"id": "GPU-5d1c", "name": "NVIDIA H100"}],
    "host": {"cpus": 64},
}
CHANGED: dict[str, Any] = {"gpus": [], "host": {"cpus": 64}}  # the GPU is gone


class Agent:
    """One open session: its socket, and what the coordinator sends."""

    def __init__(self, ws: ClientConnection, node: Node) -> None:
        self.ws = ws
        self.node = node

    async def send(self, message: Message) -> None:
        await self.ws.send(encode_frame(message))

    async def recv(self, timeout: float = 5.0) -> Message:
        async with asyncio.timeout(timeout):
            return decode_frame(await self.ws.recv(), accept=COORDINATOR_SENDS)

    async def attest(self, request: Message, seq: int, profile: dict[str, Any]) -> None:
        """Answer ``request`` with a profile signed for its nonce; the coordinator acks it."""
        assert isinstance(request, AttestRequest)
        node = self.node
        envelope = dsse.attest_profile(
            profile, request.body.nonce, node.node_id, node.key, node.key_id
        )
        body = ProfileBody(attestation=msgspec.convert(msgspec.to_builtins(envelope), EnvelopeBody))
        await self.send(Ack(v=1, body=AckBody(seq=request.seq)))
        node.last_coordinator_seq = request.seq
        await self.send(wrap(body, seq))
        assert await self.recv() == Ack(v=1, body=AckBody(seq=seq))

    async def telemetry(self, seq: int) -> Message:
        """Send telemetry ``seq``; the next frame the coordinator sends."""
        await self.send(wrap(TelemetryBody(samples=[{"t": float(seq)}]), seq))
        return await self.recv()


def hello_of(
    node: Node, coordinator: Coordinator, digest: str | None, *, signer: Node | None = None
) -> AgentHandshake:
    key = (signer or node).key
    return AgentHandshake(
        node_id=node.node_id,
        public_key=node.public_key,
        sign=lambda data: crypto.sign(key, data),
        verify=crypto.verify,
        pinned_keys={coordinator.key.key_id: coordinator.key.public_key},
        agent_version="0.1.0",
        nonce=crypto.b64encode(secrets.token_bytes(32)),
        last_coordinator_seq=node.last_coordinator_seq,
        now=time.time(),
        profile_digest=digest,
    )


@asynccontextmanager
async def session(coordinator: Coordinator, node: Node, digest: str | None) -> AsyncIterator[Agent]:
    """A welcomed session of ``node``, its ``hello`` naming ``digest``."""
    async with connect(coordinator.url) as ws:
        hs = hello_of(node, coordinator, digest)
        while hs.state is not HandshakeState.OPEN:
            for message in hs.messages_to_send():
                await ws.send(encode_frame(message))
            async with asyncio.timeout(5):
                answer = decode_frame(await ws.recv(), accept=COORDINATOR_SENDS)
            assert not isinstance(answer, Error), answer
            hs.receive(answer, time.time())
        yield Agent(ws, node)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@asynccontextmanager
async def running(
    tmp_path: Path, clock: Clock, target: DbTarget, *, max_age_s: float = 3600.0
) -> AsyncIterator[Coordinator]:
    server = Coordinator(
        db_path=target,
        state_dir=tmp_path / "state",
        settings=Settings(handshake_timeout_s=5.0, attest_max_age_s=max_age_s),
        clock=clock,
    )
    async with server:
        yield server


@pytest.fixture
async def coordinator(
    tmp_path: Path, clock: Clock, store_target: DbTarget
) -> AsyncIterator[Coordinator]:
    async with running(tmp_path, clock, store_target) as server:
        yield server


async def attested(coordinator: Coordinator, node: Node) -> None:
    """A first session: the node is asked, and its profile is stored verified."""
    async with session(coordinator, node, dsse.profile_digest(PROFILE)) as agent:
        await agent.attest(await agent.recv(), 1, PROFILE)
    assert coordinator.store.nodes.profile(node.node_id) is not None


def attest_requests(coordinator: Coordinator, node: Node) -> int:
    outbound = coordinator.store.streams.outbound(node.node_id)
    return outbound.acked + len(outbound.pending)


async def test_a_node_reconnecting_with_its_verified_profile_is_not_asked_again(
    coordinator: Coordinator,
) -> None:
    node = Node()
    await attested(coordinator, node)
    async with session(coordinator, node, dsse.profile_digest(PROFILE)) as agent:
        # The first frame after welcome is the telemetry's ack: no attest_request.
        assert await agent.telemetry(2) == Ack(v=1, body=AckBody(seq=2))
    assert attest_requests(coordinator, node) == 1
    assert coordinator.store.nodes.all_seqs(node.node_id) == [1, 2]


async def test_a_node_whose_hardware_changed_is_asked_at_once(coordinator: Coordinator) -> None:
    node = Node()
    await attested(coordinator, node)
    async with session(coordinator, node, dsse.profile_digest(CHANGED)) as agent:
        await agent.attest(await agent.recv(), 2, CHANGED)
    verified = coordinator.store.nodes.profile(node.node_id)
    assert verified is not None
    assert verified.profile == CHANGED


async def test_an_agent_naming_no_digest_is_asked_at_every_session(
    coordinator: Coordinator,
) -> None:
    node = Node()
    await attested(coordinator, node)
    async with session(coordinator, node, None) as agent:  # an older agent
        assert isinstance(await agent.recv(), AttestRequest)


async def test_a_profile_verified_longer_ago_than_the_max_age_is_asked_again(
    coordinator: Coordinator, clock: Clock
) -> None:
    node = Node()
    await attested(coordinator, node)
    clock.offset += Settings().attest_max_age_s + 1
    async with session(coordinator, node, dsse.profile_digest(PROFILE)) as agent:
        assert isinstance(await agent.recv(), AttestRequest)


async def test_an_unverified_profile_does_not_stand_for_the_node(
    coordinator: Coordinator,
) -> None:
    node = Node()
    async with session(coordinator, node, dsse.profile_digest(PROFILE)) as agent:
        request = await agent.recv()
        assert isinstance(request, AttestRequest)
        # A profile answering a nonce never issued is stored unverified: asked again.
        forged = AttestRequest(v=1, seq=request.seq, body=AttestRequestBody(nonce=_nonce()))
        await agent.attest(forged, 1, PROFILE)
    assert coordinator.store.nodes.profile(node.node_id) is None
    async with session(coordinator, node, dsse.profile_digest(PROFILE)) as agent:
        assert isinstance(await agent.recv(), AttestRequest)


async def test_a_long_session_is_asked_again_once_its_profile_is_too_old(
    tmp_path: Path, clock: Clock, store_target: DbTarget
) -> None:
    async with running(tmp_path, clock, store_target, max_age_s=0.5) as coordinator:
        node = Node()
        async with session(coordinator, node, dsse.profile_digest(PROFILE)) as agent:
            await agent.attest(await agent.recv(), 1, PROFILE)
            first = coordinator.store.nodes.profile(node.node_id)
            # Nothing sent by the agent meanwhile: the coordinator asks on its own.
            again = await agent.recv()
            assert isinstance(again, AttestRequest)
            await agent.attest(again, 2, PROFILE)
        second = coordinator.store.nodes.profile(node.node_id)
    assert first is not None
    assert second is not None
    assert (first.seq, second.seq) == (1, 2)


async def test_the_challenge_is_still_signed_and_checked_when_no_attestation_is_asked(
    coordinator: Coordinator,
) -> None:
    node, impostor = Node(), Node()
    await attested(coordinator, node)
    async with connect(coordinator.url) as ws:
        # Signed by another key than the one in hello.
        hs = hello_of(node, coordinator, dsse.profile_digest(PROFILE), signer=impostor)
        await ws.send(encode_frame(hs.messages_to_send()[0]))
        hs.receive(decode_frame(await ws.recv()), time.time())
        await ws.send(encode_frame(hs.messages_to_send()[0]))
        answer = decode_frame(await ws.recv())
        with pytest.raises(ConnectionClosed):
            await ws.recv()
    assert isinstance(answer, Error)
    assert answer.body.code == "bad_signature"


async def test_a_malformed_digest_is_refused_and_closed(coordinator: Coordinator) -> None:
    node = Node()
    hs = hello_of(node, coordinator, None)
    frame = msgspec.json.decode(encode_frame(hs.messages_to_send()[0]))
    frame["body"]["profile_digest"] = "sha256:" + "0" * 64
    async with connect(coordinator.url) as ws:
        await ws.send(msgspec.json.encode(frame).decode())
        answer = decode_frame(await ws.recv())
        with pytest.raises(ConnectionClosed):
            await ws.recv()
    assert isinstance(answer, Error)
    assert answer.body.code == "bad_message"


def _nonce() -> str:
    return crypto.b64encode(secrets.token_bytes(32))
