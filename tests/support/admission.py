"""The reference coordinator in this process, and a test agent's side of its admission."""

from __future__ import annotations

import asyncio
import base64
import random
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
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
from support.nodes import Clock, Node

__all__ = [
    "TOKEN",
    "acks_stored",
    "answers_until_ack",
    "codes",
    "handshake",
    "recv",
    "refusal",
    "started",
    "telemetry",
    "until_closed",
    "welcomed",
]


TOKEN = "enrol-" + "7" * 20


@asynccontextmanager
async def started(
    tmp_path: Path, clock: Clock | None = None, **settings: object
) -> AsyncIterator[Coordinator]:
    server = Coordinator(
        db_path=tmp_path / "coordinator.db",
        state_dir=tmp_path / "state",
        settings=Settings(handshake_timeout_s=5.0, **settings),  # type: ignore[arg-type]
        clock=clock or time.time,
    )
    async with server:
        yield server


async def recv(ws: ClientConnection) -> Message:
    async with asyncio.timeout(10):
        return decode_frame(await ws.recv(), accept=COORDINATOR_SENDS)


async def handshake(
    ws: ClientConnection,
    coordinator: Coordinator,
    node: Node,
    token: str | None = None,
    *,
    last_coordinator_seq: int = 0,
) -> Welcome | Error:
    """The agent's handshake (having stored the coordinator's stream up to
    ``last_coordinator_seq``): the welcome, or the coordinator's coded refusal."""
    hs = AgentHandshake(
        node_id=node.node_id,
        public_key=node.public_key,
        sign=lambda data: crypto.sign(node.key, data),
        verify=crypto.verify,
        pinned_keys={coordinator.key.key_id: coordinator.key.public_key},
        agent_version="0.1.0",
        nonce=crypto.b64encode(secrets.token_bytes(32)),
        last_coordinator_seq=last_coordinator_seq,
        now=time.time(),
        enrolment_token=token,
    )
    while hs.state is not HandshakeState.OPEN:
        for message in hs.messages_to_send():
            await ws.send(encode_frame(message))
        answer = await recv(ws)
        if isinstance(answer, Error):
            return answer
        hs.receive(answer, time.time())
    assert hs.welcome is not None
    return Welcome(v=1, body=hs.welcome)


async def refusal(coordinator: Coordinator, node: Node, token: str | None = None) -> str:
    """Connect; the code the coordinator refused the handshake with (it then closed)."""
    async with connect(coordinator.url) as ws:
        answer = await handshake(ws, coordinator, node, token)
        assert isinstance(answer, Error), answer
        with pytest.raises(ConnectionClosed):
            await recv(ws)
    assert ws.close_code == 1008
    return answer.body.code


@asynccontextmanager
async def welcomed(
    coordinator: Coordinator,
    node: Node,
    token: str | None = None,
    *,
    last_coordinator_seq: int = 0,
    **connect_args: Any,
) -> AsyncIterator[tuple[ClientConnection, Welcome]]:
    async with connect(coordinator.url, **connect_args) as ws:
        welcome = await handshake(
            ws, coordinator, node, token, last_coordinator_seq=last_coordinator_seq
        )
        assert isinstance(welcome, Welcome), welcome
        yield ws, welcome


def telemetry(seq: int, size: int = 0) -> str:
    """A telemetry frame; with ``size``, one sample padded to about that many bytes, which
    deflate to about 3/4 of them (random base64: stored deflated, it still weighs)."""
    pad = base64.b64encode(random.Random(seq).randbytes(size * 3 // 4)).decode()
    samples = [{"t": float(seq), "pad": pad}] if size else []
    return encode_frame(wrap(TelemetryBody(samples=samples), seq))


async def answers_until_ack(ws: ClientConnection, seq: int) -> list[Message]:
    """What the coordinator sends up to the ack of ``seq`` (its own stream left aside)."""
    seen: list[Message] = []
    while True:
        message = await recv(ws)
        if isinstance(message, Ack | Error):
            seen.append(message)
        if isinstance(message, Ack) and message.body.seq >= seq:
            return seen


async def until_closed(ws: ClientConnection) -> list[Message]:
    """Everything the coordinator sends until it closes the connection."""
    seen: list[Message] = []
    while True:
        try:
            seen.append(await recv(ws))
        except ConnectionClosed:
            return seen


def codes(messages: list[Message]) -> list[str]:
    return [m.body.code for m in messages if isinstance(m, Error)]


async def acks_stored(coordinator: Coordinator, node_id: str) -> None:
    """Return once the node's acks of the coordinator's stream are stored: the group-commit
    writer stores them a moment after the session read them."""
    async with asyncio.timeout(10):
        while coordinator.store.streams.outbound(node_id).pending:
            await asyncio.sleep(0.01)
