"""The reference coordinator's admission, rate limits, storage quota and retention.

A real Coordinator on 127.0.0.1:0 with a real SQLite file; the agent side is written here
with the protocol's own machines, so that every frame it sends is counted.
"""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
from pathlib import Path

import msgspec
from support.admission import (
    TOKEN,
    answers_until_ack,
    codes,
    recv,
    refusal,
    started,
    telemetry,
    until_closed,
    welcomed,
)
from support.factories import deflated_frame
from support.nodes import Clock, Node

from agent.protocol import crypto, dsse
from agent.protocol.messages import (
    Ack,
    AckBody,
    EnvelopeBody,
    Error,
    JobStatusBody,
    ProfileBody,
    encode_frame,
    wrap,
)
from coordinator.store import Store

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
        assert 1 <= len(kept) <= 5  # ~1 MB each, stored deflated: ~750 KB
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


def test_a_store_of_version_8_keeps_its_text_rows_and_stores_frames_deflated(
    tmp_path: Path,
) -> None:
    path, batch = tmp_path / "coordinator.db", {"samples": [{"t": 1.0}], "dropped": 0}
    store = Store(path)
    store.nodes.seen("node-aa", "key", 0.0)
    assert store.add("node-aa", 1, "telemetry", batch, 1.0) == "stored"
    store.close()
    with sqlite3.connect(path) as db:  # as version 8 left it: no deflated frames
        db.execute("ALTER TABLE messages DROP COLUMN deflated")
        db.execute("PRAGMA user_version = 8")
    db.close()
    store = Store(path)
    try:
        frame = msgspec.json.encode({"v": 1, "type": "telemetry", "seq": 2, "body": batch})
        added = store.add("node-aa", 2, "telemetry", batch, 2.0, deflated=deflated_frame(frame))
        assert added == "stored"
        assert [m.body for m in store.nodes.messages("node-aa", "telemetry")] == [batch, batch]
    finally:
        store.close()
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT seq, deflated IS NULL FROM messages ORDER BY seq").fetchall()
        (version,) = db.execute("PRAGMA user_version").fetchone()
    db.close()
    assert (rows, version) == ([(1, 1), (2, 0)], 9)
