"""The design that lets one coordinator hold many agents (docs/coordinator.md), end to end."""

from __future__ import annotations

import asyncio
import logging
import secrets
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from support.admission import (
    acks_stored,
    answers_until_ack,
    codes,
    handshake,
    recv,
    started,
    telemetry,
    until_closed,
    welcomed,
)
from support.nodes import Node
from support.processes import Coordinator
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.extensions.base import Extension
from websockets.extensions.permessage_deflate import (
    ClientPerMessageDeflateFactory,
    PerMessageDeflate,
)
from websockets.frames import DATA_OPCODES, Frame
from websockets.typing import ExtensionParameter

from agent.protocol import crypto
from agent.protocol.limits import MAX_FRAME_BYTES
from agent.protocol.messages import (
    COORDINATOR_SENDS,
    Ack,
    AckBody,
    AttestRequest,
    Error,
    Welcome,
    decode_frame,
    encode_frame,
    wrap,
)
from agent.protocol.session import AgentHandshake
from coordinator.server import Coordinator as Server
from coordinator.store import Store

RECEIVED: list[bool] = []
"""RSV1 (compressed) of each data frame the test agent received."""


class _Recording(PerMessageDeflate):
    def decode(self, frame: Frame, *, max_size: int | None = None) -> Frame:
        if frame.opcode in DATA_OPCODES:
            RECEIVED.append(frame.rsv1)
        return super().decode(frame, max_size=max_size)


class _Factory(ClientPerMessageDeflateFactory):
    def process_response_params(
        self, params: Sequence[ExtensionParameter], accepted_extensions: Sequence[Extension]
    ) -> PerMessageDeflate:
        ext = super().process_response_params(params, accepted_extensions)
        return _Recording(
            ext.remote_no_context_takeover,
            ext.local_no_context_takeover,
            ext.remote_max_window_bits,
            ext.local_max_window_bits,
            ext.compress_settings,
        )


async def test_acks_come_uncompressed_on_a_connection_that_negotiated_deflate(
    tmp_path: Path,
) -> None:
    RECEIVED.clear()
    async with started(tmp_path) as server:
        node = Node()
        deflate: dict[str, Any] = {"extensions": [_Factory()], "compression": None}
        async with welcomed(server, node, **deflate) as (ws, _):
            (deflate_ext,) = ws.protocol.extensions
            assert isinstance(deflate_ext, _Recording)
            # Neither side keeps zlib state between messages: none held while idle.
            assert deflate_ext.local_no_context_takeover
            assert deflate_ext.remote_no_context_takeover
            attest = await recv(ws)
            assert isinstance(attest, AttestRequest)
            await ws.send(encode_frame(wrap(AckBody(seq=attest.seq))))
            for seq in (1, 2, 3):
                await ws.send(telemetry(seq, size=4096))  # compressed by the agent
                answer = await recv(ws)
                assert isinstance(answer, Ack)
                assert answer.body.seq == seq
    assert RECEIVED
    assert not any(RECEIVED)


async def _open(url: str, node: Node, pinned: dict[str, bytes]) -> tuple[ClientConnection, int]:
    """A session of ``node``: the socket and the welcome's last stored seq."""
    ws = await connect(url, max_size=MAX_FRAME_BYTES)
    hs = AgentHandshake(
        node_id=node.node_id,
        public_key=node.public_key,
        sign=lambda data: crypto.sign(node.key, data),
        verify=crypto.verify,
        pinned_keys=pinned,
        agent_version="0.1.0",
        nonce=crypto.b64encode(secrets.token_bytes(32)),
        last_coordinator_seq=0,
        now=time.time(),
    )
    while hs.welcome is None:
        for message in hs.messages_to_send():
            await ws.send(encode_frame(message))
        hs.receive(await recv(ws), time.time())
    return ws, hs.welcome.last_agent_seq


async def _stream(ws: ClientConnection, seqs: range, acked: dict[str, int], node_id: str) -> None:
    """Send ``seqs`` without waiting, recording the acks, until the coordinator is gone
    (or all are acknowledged)."""

    async def acks() -> None:
        async for raw in ws:
            message = decode_frame(raw, accept=COORDINATOR_SENDS)
            if isinstance(message, Ack):
                acked[node_id] = max(acked[node_id], message.body.seq)
                if acked[node_id] >= seqs[-1]:
                    return

    reading = asyncio.create_task(acks())
    try:
        for seq in seqs:
            await ws.send(telemetry(seq, size=2048))
        await reading
    except ConnectionClosed:
        pass
    finally:
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)
        await ws.close()


def _stored(db_path: Path) -> dict[str, list[int]]:
    db = sqlite3.connect(db_path)
    try:
        rows = db.execute("SELECT node_id, seq FROM messages ORDER BY node_id, seq").fetchall()
    finally:
        db.close()
    stored: dict[str, list[int]] = {}
    for node_id, seq in rows:
        stored.setdefault(str(node_id), []).append(int(seq))
    return stored


async def test_what_was_acked_survives_kill_9_and_the_resend_duplicates_nothing(
    tmp_path: Path,
) -> None:
    coordinator = Coordinator(tmp_path)
    coordinator.start()
    try:
        key = crypto.b64decode(coordinator.public_key())
        pinned = {crypto.key_id(key): key}
        url = f"ws://127.0.0.1:{coordinator.port}/agent"
        nodes = [Node() for _ in range(8)]
        acked = {node.node_id: 0 for node in nodes}
        sent = 400  # per node, pipelined: groups of many nodes' messages form
        opened = [await _open(url, node, pinned) for node in nodes]
        streams = [
            asyncio.create_task(_stream(ws, range(1, sent + 1), acked, node.node_id))
            for node, (ws, _) in zip(nodes, opened, strict=True)
        ]
        while sum(acked.values()) < len(nodes) * sent // 4:  # mid-stream
            await asyncio.sleep(0.01)
        coordinator.kill()
        await asyncio.gather(*streams)
        stored = _stored(coordinator.db)
        for node in nodes:  # every ack stood for a commit
            assert stored.get(node.node_id, [])[: acked[node.node_id]] == list(
                range(1, acked[node.node_id] + 1)
            )
        assert sum(acked.values()) < len(nodes) * sent  # killed before the end
        coordinator.start()
        for node in nodes:  # the agent resends what its welcome says is not stored
            ws, last = await _open(url, node, pinned)
            assert last >= acked[node.node_id]
            await _stream(ws, range(last + 1, sent + 1), acked, node.node_id)
            assert acked[node.node_id] == sent
        stored = _stored(coordinator.db)
        assert all(stored[node.node_id] == list(range(1, sent + 1)) for node in nodes)
    finally:
        coordinator.kill()


async def test_a_session_superseded_while_its_message_commits_ends_cleanly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = Node()
    async with started(tmp_path) as server, welcomed(server, node) as (old, _):
        assert isinstance(await recv(old), AttestRequest)
        # Another writer holds the file: the old session's message waits for its commit.
        blocker = sqlite3.connect(tmp_path / "coordinator.db", isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        await old.send(telemetry(1))
        async with connect(server.url) as new:
            welcoming = asyncio.create_task(handshake(new, server, node, last_coordinator_seq=1))
            seen = await until_closed(old)  # the newer connection supersedes it
            assert [m.body.code for m in seen if isinstance(m, Error)] == ["superseded"]
            blocker.execute("COMMIT")
            blocker.close()
            welcome = await welcoming
            assert isinstance(welcome, Welcome)
            if welcome.body.last_agent_seq < 1:  # read before the commit: resent
                await new.send(telemetry(1))
                await answers_until_ack(new, 1)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    store = Store(tmp_path / "coordinator.db")
    try:
        assert store.nodes.all_seqs(node.node_id) == [1]
    finally:
        store.close()


async def attested_once(server: Server, node: Node, *, ack: bool = True) -> None:
    """A first session of ``node``: its attest_request (seq 1) received (and acknowledged)."""
    async with welcomed(server, node) as (ws, _):
        attest = await recv(ws)
        assert isinstance(attest, AttestRequest)
        assert attest.seq == 1
        if ack:
            await ws.send(encode_frame(wrap(AckBody(seq=1))))
            await acks_stored(server, node.node_id)


async def test_reconnecting_nodes_are_served_while_another_writer_holds_the_file(
    tmp_path: Path,
) -> None:
    nodes = [Node(), Node()]
    async with started(tmp_path) as server:
        await attested_once(server, nodes[0])
        # The other stores seq 1 but its ack is lost: its handshake says it has it.
        await attested_once(server, nodes[1], ack=False)
        # Another writer holds the file: a reconnecting node's writes (last seen, the ack
        # its handshake carries, nonce, attest_request) wait for it on the writer's thread,
        # never on the loop, which welcomes one node after the other meanwhile.
        blocker = sqlite3.connect(tmp_path / "coordinator.db", isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        a, b = (welcomed(server, node, last_coordinator_seq=1) for node in nodes)
        async with a as (first, _), b as (second, _):
            blocker.execute("COMMIT")
            blocker.close()
            for node, ws in zip(nodes, [first, second], strict=True):
                attest = await recv(ws)
                assert isinstance(attest, AttestRequest)
                assert attest.seq == 2
                # Its nonce was stored with it: a profile may answer it.
                server.store.streams.check_nonce(node.node_id, attest.body.nonce, time.time(), 60)
                assert server.store.streams.outbound(node.node_id).acked == 1


async def test_a_session_superseded_while_its_attest_request_commits_leaves_no_gap(
    tmp_path: Path,
) -> None:
    node = Node()
    async with started(tmp_path) as server:
        await attested_once(server, node)
        blocker = sqlite3.connect(tmp_path / "coordinator.db", isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        old_session = welcomed(server, node, last_coordinator_seq=1)
        async with old_session as (old, _), connect(server.url) as new:
            # The old session's attest_request (seq 2) waits for the file; the newer session
            # takes over meanwhile, its stream read as it stood before that commit.
            welcoming = asyncio.create_task(handshake(new, server, node, last_coordinator_seq=1))
            assert codes(await until_closed(old)) == ["superseded"]
            blocker.execute("COMMIT")
            blocker.close()
            assert isinstance(await welcoming, Welcome)
            # The newer session sends the old one's request in its place, then its own.
            sent = [await recv(new), await recv(new)]
            assert [m.seq for m in sent if isinstance(m, AttestRequest)] == [2, 3]
            await new.send(encode_frame(wrap(AckBody(seq=3))))
            await acks_stored(server, node.node_id)
