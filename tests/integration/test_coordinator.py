"""The reference coordinator on a real socket (127.0.0.1:0) with a real SQLite file.

The agent side of each exchange is written here with the protocol's own machines
(AgentHandshake, crypto, dsse), independent of the daemon's link.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
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
from agent.protocol.limits import MAX_FRAME_BYTES
from agent.protocol.messages import (
    COORDINATOR_SENDS,
    Ack,
    AckBody,
    AttestRequest,
    EnvelopeBody,
    Error,
    Message,
    ProfileBody,
    TelemetryBody,
    Welcome,
    decode_frame,
    encode_frame,
    wrap,
)
from agent.protocol.session import AgentHandshake, HandshakeState
from coordinator import cli
from coordinator.db import DbTarget
from coordinator.db_open import open_database
from coordinator.server import Coordinator, Settings

PROFILE = {"gpus": [{"id": "GPU-5d1c", "name": "NVIDIA H100"}], "host": {"cpus": 64}}


class Link:
    """One open session of a test agent: the welcome, the first attest_request, a socket."""

    def __init__(self, ws: ClientConnection, welcome: Welcome, attest: AttestRequest) -> None:
        self.ws = ws
        self.welcome = welcome
        self.attest = attest

    async def send_raw(self, data: str | bytes) -> None:
        await self.ws.send(data)

    async def send(self, message: Message) -> None:
        await self.ws.send(encode_frame(message))

    async def recv(self) -> Message:
        async with asyncio.timeout(5):
            return decode_frame(await self.ws.recv(), accept=COORDINATOR_SENDS)

    async def telemetry(self, seq: int) -> Message:
        """Send telemetry ``seq``; the coordinator's answer."""
        samples = [{"t": float(seq), "gpus": [{"id": "GPU-5d1c", "util_gpu_pct": 50.0}]}]
        await self.send(wrap(TelemetryBody(samples=samples), seq))
        return await self.recv()

    async def expect_closed(self, code: int) -> None:
        with pytest.raises(ConnectionClosed):
            await self.recv()
        assert self.ws.close_code == code


def profile_frame(node: Node, seq: int, nonce: str, *, signer: Node | None = None) -> Message:
    signer = signer or node
    envelope = dsse.attest_profile(PROFILE, nonce, node.node_id, signer.key, node.key_id)
    body = ProfileBody(attestation=_to_body(envelope))
    return wrap(body, seq)


def _to_body(envelope: dsse.Envelope) -> EnvelopeBody:
    return msgspec.convert(msgspec.to_builtins(envelope), EnvelopeBody)


def new_nonce() -> str:
    return crypto.b64encode(secrets.token_bytes(32))


@asynccontextmanager
async def session(
    coordinator: Coordinator,
    node: Node,
    *,
    claimed_id: str | None = None,
    nonce: str | None = None,
    ack_attest: bool = True,
    compression: str | None = "deflate",
) -> AsyncIterator[Link]:
    """Connect and run the handshake; fails the test if the coordinator refuses.

    Like a real agent, it stores and acknowledges the ``attest_request`` (unless told not to),
    and offers permessage-deflate (unless ``compression=None``).
    """
    async with connect(coordinator.url, compression=compression) as ws:
        link = await handshake(
            ws,
            coordinator,
            node,
            claimed_id=claimed_id,
            nonce=nonce,
            last_coordinator_seq=node.last_coordinator_seq,
        )
        assert isinstance(link, Link), f"refused: {link}"
        if ack_attest:
            await link.send(ack(link.attest.seq))
            node.last_coordinator_seq = link.attest.seq
        yield link


async def handshake(
    ws: ClientConnection,
    coordinator: Coordinator,
    node: Node,
    *,
    claimed_id: str | None = None,
    nonce: str | None = None,
    last_coordinator_seq: int = 0,
) -> Link | Error:
    """The open session, or the coordinator's refusal."""
    hs = AgentHandshake(
        node_id=claimed_id or node.node_id,
        public_key=node.public_key,
        sign=lambda data: crypto.sign(node.key, data),
        verify=crypto.verify,
        pinned_keys={coordinator.key.key_id: coordinator.key.public_key},
        agent_version="0.1.0",
        nonce=nonce or new_nonce(),
        last_coordinator_seq=last_coordinator_seq,
        now=time.time(),
    )
    while hs.state is not HandshakeState.OPEN:
        for message in hs.messages_to_send():
            await ws.send(encode_frame(message))
        async with asyncio.timeout(5):
            answer = decode_frame(await ws.recv(), accept=COORDINATOR_SENDS)
        if isinstance(answer, Error):
            return answer
        hs.receive(answer, time.time())
    async with asyncio.timeout(5):
        attest = decode_frame(await ws.recv(), accept=COORDINATOR_SENDS)
    assert isinstance(attest, AttestRequest)
    assert hs.welcome is not None
    return Link(ws, Welcome(v=1, body=hs.welcome), attest)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def coordinator(
    tmp_path: Path, clock: Clock, store_target: DbTarget
) -> AsyncIterator[Coordinator]:
    """A coordinator on each store: SQLite, and PostgreSQL."""
    server = Coordinator(
        db_path=store_target,
        state_dir=tmp_path / "state",
        settings=Settings(handshake_timeout_s=5.0),
        clock=clock,
    )
    async with server:
        yield server


def ack(seq: int) -> Message:
    return Ack(v=1, body=AckBody(seq=seq))


# ------------------------------------------------------------------ the happy path


async def test_profile_and_telemetry_are_verified_and_stored_once(
    coordinator: Coordinator,
) -> None:
    node = Node()
    async with session(coordinator, node) as link:
        assert link.welcome.body.last_agent_seq == 0
        assert link.attest.seq == 1
        await link.send(profile_frame(node, 1, link.attest.body.nonce))
        assert await link.recv() == ack(1)
        assert await link.telemetry(2) == ack(2)
        assert coordinator.connected() == {node.node_id}
    store = coordinator.store
    assert store.nodes.all_seqs(node.node_id) == [1, 2]
    verified = store.nodes.profile(node.node_id)
    assert verified is not None
    assert verified.profile == PROFILE
    assert store.streams.outbound(node.node_id).acked == 1


async def test_a_profile_is_stored_verified_after_one_signature_check(
    coordinator: Coordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every node attests again after a coordinator's restart: the profile's signature is
    # verified once (it was twice: once to read the nonce, once for the rest).
    checked: list[bytes] = []
    real = crypto.verify

    def counting(public_key: bytes, data: bytes, signature: bytes) -> bool:
        if data.startswith(b"DSSEv1 "):
            checked.append(data)
        return real(public_key, data, signature)

    monkeypatch.setattr(crypto, "verify", counting)
    node = Node()
    async with session(coordinator, node) as link:
        await link.send(profile_frame(node, 1, link.attest.body.nonce))
        assert await link.recv() == ack(1)
    verified = coordinator.store.nodes.profile(node.node_id)
    assert verified is not None
    assert verified.profile == PROFILE
    assert len(checked) == 1


async def test_a_reconnecting_node_has_its_key_read_once_per_handshake_message(
    coordinator: Coordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # hello (a known key is not rate-limited) and auth (admission); then the session trusts
    # the key the node proved it holds, without reading it again.
    node = Node()
    async with session(coordinator, node):
        pass
    nodes = coordinator.store.nodes
    reads: list[str] = []
    real = nodes.public_key

    def counting(node_id: str) -> str | None:
        reads.append(node_id)
        return real(node_id)

    monkeypatch.setattr(nodes, "public_key", counting)
    async with session(coordinator, node) as link:
        await link.send(profile_frame(node, 1, link.attest.body.nonce))
        assert await link.recv() == ack(1)
    assert reads == [node.node_id] * 2
    assert coordinator.store.nodes.profile(node.node_id) is not None


async def test_duplicate_seq_resent_is_stored_once_and_acked_again(
    coordinator: Coordinator,
) -> None:
    node = Node()
    async with session(coordinator, node) as link:
        assert await link.telemetry(1) == ack(1)
        assert await link.telemetry(2) == ack(2)
    async with session(coordinator, node) as link:
        assert link.welcome.body.last_agent_seq == 2
        # The agent's view was stale: it resends what the coordinator already stored.
        assert await link.telemetry(2) == ack(2)
        assert await link.telemetry(3) == ack(3)
    assert coordinator.store.nodes.all_seqs(node.node_id) == [1, 2, 3]


async def test_unacked_attest_request_is_resent_after_reconnect_and_not_piled_up(
    coordinator: Coordinator,
) -> None:
    node = Node()
    async with session(coordinator, node, ack_attest=False) as link:
        first = link.attest
    for _ in range(3):
        async with connect(coordinator.url) as ws:
            # The agent never stored seq 1: the coordinator resends it, and only it.
            again = await handshake(ws, coordinator, node)
            assert isinstance(again, Link)
            assert again.attest == first
    assert [seq for seq, _, _ in coordinator.store.streams.outbound(node.node_id).pending] == [1]
    async with connect(coordinator.url) as ws:
        link2 = await handshake(ws, coordinator, node)
        assert isinstance(link2, Link)
        # A profile may answer the older nonce: it was issued to this node, within the TTL.
        await link2.send(profile_frame(node, 1, first.body.nonce))
        assert await link2.recv() == ack(1)


async def test_restarted_coordinator_keeps_every_seq_exactly_once(
    tmp_path: Path, clock: Clock
) -> None:
    node = Node()
    seq = 0
    for _ in range(3):
        server = Coordinator(db_path=tmp_path / "c.db", state_dir=tmp_path / "state", clock=clock)
        async with server, session(server, node) as link:
            assert link.welcome.body.last_agent_seq == seq
            # Resend the last one (stale view), then three new ones.
            if seq:
                assert await link.telemetry(seq) == ack(seq)
            for _ in range(3):
                seq += 1
                assert await link.telemetry(seq) == ack(seq)
    server = Coordinator(db_path=tmp_path / "c.db", state_dir=tmp_path / "state")
    async with server:
        assert server.store.nodes.all_seqs(node.node_id) == list(range(1, 10))


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{not json", "bad_json"),
        ('{"v": 1, "type": "gossip", "body": {}}', "unknown_type"),
        ('{"v": 1, "type": "job_cancel", "seq": 1, "body": {"job_id": "j"}}', "unknown_type"),
        ('{"v": 2, "type": "telemetry", "seq": 1, "body": {"samples": []}}', "bad_version"),
        ('{"v": 1, "type": "telemetry", "seq": 0, "body": {"samples": []}}', "bad_message"),
        ('{"v": 1, "type": "telemetry", "seq": 1, "body": {"samples": [], "x": 1}}', "bad_message"),
    ],
)
async def test_undecodable_frame_gets_a_coded_error_and_the_session_goes_on(
    coordinator: Coordinator, frame: str, code: str
) -> None:
    node = Node()
    async with session(coordinator, node) as link:
        await link.send_raw(frame)
        answer = await link.recv()
        assert isinstance(answer, Error)
        assert answer.body.code == code
        assert await link.telemetry(1) == ack(1)
    assert coordinator.store.nodes.all_seqs(node.node_id) == [1]


async def _closing_case(case: str, link: Link, node: Node, clock: Clock) -> str:
    """Send the bad input named ``case``; the error code it must earn."""
    nonce = link.attest.body.nonce
    if case == "bad_signature":
        await link.send(profile_frame(node, 1, nonce, signer=Node()))
    elif case == "forged_with_stale_nonce":
        # A nonce that would only make it unverified: the bad signature still closes.
        clock.offset += 2 * 3600
        await link.send(profile_frame(node, 1, new_nonce(), signer=Node()))
        return "bad_signature"
    elif case == "other_node_subject":
        other = Node()
        envelope = dsse.attest_profile(PROFILE, nonce, other.node_id, node.key, node.key_id)
        await link.send(wrap(ProfileBody(attestation=_to_body(envelope)), 1))
        return "node_mismatch"
    elif case == "seq_backwards":
        assert await link.telemetry(1) == ack(1)
        assert await link.telemetry(2) == ack(2)
        await link.send(wrap(TelemetryBody(samples=[]), 1))
    elif case == "seq_gap":
        await link.send(wrap(TelemetryBody(samples=[]), 5))
    elif case == "ack_ahead":
        await link.send(ack(7))
    return case


CLOSING = [
    "bad_signature",
    "forged_with_stale_nonce",
    "other_node_subject",
    "seq_backwards",
    "seq_gap",
    "ack_ahead",
]


@pytest.mark.parametrize("case", CLOSING)
async def test_bad_input_gets_its_error_and_a_close_while_another_agent_goes_on(
    coordinator: Coordinator, clock: Clock, case: str
) -> None:
    good, bad = Node(), Node()
    async with session(coordinator, good) as good_link:
        assert await good_link.telemetry(1) == ack(1)
        async with session(coordinator, bad) as bad_link:
            code = await _closing_case(case, bad_link, bad, clock)
            answer = await bad_link.recv()
            assert isinstance(answer, Error), answer
            assert answer.body.code == code
            await bad_link.expect_closed(1008)
        assert await good_link.telemetry(2) == ack(2)
    store = coordinator.store
    assert store.nodes.all_seqs(good.node_id) == [1, 2]
    # Nothing of the bad input was stored: only what was acknowledged before it.
    acked_before = {"seq_backwards": [1, 2]}.get(case, [])
    assert store.nodes.all_seqs(bad.node_id) == acked_before
    assert store.nodes.profile(bad.node_id) is None


# ------------------------------------------------------------------ stale attestations


async def _expect_attest_request(link: Link, node: Node) -> AttestRequest:
    """The next message is a fresh attest_request; store and acknowledge it like an agent."""
    request = await link.recv()
    assert isinstance(request, AttestRequest), request
    await link.send(ack(request.seq))
    node.last_coordinator_seq = request.seq
    return request


async def test_agent_offline_past_the_nonce_ttl_delivers_its_stale_profile_then_reverifies(
    coordinator: Coordinator, clock: Clock
) -> None:
    node = Node()
    base = f"http://127.0.0.1:{coordinator.port}"
    async with session(coordinator, node) as link:
        # The agent queues its answer (seq 1) and two telemetry batches, then drops offline.
        stale_nonce = link.attest.body.nonce
    clock.offset += 2 * 3600  # past attest_nonce_ttl_s (1 hour)
    async with session(coordinator, node) as link:
        assert link.welcome.body.last_agent_seq == 0
        await link.send(profile_frame(node, 1, stale_nonce))
        assert await link.recv() == ack(1)
        fresh = await _expect_attest_request(link, node)
        assert fresh.seq == link.attest.seq + 1
        assert fresh.body.nonce not in (stale_nonce, link.attest.body.nonce)
        # What the agent queued behind the stale profile is delivered.
        assert await link.telemetry(2) == ack(2)
        assert await link.telemetry(3) == ack(3)

        store = coordinator.store
        assert store.nodes.profile(node.node_id) is None  # never verified hardware
        latest = store.nodes.latest_profile(node.node_id)
        assert latest is not None
        assert (latest.seq, latest.verified, latest.profile) == (1, False, PROFILE)
        assert latest.unverified is not None
        assert latest.unverified.reason == "stale_nonce"
        _, _, detail = await asyncio.to_thread(_get, f"{base}/api/nodes/{node.node_id}")
        assert detail["profile_verified"] is False
        assert detail["gpu_count"] == 0
        assert detail["profile"] is None
        assert detail["unverified_profile"]["seq"] == 1
        assert detail["unverified_profile"]["reason"] == "stale_nonce"

        # The agent answers the fresh request; the node is verified again.
        await link.send(profile_frame(node, 4, fresh.body.nonce))
        assert await link.recv() == ack(4)
        assert await link.telemetry(5) == ack(5)  # no further attest_request in between
    verified = store.nodes.profile(node.node_id)
    assert verified is not None
    assert (verified.seq, verified.profile) == (4, PROFILE)
    latest = store.nodes.latest_profile(node.node_id)
    assert latest is not None
    assert (latest.seq, latest.verified, latest.unverified) == (4, True, None)
    assert store.nodes.all_seqs(node.node_id) == [1, 2, 3, 4, 5]
    _, _, detail = await asyncio.to_thread(_get, f"{base}/api/nodes/{node.node_id}")
    assert detail["profile_verified"] is True
    assert detail["gpu_count"] == 1
    assert detail["profile"]["seq"] == 4
    assert detail["unverified_profile"] is None


async def test_resent_unverified_profile_is_only_acked_again(
    coordinator: Coordinator, clock: Clock
) -> None:
    node = Node()
    async with session(coordinator, node) as link:
        stale_nonce = link.attest.body.nonce
    clock.offset += 2 * 3600
    async with session(coordinator, node) as link:
        await link.send(profile_frame(node, 1, stale_nonce))
        assert await link.recv() == ack(1)
        # The fresh request is lost with the connection: the agent never stores it.
        request = await link.recv()
        assert isinstance(request, AttestRequest)
    async with session(coordinator, node) as link:
        assert link.welcome.body.last_agent_seq == 1
        # The agent's view was stale: seq 1 again, dropped and acknowledged, nothing more.
        assert link.attest == request  # the unacknowledged one, resent (and no new one)
        await link.send(profile_frame(node, 1, stale_nonce))
        assert await link.recv() == ack(1)
        assert await link.telemetry(2) == ack(2)
    store = coordinator.store
    assert store.nodes.all_seqs(node.node_id) == [1, 2]
    assert store.nodes.profile(node.node_id) is None
    assert store.streams.outbound(node.node_id).acked == node.last_coordinator_seq


@pytest.mark.parametrize("case", ["replayed_nonce", "foreign_nonce"])
async def test_profile_with_a_used_or_foreign_nonce_is_stored_unverified(
    coordinator: Coordinator, case: str
) -> None:
    node = Node()
    async with session(coordinator, node) as link:
        nonce = link.attest.body.nonce
        if case == "replayed_nonce":
            await link.send(profile_frame(node, 1, nonce))
            assert await link.recv() == ack(1)
        else:
            nonce = new_nonce()  # never issued
            assert await link.telemetry(1) == ack(1)
        await link.send(profile_frame(node, 2, nonce))
        assert await link.recv() == ack(2)
        fresh = await _expect_attest_request(link, node)
        assert await link.telemetry(3) == ack(3)
        latest = coordinator.store.nodes.latest_profile(node.node_id)
        assert latest is not None
        assert latest.unverified is not None
        assert (latest.seq, latest.verified) == (2, False)
        expected = "replayed_nonce" if case == "replayed_nonce" else "stale_nonce"
        assert latest.unverified.reason == expected
        await link.send(profile_frame(node, 4, fresh.body.nonce))
        assert await link.recv() == ack(4)
    verified = coordinator.store.nodes.profile(node.node_id)
    assert verified is not None
    assert verified.seq == 4


async def test_oversized_frame_closes_with_1009_and_others_go_on(
    coordinator: Coordinator,
) -> None:
    good = Node()
    async with session(coordinator, good) as good_link, session(coordinator, Node()) as bad:
        await bad.send_raw("x" * (MAX_FRAME_BYTES + 1))
        await bad.expect_closed(1009)
        assert await good_link.telemetry(1) == ack(1)


async def _refusal(coordinator: Coordinator, first: str | bytes | None = None) -> Error:
    async with connect(coordinator.url) as ws:
        assert first is not None
        await ws.send(first)
        async with asyncio.timeout(5):
            answer = decode_frame(await ws.recv(), accept=COORDINATOR_SENDS)
            with pytest.raises(ConnectionClosed):
                await ws.recv()
        assert ws.close_code == 1008
    assert isinstance(answer, Error)
    return answer


async def test_message_before_handshake_is_refused(coordinator: Coordinator) -> None:
    answer = await _refusal(coordinator, encode_frame(wrap(TelemetryBody(samples=[]), 1)))
    assert answer.body.code == "handshake_required"


async def test_malformed_hello_is_refused_and_closed(coordinator: Coordinator) -> None:
    answer = await _refusal(coordinator, "{nope")
    assert answer.body.code == "bad_json"


async def test_hello_claiming_another_nodes_id_is_refused(coordinator: Coordinator) -> None:
    node, victim = Node(), Node()
    async with connect(coordinator.url) as ws:
        answer = await handshake(ws, coordinator, node, claimed_id=victim.node_id)
        with pytest.raises(ConnectionClosed):
            await ws.recv()
    assert isinstance(answer, Error)
    assert answer.body.code == "node_mismatch"
    assert coordinator.store.nodes.get(victim.node_id) is None


async def test_replayed_hello_nonce_is_refused(coordinator: Coordinator) -> None:
    node, nonce = Node(), new_nonce()
    async with session(coordinator, node, nonce=nonce):
        pass
    async with connect(coordinator.url) as ws:
        answer = await handshake(ws, coordinator, node, nonce=nonce)
    assert isinstance(answer, Error)
    assert answer.body.code == "replayed_nonce"


async def test_auth_with_a_bad_signature_is_refused(coordinator: Coordinator) -> None:
    node, impostor = Node(), Node()
    async with connect(coordinator.url) as ws:
        hs = AgentHandshake(
            node_id=node.node_id,
            public_key=node.public_key,
            sign=lambda data: crypto.sign(impostor.key, data),  # not the key in hello
            verify=crypto.verify,
            pinned_keys={coordinator.key.key_id: coordinator.key.public_key},
            agent_version="0.1.0",
            nonce=new_nonce(),
            last_coordinator_seq=0,
            now=time.time(),
        )
        await ws.send(encode_frame(hs.messages_to_send()[0]))
        hs.receive(decode_frame(await ws.recv()), time.time())
        await ws.send(encode_frame(hs.messages_to_send()[0]))
        answer = decode_frame(await ws.recv())
        with pytest.raises(ConnectionClosed):
            await ws.recv()
    assert isinstance(answer, Error)
    assert answer.body.code == "bad_signature"


async def test_newer_connection_of_a_node_takes_over(coordinator: Coordinator) -> None:
    node = Node()
    async with session(coordinator, node) as old:
        assert await old.telemetry(1) == ack(1)
        async with session(coordinator, node) as new:
            told = await old.recv()
            assert isinstance(told, Error)
            assert told.body.code == "superseded"
            await old.expect_closed(1000)
            assert new.welcome.body.last_agent_seq == 1
            assert await new.telemetry(2) == ack(2)


# ------------------------------------------------------------------ the read API


def _get(url: str) -> tuple[int, str, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            body = response.read()
            kind = response.headers["Content-Type"]
            status = response.status
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers["Content-Type"], json.loads(exc.read())
    return status, kind, json.loads(body) if kind == "application/json" else body.decode()


async def test_read_api_returns_nodes_profile_and_telemetry(coordinator: Coordinator) -> None:
    node = Node()
    base = f"http://127.0.0.1:{coordinator.port}"
    async with session(coordinator, node) as link:
        await link.send(profile_frame(node, 1, link.attest.body.nonce))
        assert await link.recv() == ack(1)
        for seq in (2, 3):
            assert await link.telemetry(seq) == ack(seq)
        status, _, nodes = await asyncio.to_thread(_get, base + "/api/nodes")
    assert status == 200
    [summary] = nodes["nodes"]
    assert summary["node_id"] == node.node_id
    assert summary["connected"] is True
    assert summary["profile_verified"] is True
    assert summary["gpu_count"] == 1
    assert summary["latest_telemetry"]["seq"] == 3

    status, _, detail = await asyncio.to_thread(_get, f"{base}/api/nodes/{node.node_id}")
    assert detail["profile"]["profile"] == PROFILE
    assert detail["connected"] is False  # the session above has closed
    url = f"{base}/api/nodes/{node.node_id}/telemetry?since_seq=2"
    status, _, telemetry = await asyncio.to_thread(_get, url)
    assert [item["seq"] for item in telemetry["items"]] == [3]
    assert telemetry["items"][0]["samples"][0]["t"] == 3.0

    status, kind, page = await asyncio.to_thread(_get, base + "/")
    assert (status, kind) == (200, "text/html; charset=utf-8")
    assert "/api/nodes" in page
    status, _, missing = await asyncio.to_thread(_get, base + "/api/nodes/node-nope")
    assert (status, missing["error"]["code"]) == (404, "not_found")
    status, _, bad = await asyncio.to_thread(_get, url.replace("=2", "=x"))
    assert (status, bad["error"]["code"]) == (400, "bad_request")


# ------------------------------------------------------------------ telemetry as it came


def _batch(seq: int) -> dict[str, Any]:
    """A daemon-like batch: 10 samples of 8 GPUs (what compresses as a real one does)."""
    gpus = [{"id": f"GPU-{i}", "util_gpu_pct": 50.0 + i, "power_w": 200.5} for i in range(8)]
    return {"samples": [{"t": seq * 10.0 + n, "gpus": gpus} for n in range(10)], "dropped": 0}


def _stored_rows(target: DbTarget, node_id: str) -> list[tuple[int, str, bytes | None]]:
    db = open_database(target)
    try:
        rows = db.execute(
            "SELECT seq, body, deflated FROM messages WHERE node_id = ? AND type = 'telemetry'"
            " ORDER BY seq",
            (node_id,),
        ).fetchall()
    finally:
        db.close()
    return [(int(seq), str(body), None if d is None else bytes(d)) for seq, body, d in rows]


async def test_telemetry_is_stored_as_the_deflate_stream_it_came_in_and_reads_back_whole(
    coordinator: Coordinator, store_target: DbTarget
) -> None:
    node = Node()
    async with session(coordinator, node) as link:
        await link.send(profile_frame(node, 1, link.attest.body.nonce))
        assert await link.recv() == ack(1)
        # Sent back to back, before any ack: each stored row must be its own frame's.
        for seq in (2, 3, 4):
            await link.send(wrap(TelemetryBody(**_batch(seq)), seq))
        assert [await link.recv() for _ in range(3)] == [ack(2), ack(3), ack(4)]
    store = coordinator.store
    read = store.nodes.messages(node.node_id, "telemetry")
    assert [(m.seq, m.body) for m in read] == [(seq, _batch(seq)) for seq in (2, 3, 4)]
    rows = _stored_rows(store_target, node.node_id)
    text = sum(len(msgspec.json.encode(_batch(seq))) for seq in (2, 3, 4))
    # Both stores keep the frames as they came.
    assert [(seq, body) for seq, body, _ in rows] == [(2, ""), (3, ""), (4, "")]
    deflated = [d for _, _, d in rows]
    assert all(d is not None for d in deflated)
    size = sum(len(d) for d in deflated if d is not None)
    assert size * 5 < text
    # Quotas and retention count what is stored: the profile's text, the frames deflated.
    db = open_database(store_target)
    try:
        (profile,) = db.execute(
            "SELECT length(CAST(body AS BLOB)) FROM messages WHERE type = 'profile'"
        ).fetchone()
    finally:
        db.close()
    assert store.retention.stored_bytes(node.node_id) == profile + size


async def test_telemetry_that_came_uncompressed_is_stored_as_text(
    coordinator: Coordinator, store_target: DbTarget
) -> None:
    node = Node()
    async with session(coordinator, node, compression=None) as link:
        await link.send(wrap(TelemetryBody(**_batch(1)), 1))
        assert await link.recv() == ack(1)
    [(seq, body, deflated)] = _stored_rows(store_target, node.node_id)
    assert (seq, deflated) == (1, None)
    assert msgspec.json.decode(body) == _batch(1)
    [message] = coordinator.store.nodes.messages(node.node_id, "telemetry")
    assert message.body == _batch(1)


# ------------------------------------------------------------------ key and CLI


def test_key_command_prints_the_key_id_and_public_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["key", "--create", "--state-dir", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "key id:      ed25519:" in out
    public = out.split("public key:")[1].strip()
    assert crypto.key_id(crypto.b64decode(public)) in out
    assert os.stat(tmp_path / "s" / "coordinator.key").st_mode & 0o777 == 0o600
    assert cli.main(["key", "--state-dir", str(tmp_path / "s")]) == 0
    assert capsys.readouterr().out == out  # the same key, read


def test_key_readable_by_others_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["key", "--create", "--state-dir", str(tmp_path)]) == 0
    (tmp_path / "coordinator.key").chmod(0o644)
    assert cli.main(["key", "--state-dir", str(tmp_path)]) == cli.EXIT_ERROR
    assert "error [key_permissions]" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [[], ["serve"], ["serve", "--db", "x.db", "--port", "70000"], ["frobnicate"]],
)
def test_bad_arguments_exit_2_with_a_code(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == cli.EXIT_USAGE
    assert "error [bad_argument]" in capsys.readouterr().err


def test_serve_prints_its_urls_and_exits_cleanly_on_sigterm(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "coordinator.cli", "serve", "--port", "0"]
    command += ["--db", str(tmp_path / "c.db"), "--state-dir", str(tmp_path / "s")]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as process:
        assert process.stdout is not None
        listening = process.stdout.readline()
        dashboard = process.stdout.readline()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        process.stdout.close()
    assert listening.startswith("listening on ws://127.0.0.1:")
    assert listening.rstrip().endswith("/agent")
    assert dashboard.startswith("dashboard at http://127.0.0.1:")
