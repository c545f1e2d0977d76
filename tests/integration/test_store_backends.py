"""The store behaves the same on SQLite and on PostgreSQL (``store_target``: once each).

Exactly-once holds with two connections writing one node at once (two coordinators on one
PostgreSQL); jobs, deployments, the gateway's tables, the coordinator's stream and
retention read back what they wrote, on both.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from support.coordinator_peer import signed_receipt
from support.factories import request_record
from support.job_service import Jobs, jobs_in

from agent.protocol import dsse
from agent.protocol.jobs import verify_offer
from agent.protocol.messages import JobLog, JobLogBody, JobResult, JobStatus, JobStatusBody
from coordinator.db import DbTarget
from coordinator.deployments_store import KEEP_RETIRED
from coordinator.errors import JobError
from coordinator.presence_store import ALIVE_S
from coordinator.retention import Quotas
from coordinator.store import Added, Store

NODE = "node-aa"
SPEC: dict[str, Any] = {"image": "busybox@sha256:" + "a" * 64, "command": ["echo", "hi"]}


@pytest.fixture
def store(store_target: DbTarget) -> Iterator[Store]:
    store = Store(store_target)
    store.nodes.seen(NODE, "key", 1.0)
    yield store
    store.close()


@pytest.fixture
def jobs(tmp_path: Path, store_target: DbTarget) -> Iterator[Jobs]:
    with jobs_in(tmp_path, store_target) as made:
        made.seen()
        yield made


def test_a_message_is_stored_once_and_a_resend_is_a_duplicate(store: Store) -> None:
    assert store.add(NODE, 1, "telemetry", {"samples": []}, 2.0) == "stored"
    assert store.add(NODE, 2, "node_status", {"state": "idle"}, 3.0) == "stored"
    assert store.add(NODE, 2, "node_status", {"state": "busy"}, 4.0) == "duplicate"
    assert store.add(NODE, 1, "telemetry", {"samples": []}, 4.0) == "duplicate"
    assert store.nodes.all_seqs(NODE) == [1, 2]
    latest = store.nodes.latest(NODE, "node_status")
    assert latest is not None
    assert (latest.body, latest.received) == ({"state": "idle"}, 3.0)
    with pytest.raises(ValueError, match="no node"):
        store.add("node-never-seen", 1, "telemetry", {"samples": []}, 2.0)


def test_two_writers_storing_one_node_at_once_store_each_seq_once(
    store: Store, store_target: DbTarget
) -> None:
    # Two coordinators (two connections), both given the node's same stream at once: an
    # agent that reconnected to the other while its first session was still storing.
    seqs = range(1, 201)
    outcomes: list[list[Added | Exception]] = [[], []]
    start = threading.Barrier(2)

    def write(into: list[Added | Exception]) -> None:
        other = Store(store_target)
        try:
            start.wait()
            for seq in seqs:
                try:
                    into.append(other.add(NODE, seq, "telemetry", {"samples": [seq]}, 2.0))
                except Exception as exc:  # what the assertion below shows
                    into.append(exc)
        finally:
            other.close()

    threads = [threading.Thread(target=write, args=(into,)) for into in outcomes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [o for o in outcomes[0] + outcomes[1] if isinstance(o, Exception)] == []
    stored = [
        seq
        for seq in seqs
        for into in outcomes
        if into[seq - 1] == "stored"  # each seq stored by exactly one of the two
    ]
    assert sorted(stored) == list(seqs)
    assert store.nodes.all_seqs(NODE) == list(seqs)
    assert store.nodes.last_agent_seq(NODE) == 200


def test_over_its_quota_a_node_loses_its_oldest_telemetry_never_a_job_status(
    store_target: DbTarget,
) -> None:
    store = Store(store_target, Quotas(node_bytes=2000))
    try:
        store.nodes.seen(NODE, "key", 1.0)
        batch = {"samples": ["x" * 400]}
        for seq in range(1, 11):
            assert store.add(NODE, seq, "telemetry", batch, 2.0) == "stored"
        status = {"job_id": "j", "state": "running", "detail": "y" * 3000}
        assert store.add(NODE, 11, "job_status", status, 3.0) == "stored"
        assert store.nodes.all_seqs(NODE)[-1] == 11
        assert store.nodes.all_seqs(NODE)[0] > 1  # the oldest batches made room
        assert store.add(NODE, 12, "telemetry", {"samples": ["z" * 5000]}, 4.0) == "shed"
        assert store.nodes.latest(NODE, "telemetry") is not None
    finally:
        store.close()


def test_retention_deletes_old_telemetry_and_the_last_seq_stays(store: Store) -> None:
    for seq in range(1, 6):
        store.add(NODE, seq, "telemetry", {"samples": [seq]}, float(seq * 100))
    store.add(NODE, 6, "node_status", {"state": "idle"}, 50.0)
    assert store.retention.prune_telemetry(received_before=250, keep_rows=2) == 3
    assert store.nodes.all_seqs(NODE) == [4, 5, 6]
    assert store.nodes.last_agent_seq(NODE) == 6
    assert store.retention.prune_telemetry(received_before=250, keep_rows=2) == 0


def test_the_coordinators_stream_is_kept_until_acked_and_acks_never_go_back(
    store: Store,
) -> None:
    for seq in (1, 2, 3):
        body = {"job_id": f"j{seq}", "reason": ""}
        assert store.streams.add_outbound(NODE, "job_cancel", body) == seq
    store.streams.ack_outbound(NODE, 2)
    store.streams.ack_outbound(NODE, 1)  # a late, older ack
    outbound = store.streams.outbound(NODE)
    assert outbound.acked == 2
    assert [seq for seq, _, _ in outbound.pending] == [3]


async def test_jobs_take_offers_reports_logs_and_receipts_once(jobs: Jobs) -> None:
    node = jobs.peer.node_id
    first = await jobs.service.submit(node, SPEC, job_id="job-1")
    second = await jobs.service.submit(node, SPEC, job_id="job-2")
    with pytest.raises(JobError) as taken:
        await jobs.service.submit(node, SPEC, job_id="job-1")
    assert taken.value.code == "job_exists"
    assert [seq for seq, _, _ in jobs.store.streams.outbound(node).pending] == [1, 2]
    assert [j.job_id for j in jobs.service.recent()] == [second, first]
    running = JobStatus(v=1, seq=1, body=JobStatusBody(job_id=first, state="running"))
    assert jobs.service.report(node, running, 2.0) == "stored"
    assert jobs.service.report(node, running, 3.0) == "duplicate"
    # A NUL in an agent's text: PostgreSQL's text cannot hold it, the log still goes in.
    text = "hi\x00there\n"
    log = JobLog(v=1, seq=2, body=JobLogBody(job_id=first, stream="stdout", data=text))
    assert jobs.service.report(node, log, 4.0) == "stored"
    row = jobs.service.get(first)
    assert row is not None
    signed = verify_offer(
        msgspec.convert(row.offer, dsse.Envelope),
        {jobs.key.key_id: jobs.key.public_key},
        job_id=first,
        node_id=node,
        now=time.time(),
    )
    result = JobResult(v=1, seq=3, body=signed_receipt(jobs.peer, signed))
    assert jobs.service.report(node, result, 5.0) == "stored"
    done = jobs.service.get(first)
    assert done is not None
    assert (done.state, done.log_bytes) == ("running", len(text.encode()))
    assert done.result is not None
    assert done.result.problems == []
    assert jobs.service.logs(first).stdout in (text, text.replace("\x00", "\ufffd"))
    assert jobs.store.jobs.receipt_chain(node).receipts == 1
    assert [j.job_id for j in jobs.store.jobs.recent(node_id=node, limit=1)] == [second]


async def test_deployments_keep_their_replicas_and_only_the_newest_retired(jobs: Jobs) -> None:
    table, node = jobs.store.deployments, jobs.peer.node_id
    assert table.add("web", SPEC, 2, 60.0, 1.0)
    assert not table.add("web", SPEC, 3, 60.0, 2.0)
    for n in range(KEEP_RETIRED + 2):
        job_id = await jobs.service.submit(node, SPEC, job_id=f"web-{n}")
        table.add_replica("web", job_id, node, float(n), float(n) + 60)
        table.retire("web", job_id, "failed", float(n))
    live = await jobs.service.submit(node, SPEC, job_id="web-live")
    table.add_replica("web", live, node, 100.0, 160.0)
    table.renewed(live, 220.0)
    assert [(r.job_id, r.renewed_until, r.state) for r in table.replicas("web")] == [
        (live, 220.0, "offered")
    ]
    retired = table.replicas("web", retired=True)
    assert len(retired) == KEEP_RETIRED
    assert retired[0].job_id == f"web-{KEEP_RETIRED + 1}"  # newest first
    table.delete("web")
    assert (table.get("web"), table.all()) == (None, [])


def test_the_gateways_keys_records_and_live_jobs(store: Store) -> None:
    key, text = store.api_keys.create("alice", 60, 1.0)
    assert store.api_keys.find(text) == key
    assert store.api_keys.revoke(key.key_id, 2.0).revoked == 2.0
    assert [k.key_id for k in store.api_keys.all()] == [key.key_id]
    records = [request_record(n, node_id=NODE, ttfb_s=0.125) for n in range(10)]
    store.requests.add(records[:6], keep_rows=4)
    store.requests.add(records[6:], keep_rows=4)
    assert store.requests.recent(100) == records[:5:-1]
    assert store.services.live() == []


def test_a_session_counts_while_its_coordinator_is_alive_and_one_store_leads(
    store: Store, store_target: DbTarget
) -> None:
    presence = store.presence
    presence.alive("coord-1", 100.0)
    presence.opened(NODE, "coord-1", "s1", 100.0)
    assert presence.connected(100.0 + ALIVE_S) == {NODE}
    assert presence.connected(101.0 + ALIVE_S) == set()  # killed -9: it stopped saying so
    presence.alive("coord-1", 200.0)
    presence.closed(NODE, "s0")  # an older session's end: the newer one stays
    assert presence.connected(200.0) == {NODE}
    presence.closed(NODE, "s1")
    assert presence.connected(200.0) == set()
    other = Store(store_target)
    try:
        assert presence.lead()
        # A SQLite file has one coordinator; on PostgreSQL the first one leads, alone.
        assert other.presence.lead() is (not store.shared)
    finally:
        other.close()
    if store.shared:
        store.close()  # the lead's connection gone, the lock goes with it
        assert other_leads(store_target)


def other_leads(target: DbTarget) -> bool:
    other = Store(target)
    try:
        return other.presence.lead()
    finally:
        other.close()


def test_the_stream_out_is_read_whole_while_another_connection_acks_it(
    store: Store, store_target: DbTarget, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a handshake reads to resume the stream (the acked seq and what is pending)
    # while the old session's ack commits on another connection, right after the read's
    # first statement: never the acked seq from before the ack with the rows from after
    # it (the node, which has the message, would be refused: ack_ahead).
    seq = store.streams.add_outbound(NODE, "job_cancel", {"job_id": "j", "reason": ""})
    other = Store(store_target)
    db = store._db  # the interleaving is forced between its statements
    real = db.execute

    def execute_then_ack(sql: str, args: tuple[Any, ...] = ()) -> Any:
        cursor = real(sql, args)
        monkeypatch.setattr(db, "execute", real)
        other.streams.ack_outbound(NODE, seq)
        return cursor

    try:
        monkeypatch.setattr(db, "execute", execute_then_ack)
        outbound = store.streams.outbound(NODE)
    finally:
        other.close()
    assert (outbound.acked, [s for s, _, _ in outbound.pending]) in [(0, [seq]), (seq, [])]
    store.streams.resume_sender(NODE, seq)  # the node stored it: no ack_ahead


def test_coordinators_gone_for_long_are_forgotten_with_their_sessions(store: Store) -> None:
    presence = store.presence
    presence.alive("gone", 100.0)
    presence.opened(NODE, "gone", "s1", 100.0)
    presence.alive("here", 5000.0)
    presence.opened("node-bb", "here", "s2", 5000.0)
    assert presence.forget_dead(1000.0) == 1
    assert presence.connected(100.0) == {"node-bb"}  # "gone" and its session forgotten
    assert presence.forget_dead(1000.0) == 0
