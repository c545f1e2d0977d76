"""The coordinator's JobService without a server: offers out, reports in, one way.

Real parts without sockets: a real Store on a SQLite file, the server's own OpenSessions
(no node connected: what is offered waits in the store), the coordinator's real key.
"""

from __future__ import annotations

import ast
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from support.coordinator_peer import Peer, signed_receipt
from support.job_service import Jobs, jobs_in

from agent.protocol import dsse
from agent.protocol.errors import AuthError
from agent.protocol.jobs import verify_offer
from agent.protocol.messages import JobLog, JobLogBody, JobResult, JobStatus, JobStatusBody
from coordinator.errors import JobError
from coordinator.store import Store

SPEC: dict[str, Any] = {"image": "busybox@sha256:" + "a" * 64, "command": ["echo", "hi"]}
COORDINATOR = Path(__file__).resolve().parents[2] / "coordinator"


@pytest.fixture
def jobs(tmp_path: Path) -> Iterator[Jobs]:
    with jobs_in(tmp_path) as made:
        yield made


async def test_an_offer_to_a_node_never_seen_is_refused_and_stores_nothing(jobs: Jobs) -> None:
    with pytest.raises(JobError) as refused:
        await jobs.service.submit(jobs.peer.node_id, SPEC)
    assert refused.value.code == "unknown_node"
    assert jobs.service.recent() == []


async def test_offer_and_cancel_to_an_offline_node_wait_in_its_stream_in_order(
    jobs: Jobs,
) -> None:
    jobs.seen()
    job_id = await jobs.service.submit(jobs.peer.node_id, SPEC)
    await jobs.service.cancel(job_id, "changed my mind")
    await jobs.service.cancel(job_id)  # under way already: nothing more
    pending = jobs.store.streams.outbound(jobs.peer.node_id).pending
    assert [(seq, kind) for seq, kind, _ in pending] == [(1, "job_offer"), (2, "job_cancel")]
    envelope = msgspec.convert(pending[0][2]["offer"], dsse.Envelope)
    trusted = {jobs.key.key_id: jobs.key.public_key}
    offer = verify_offer(
        envelope, trusted, job_id=job_id, node_id=jobs.peer.node_id, now=time.time()
    )
    assert offer.spec == SPEC
    job = jobs.service.get(job_id)
    assert job is not None
    assert (job.state, job.offer_seq, job.cancel_reason) == ("offered", 1, "changed my mind")


async def test_reports_change_the_job_once_and_a_receipt_not_of_the_node_changes_nothing(
    jobs: Jobs,
) -> None:
    jobs.seen()
    job_id = await jobs.service.submit(jobs.peer.node_id, SPEC)
    node = jobs.peer.node_id
    running = JobStatus(v=1, seq=1, body=JobStatusBody(job_id=job_id, state="running"))
    assert jobs.service.report(node, running, 2.0) == "stored"
    assert jobs.service.report(node, running, 3.0) == "duplicate"
    log = JobLog(v=1, seq=2, body=JobLogBody(job_id=job_id, stream="stdout", data="hi\n"))
    assert jobs.service.report(node, log, 4.0) == "stored"
    row = jobs.service.get(job_id)
    assert row is not None
    offer = msgspec.convert(row.offer, dsse.Envelope)
    signed = verify_offer(
        offer,
        {jobs.key.key_id: jobs.key.public_key},
        job_id=job_id,
        node_id=node,
        now=time.time(),
    )
    forger = Peer()
    forger.node_id = node  # claims to be the node, signs with its own key
    with pytest.raises(AuthError):
        jobs.service.report(node, JobResult(v=1, seq=3, body=signed_receipt(forger, signed)), 5.0)
    assert jobs.store.nodes.all_seqs(node) == [1, 2]
    result = JobResult(v=1, seq=3, body=signed_receipt(jobs.peer, signed))
    assert jobs.service.report(node, result, 6.0) == "stored"
    done = jobs.service.get(job_id)
    assert done is not None
    assert done.state == "running"  # a receipt records the result; job_status the state
    assert done.result is not None
    assert (done.result.chain_ok, done.result.problems) == (True, [])
    assert jobs.service.logs(job_id).stdout == "hi\n"


def test_the_store_composes_its_tables_and_no_module_leaves_a_stub_to_fill() -> None:
    assert Store.__bases__ == (object,)
    for path in sorted(COORDINATOR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Raise) and node.exc is not None:
                raised = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                assert not (isinstance(raised, ast.Name) and raised.id == "NotImplementedError"), (
                    f"{path.name}:{node.lineno}"
                )
