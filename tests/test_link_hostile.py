"""The agent<->coordinator link under hostile or unlucky conditions.

Real coordinators on 127.0.0.1:0 with real SQLite files; the agent side is the
protocol-speaking test peer (coordinator_peer.py), the daemon's own link, or the job
manager on the real Docker engine.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from coordinator_peer import Peer, connected
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from agent.protocol import crypto
from agent.protocol.messages import (
    COORDINATOR_SENDS,
    Ack,
    Error,
    Message,
    TelemetryBody,
    Welcome,
    decode_frame,
    encode_frame,
    wrap,
)
from agent.protocol.session import AgentHandshake, HandshakeState
from coordinator.server import Coordinator, Settings


@pytest.fixture
async def coordinator(tmp_path: Path) -> AsyncIterator[Coordinator]:
    server = Coordinator(
        db_path=tmp_path / "coordinator.db",
        state_dir=tmp_path / "state",
        settings=Settings(handshake_timeout_s=5.0),
    )
    async with server:
        yield server


def _pinned(coordinator: Coordinator) -> dict[str, bytes]:
    return {coordinator.key.key_id: coordinator.key.public_key}


async def _recv(ws: ClientConnection) -> Message:
    async with asyncio.timeout(10):
        return decode_frame(await ws.recv(), accept=COORDINATOR_SENDS)


async def _handshake(ws: ClientConnection, coordinator: Coordinator, peer: Peer) -> Welcome | Error:
    """Run the agent's handshake; the welcome, or the error the coordinator answered."""
    hs = AgentHandshake(
        node_id=peer.node_id,
        public_key=peer.public_key,
        sign=lambda data: crypto.sign(peer.key, data),
        verify=crypto.verify,
        pinned_keys=_pinned(coordinator),
        agent_version="0.1.0",
        nonce=crypto.b64encode(secrets.token_bytes(32)),
        last_coordinator_seq=0,
        now=time.time(),
    )
    while hs.state is not HandshakeState.OPEN:
        for message in hs.messages_to_send():
            await ws.send(encode_frame(message))
        answer = await _recv(ws)
        if isinstance(answer, Error):
            return answer
        hs.receive(answer, time.time())
    assert hs.welcome is not None
    return Welcome(v=1, body=hs.welcome)


class Contender:
    """One of several connections of the same node racing to be its session."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.acked: list[int] = []
        """The seqs of its own telemetry the coordinator acknowledged."""
        self.errors: list[str] = []
        self.close_code: int | None = None

    async def run(self, coordinator: Coordinator, peer: Peer, go: asyncio.Event) -> None:
        """Handshake; once welcomed, send three telemetry batches marked with its index."""
        async with connect(coordinator.url) as ws:
            try:
                await go.wait()
                welcome = await _handshake(ws, coordinator, peer)
                if isinstance(welcome, Error):
                    self.errors.append(welcome.body.code)
                    await _recv(ws)  # the close that follows the error
                    return
                first = welcome.body.last_agent_seq + 1
                for seq in range(first, first + 3):
                    samples = [{"t": float(seq), "contender": self.index}]
                    await ws.send(encode_frame(wrap(TelemetryBody(samples=samples), seq)))
                while len(self.acked) < 3:
                    message = await _recv(ws)
                    if isinstance(message, Ack) and message.body.seq >= first:
                        self.acked.append(message.body.seq)
                    elif isinstance(message, Error):
                        self.errors.append(message.body.code)
                    # The coordinator's own stream is left unacknowledged: the contenders
                    # share no view of it, and each hello says it has stored nothing.
            except ConnectionClosed:
                pass
            finally:
                self.close_code = ws.close_code


async def test_racing_handshakes_of_one_node_leave_one_session_and_lose_nothing_acked(
    coordinator: Coordinator,
) -> None:
    peer = Peer()
    for _ in range(3):
        go = asyncio.Event()
        contenders = [Contender(i) for i in range(4)]
        tasks = [asyncio.create_task(c.run(coordinator, peer, go)) for c in contenders]
        await asyncio.sleep(0)  # every contender's socket is opening
        go.set()
        async with asyncio.timeout(30):
            await asyncio.gather(*tasks)
        # Whoever was replaced was told so, with a code, and closed normally; nobody saw
        # the coordinator fail (1011) or got another error.
        for contender in contenders:
            assert set(contender.errors) <= {"superseded"}, contender.errors
            assert contender.close_code in (None, 1000), contender.close_code
        # Every ack is for what the store holds from that very contender.
        stored = {m.seq: m.body for m in coordinator.store.messages(peer.node_id, "telemetry")}
        for contender in contenders:
            for seq in contender.acked:
                assert stored[seq]["samples"][0]["contender"] == contender.index
        seqs = coordinator.store.all_seqs(peer.node_id)
        assert seqs == list(range(1, len(seqs) + 1))
    # After all that, the node connects once more and is served normally.
    async with connected(coordinator.url, _pinned(coordinator), peer) as link:
        peer.last_seq = link.welcome.body.last_agent_seq
        await link.send(TelemetryBody(samples=[]))
        assert coordinator.connected() == {peer.node_id}
