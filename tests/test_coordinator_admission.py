"""The reference coordinator's admission, rate limits, storage quota and retention.

A real Coordinator on 127.0.0.1:0 with a real SQLite file; the agent side is written here
with the protocol's own machines, so that every frame it sends is counted.
"""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import pytest
from test_coordinator import Clock, Node
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from agent.protocol import crypto, dsse
from agent.protocol.messages import (
    COORDINATOR_SENDS,
    Ack,
    AckBody,
    EnvelopeBody,
    Error,
    JobStatusBody,
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
from coordinator.errors import ConfigError
from coordinator.server import Coordinator, Settings
from coordinator.store import Store

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
    ws: ClientConnection, coordinator: Coordinator, node: Node, token: str | None = None
) -> Welcome | Error:
    """The agent's handshake: the welcome, or the coordinator's coded refusal."""
    hs = AgentHandshake(
        node_id=node.node_id,
        public_key=node.public_key,
        sign=lambda data: crypto.sign(node.key, data),
        verify=crypto.verify,
        pinned_keys={coordinator.key.key_id: coordinator.key.public_key},
        agent_version="0.1.0",
        nonce=crypto.b64encode(secrets.token_bytes(32)),
        last_coordinator_seq=0,
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
    coordinator: Coordinator, node: Node, token: str | None = None
) -> AsyncIterator[tuple[ClientConnection, Welcome]]:
    async with connect(coordinator.url) as ws:
        welcome = await handshake(ws, coordinator, node, token)
        assert isinstance(welcome, Welcome), welcome
        yield ws, welcome


def telemetry(seq: int, size: int = 0) -> str:
    """A telemetry frame; with ``size``, one sample padded to about that many bytes."""
    samples = [{"t": float(seq), "pad": "x" * size}] if size else []
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


# ------------------------------------------------------------------ admission


async def test_allow_list_admits_listed_ids_and_keys_and_refuses_others(tmp_path: Path) -> None:
    by_id, by_key, stranger = Node(), Node(), Node()
    allowed = frozenset({by_id.node_id, crypto.b64encode(by_key.public_key)})
    async with started(tmp_path, admission="allow_list", allowed=allowed) as coordinator:
        assert await refusal(coordinator, stranger) == "not_admitted"
        for node in (by_id, by_key):
            async with welcomed(coordinator, node):
                pass
        assert coordinator.store.nodes.get(stranger.node_id) is None


async def test_token_admission_enrols_a_new_node_once_with_a_valid_token(tmp_path: Path) -> None:
    node = Node()
    tokens = frozenset({TOKEN})
    async with started(tmp_path, admission="token", enrolment_tokens=tokens) as coordinator:
        assert await refusal(coordinator, node) == "enrolment_required"
        assert await refusal(coordinator, node, "enrol-" + "8" * 20) == "enrolment_required"
        assert coordinator.store.nodes.get(node.node_id) is None
        async with welcomed(coordinator, node, TOKEN):
            pass
        async with welcomed(coordinator, node):  # known now: no token needed
            pass


async def test_handshakes_from_new_keys_are_capped_and_known_nodes_still_connect(
    tmp_path: Path,
) -> None:
    known = Node()
    async with started(tmp_path, new_keys_per_s=0.001, new_keys_burst=2) as coordinator:
        async with welcomed(coordinator, known):
            pass
        async with welcomed(coordinator, Node()):
            pass
        assert await refusal(coordinator, Node()) == "rate_limited"
        assert len(coordinator.store.nodes.all()) == 2
        async with welcomed(coordinator, known):  # a known key is not a new one
            pass


# ------------------------------------------------------------------ rates


async def test_a_stream_over_the_rate_is_held_with_one_rate_limited_never_dropped_or_closed(
    tmp_path: Path,
) -> None:
    node = Node()
    async with started(tmp_path, frames_per_s=2.0, frames_burst=2, abuse_strikes=2) as coordinator:
        async with welcomed(coordinator, node) as (ws, _):
            # As an agent replays its backlog after a reconnect: new messages, back to back.
            for seq in range(1, 7):
                await ws.send(telemetry(seq))
            seen = await answers_until_ack(ws, 6)
            assert codes(seen) == ["rate_limited"]  # once, as it went over
            assert coordinator.connected() == {node.node_id}
        assert coordinator.store.nodes.all_seqs(node.node_id) == [1, 2, 3, 4, 5, 6]


async def test_a_node_that_goes_on_over_its_rate_with_nothing_new_is_closed_with_a_code(
    tmp_path: Path,
) -> None:
    node = Node()
    async with started(tmp_path, frames_per_s=1.0, frames_burst=2, abuse_strikes=2) as coordinator:
        async with welcomed(coordinator, node) as (ws, _):
            await ws.send(telemetry(1))
            for _ in range(10):  # acks of nothing: frames that move no stream on
                await ws.send(encode_frame(Ack(v=1, body=AckBody(seq=0))))
            seen = await until_closed(ws)
        assert codes(seen) == ["rate_limited"]
        assert (ws.close_code, ws.close_reason) == (1008, "rate_limited")
        assert coordinator.store.nodes.all_seqs(node.node_id) == [1]


# ------------------------------------------------------------------ storage


async def test_a_flood_of_large_telemetry_keeps_the_store_bounded(tmp_path: Path) -> None:
    node, quota = Node(), 4 * 1024 * 1024
    async with (
        started(tmp_path, node_quota_bytes=quota) as coordinator,
        welcomed(coordinator, node) as (ws, _),
    ):
        for seq in range(1, 51):
            await ws.send(telemetry(seq, 1000 * 1000))
        seen = await answers_until_ack(ws, 50)
        store = coordinator.store
        assert codes(seen) == []  # each fits the quota: the oldest make room
        assert store.retention.stored_bytes(node.node_id) <= quota
        kept = store.nodes.all_seqs(node.node_id)
        assert 1 <= len(kept) <= 4
        assert kept[-1] == 50
        assert store.nodes.last_agent_seq(node.node_id) == 50
    on_disk = sum(p.stat().st_size for p in tmp_path.glob("coordinator.db*"))
    assert on_disk < 16 * 1024 * 1024  # 50 MB were sent


async def test_over_the_quota_messages_are_shed_with_a_code_and_abuse_is_closed(
    tmp_path: Path,
) -> None:
    node, quota = Node(), 512 * 1024
    async with started(tmp_path, node_quota_bytes=quota, abuse_strikes=3) as coordinator:
        async with welcomed(coordinator, node) as (ws, _):
            await ws.send(telemetry(1, 1000 * 1000))
            await answers_until_ack(ws, 1)  # stored (shed), then the coordinator says so
            shed = await recv(ws)
            assert isinstance(shed, Error)
            assert (shed.body.code, shed.body.ref_seq) == ("quota_exceeded", 1)
            # A job's status is never shed: the job's state is made of it.
            status = JobStatusBody(job_id="job-1", state="refused", code="busy")
            await ws.send(encode_frame(wrap(status, 2)))
            assert codes(await answers_until_ack(ws, 2)) == []
            for seq in (3, 4, 5):
                await ws.send(telemetry(seq, 1000 * 1000))
            seen = await until_closed(ws)
        assert codes(seen) == ["quota_exceeded"] * 3
        assert (ws.close_code, ws.close_reason) == (1008, "quota_exceeded")
        store = coordinator.store
        assert store.nodes.all_seqs(node.node_id) == [1, 2, 3, 4, 5]  # shed, under their seqs
        shed_body = {"samples": [], "dropped": 1}
        assert [m.body for m in store.nodes.messages(node.node_id, "telemetry")] == [shed_body] * 4
        assert store.nodes.messages(node.node_id, "job_status")[0].body["code"] == "busy"
        assert store.retention.stored_bytes(node.node_id) <= quota


async def test_stale_profiles_never_acknowledged_leave_one_attest_request_outstanding(
    tmp_path: Path,
) -> None:
    node = Node()
    async with started(tmp_path) as coordinator:
        async with welcomed(coordinator, node) as (ws, _):
            for seq in range(1, 6):
                never_issued = crypto.b64encode(secrets.token_bytes(32))
                profile = {"gpus": [], "host": {"cpus": 1}}
                envelope = dsse.attest_profile(
                    profile, never_issued, node.node_id, node.key, node.key_id
                )
                body = ProfileBody(
                    attestation=msgspec.convert(msgspec.to_builtins(envelope), EnvelopeBody)
                )
                await ws.send(encode_frame(wrap(body, seq)))
                await answers_until_ack(ws, seq)
        latest = coordinator.store.nodes.latest_profile(node.node_id)
        assert latest is not None
        assert (latest.seq, latest.verified) == (5, False)
        # The first request was never acknowledged: no other joins it.
        assert len(coordinator.store.streams.outbound(node.node_id).pending) == 1


async def test_retention_deletes_old_telemetry_and_welcome_never_goes_back(
    tmp_path: Path,
) -> None:
    node, clock = Node(), Clock()
    async with started(tmp_path, clock, telemetry_keep_rows=3) as coordinator:
        async with welcomed(coordinator, node) as (ws, _):
            for seq in range(1, 11):
                await ws.send(telemetry(seq))
            await answers_until_ack(ws, 10)
        assert coordinator.prune() == 7
        assert coordinator.store.nodes.all_seqs(coordinator_node := node.node_id) == [8, 9, 10]
        clock.offset += 8 * 86400  # past a week
        assert coordinator.prune() == 3
        assert coordinator.store.nodes.all_seqs(coordinator_node) == []
        async with welcomed(coordinator, node) as (ws, welcome):
            assert welcome.body.last_agent_seq == 10
            # A resend of a seq retention deleted is a duplicate: acked, not stored again.
            await ws.send(telemetry(5))
            await answers_until_ack(ws, 10)
            await ws.send(telemetry(11))
            await answers_until_ack(ws, 11)
        assert coordinator.store.nodes.all_seqs(coordinator_node) == [11]


async def test_retention_runs_by_itself_every_interval(tmp_path: Path) -> None:
    async with started(tmp_path, retention_interval_s=0.01) as coordinator:
        for _ in range(3):  # at start, then again and again
            async with asyncio.timeout(10):
                await coordinator.retained.wait()
            coordinator.retained.clear()


# ------------------------------------------------------------------ settings


@pytest.mark.parametrize(
    "settings",
    [
        {"frames_per_s": 0},
        {"node_quota_bytes": -1},
        {"new_keys_per_s": float("nan")},
        {"telemetry_keep_s": float("inf")},
        {"admission": "anyone"},
        {"admission": "allow_list"},
        {"admission": "token"},
        {"admission": "token", "enrolment_tokens": frozenset({"short"})},
    ],
)
def test_settings_out_of_range_are_refused_with_a_code(settings: dict[str, object]) -> None:
    with pytest.raises(ConfigError) as refused:
        Settings(**settings)  # type: ignore[arg-type]
    assert refused.value.code == "bad_setting"


@pytest.mark.parametrize(
    ("extra", "code"),
    [
        (["--admission", "token"], "bad_setting"),
        (
            ["--admission", "token", "--enrolment-tokens", "/nonexistent/tokens"],
            "tokens_unreadable",
        ),
        (["--node-quota-mib", "-3"], "bad_setting"),
        (["--telemetry-keep-days", "nan"], "bad_setting"),
    ],
)
def test_serve_refuses_bad_limits_with_exit_2_and_a_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], code: str
) -> None:
    argv = ["serve", "--port", "0", "--db", str(tmp_path / "c.db"), *extra]
    assert cli.main(argv) == cli.EXIT_USAGE
    assert f"error [{code}]" in capsys.readouterr().err
    assert not (tmp_path / "c.db").exists()


async def test_a_store_of_version_3_is_upgraded_with_each_nodes_last_seq_and_bytes(
    tmp_path: Path,
) -> None:
    node = Node()
    async with started(tmp_path) as coordinator, welcomed(coordinator, node) as (ws, _):
        for seq in (1, 2, 3):
            await ws.send(telemetry(seq))
        await answers_until_ack(ws, 3)
    before = Store(tmp_path / "coordinator.db")
    stored = before.retention.stored_bytes(node.node_id)
    before.close()
    assert stored > 0
    with sqlite3.connect(tmp_path / "coordinator.db") as db:  # as version 3 left it
        db.execute("ALTER TABLE nodes DROP COLUMN agent_seq")
        db.execute("ALTER TABLE nodes DROP COLUMN stored_bytes")
        db.execute("PRAGMA user_version = 3")
    db.close()
    after = Store(tmp_path / "coordinator.db")
    try:
        assert after.nodes.last_agent_seq(node.node_id) == 3
        assert after.retention.stored_bytes(node.node_id) == stored
    finally:
        after.close()
