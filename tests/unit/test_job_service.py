"""The coordinator's JobService without a server: offers out, reports in, one way.

Real parts without sockets: a real Store on a SQLite file, the server's own OpenSessions
(no node connected: what is offered waits in the store), the coordinator's real key.
"""

from __future__ import annotations

import ast
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import msgspec
import pytest
from support.coordinator_peer import Peer, signed_receipt
from support.job_service import Jobs, jobs_in

from agent.protocol import dsse
from agent.protocol.errors import AuthError
from agent.protocol.jobs import sign_offer, verify_offer
from agent.protocol.messages import JobLog, JobLogBody, JobResult, JobStatus, JobStatusBody
from coordinator.errors import JobError
from coordinator.images import ImagePinner
from coordinator.job_service import JobService
from coordinator.sessions import OpenSessions
from coordinator.store import Store
from oci import Credentials

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


class _Registry(ImagePinner):
    """The registry's side of pinning (a tag's digest), counting what it is asked."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[str] = []

    def _resolve(self, image: str, logins: Mapping[str, Credentials]) -> str:
        self.asked.append(image)
        return image.rsplit(":", 1)[0] + "@sha256:" + "b" * 64


def _pinning(jobs: Jobs, monkeypatch: pytest.MonkeyPatch) -> tuple[_Registry, list[str]]:
    registry = _Registry()
    jobs.service = JobService(jobs.store, jobs.key, OpenSessions(), time.time, registry)
    signed: list[str] = []

    def counted(offer: Any, key: Any, keyid: str) -> Any:
        signed.append(offer.job_id)
        return sign_offer(offer, key, keyid)

    monkeypatch.setattr("coordinator.offers.sign_offer", counted)
    jobs.seen()
    return registry, signed


async def test_a_tag_is_pinned_and_its_offer_signed_once(
    jobs: Jobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry, signed = _pinning(jobs, monkeypatch)
    job_id = await jobs.service.submit(jobs.peer.node_id, SPEC | {"image": "busybox:1.36"})
    assert registry.asked == ["busybox:1.36"]
    assert signed == [job_id]
    job = jobs.service.get(job_id)
    assert job is not None
    trusted = {jobs.key.key_id: jobs.key.public_key}
    envelope = msgspec.convert(job.offer, dsse.Envelope)
    offer = verify_offer(
        envelope, trusted, job_id=job_id, node_id=jobs.peer.node_id, now=time.time()
    )
    assert offer.spec == SPEC | {"image": "busybox@sha256:" + "b" * 64}


@pytest.mark.parametrize(
    ("spec", "ttl_s", "code"),
    [
        ({"image": "busybox:1", "command": ["x"], "bogus": 1}, 60.0, "unknown_field"),
        ({"image": "busybox:1", "command": [object()]}, 60.0, "bad_spec"),  # not JSON
        ({"image": "busybox:1", "command": ["x"], "timeout_s": -1}, 60.0, "bad_value"),
        ({"image": "busybox:1", "command": ["x"]}, -1.0, "bad_ttl"),
        (["busybox:1"], 60.0, "bad_spec"),
    ],
    ids=["unknown-field", "not-json", "bad-value", "bad-ttl", "not-an-object"],
)
async def test_a_submission_a_node_would_refuse_never_reaches_the_registry(
    jobs: Jobs, monkeypatch: pytest.MonkeyPatch, spec: Any, ttl_s: float, code: str
) -> None:
    registry, signed = _pinning(jobs, monkeypatch)
    with pytest.raises(JobError) as refused:
        await jobs.service.submit(jobs.peer.node_id, spec, ttl_s=ttl_s)
    assert refused.value.code == code
    assert (registry.asked, signed, jobs.service.recent()) == ([], [], [])


async def test_a_pinned_reference_no_node_reads_is_refused_and_nothing_stored(
    jobs: Jobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry, signed = _pinning(jobs, monkeypatch)
    monkeypatch.setattr(registry, "_resolve", lambda image, logins: "Busybox@sha256:NOT-HEX")
    with pytest.raises(JobError) as refused:
        await jobs.service.submit(jobs.peer.node_id, SPEC | {"image": "busybox:1"})
    assert refused.value.code == "bad_value"
    assert (signed, jobs.service.recent()) == ([], [])


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
