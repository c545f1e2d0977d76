"""A job's declared outputs delivered to the offer's upload targets: the job manager on the
real Docker engine and a real ledger, against a real S3 API (moto) and a hostile store."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from support import factories
from support.s3 import S3, running_s3
from support.store import Store, running_store

from agent.jobs.delivery import Delivery
from agent.jobs.manager import JobManager
from agent.jobs.node import NodeState
from agent.jobs.scheduler import Scheduler
from agent.jobs.uploader import RetryPolicy
from agent.link.identity import Identity, load_or_create
from agent.link.outbox import Outbox
from agent.protocol import crypto, dsse
from agent.protocol.bodies import EnvelopeBody, JobOfferBody
from agent.protocol.jobs import Offer, UploadTarget, sign_offer
from agent.protocol.messages import JobOffer, wrap
from hal.types import UNSUPPORTED
from sandbox.docker_api import DockerClient
from sandbox.policy import Policy
from sandbox.runner import Runner, RunnerConfig

KEY = crypto.generate_private_key()
KEY_ID = crypto.key_id(crypto.public_key_bytes(KEY))
_seqs = itertools.count(1)
_FAST = RetryPolicy(attempts=3, base_s=0.01, max_s=0.02, timeout_s=20)
RESULT = "hello upload\n" * 5000
RESULT_SHA = hashlib.sha256(RESULT.encode()).hexdigest()


@dataclass
class Node:
    tmp: Path
    docker: str
    image: str
    outbox: Outbox
    identity: Identity
    manager: JobManager | None = None

    def start(
        self,
        spool_max: int = 1 << 30,
        max_concurrent: int = 0,
        *,
        upload_hosts: list[str] | None = None,
        coordinator_host: str | None = None,
        retry: RetryPolicy = _FAST,
    ) -> JobManager:
        scheduler = Scheduler([factories.gpu(vendor="intel", backend="intel", uuid=UNSUPPORTED)])
        for unit in scheduler.units:
            scheduler.set_health(unit, "healthy")
        node = NodeState(scheduler)
        node.release("initialising")
        self.manager = JobManager(
            identity=self.identity,
            outbox=self.outbox,
            runner=Runner(DockerClient(self.docker), RunnerConfig(jobs_dir=self.tmp / "jobs")),
            # The stores here are on loopback: listed by the owner, as a presigned S3 store is.
            policy=Policy(
                allowed_images=[self.image],
                allowed_upload_hosts=["127.0.0.1"] if upload_hosts is None else upload_hosts,
            ),
            node=node,
            trusted_keys={KEY_ID: crypto.public_key_bytes(KEY)},
            wake=lambda: None,
            delivery=Delivery(self.tmp / "spool", max_bytes=spool_max, policy=retry),
            max_concurrent=max_concurrent,
            coordinator_host=coordinator_host,
        )
        return self.manager

    def messages(self, job_id: str) -> list[tuple[str, dict[str, Any]]]:
        out = []
        for entry in self.outbox.pending(0, 10_000):
            body = msgspec.json.decode(entry.body)
            if body.get("job_id") == job_id:
                out.append((entry.kind, body))
        return out

    def states(self, job_id: str) -> list[str]:
        return [b["state"] for kind, b in self.messages(job_id) if kind == "job_status"]

    def receipts(self, job_id: str) -> list[dict[str, Any]]:
        trusted = {self.identity.key_id: self.identity.public_key}
        return [
            dsse.verify_receipt(
                msgspec.convert(b["receipt"], dsse.Envelope), trusted, self.identity.node_id
            )
            for kind, b in self.messages(job_id)
            if kind == "job_result"
        ]

    async def offer(self, job_id: str, uploads: dict[str, UploadTarget], **spec: Any) -> None:
        now = time.time()
        body = {
            "image": self.image,
            "command": ["sh", "-c", f"printf '{RESULT}' > /output/result.txt"],
            "outputs": ["result.txt", "absent.txt"],
            "timeout_s": 60,
            **spec,
        }
        offer = Offer(
            job_id=job_id,
            node_id=self.identity.node_id,
            spec=body,
            issued_at=now,
            expires_at=now + 600,
            uploads=uploads,
        )
        envelope = msgspec.convert(
            sign_offer(offer, KEY, KEY_ID), EnvelopeBody, from_attributes=True
        )
        message = wrap(JobOfferBody(job_id=job_id, offer=envelope), next(_seqs))
        assert isinstance(message, JobOffer)
        assert self.manager is not None
        await self.manager.on_offer(message)


@pytest.fixture
async def node(tmp_path: Path, docker_engine: str, test_image_id: str) -> AsyncIterator[Node]:
    outbox = Outbox.open(tmp_path / "outbox.db")
    world = Node(tmp_path, docker_engine, test_image_id, outbox, load_or_create(tmp_path / "id"))
    yield world
    if world.manager is not None:
        await world.manager.shutdown()
    outbox.close()


@pytest.fixture
def s3() -> Iterator[S3]:
    with running_s3() as server:
        yield server


@pytest.fixture
def store() -> Iterator[Store]:
    with running_store() as running:
        yield running


async def test_outputs_reach_a_presigned_s3_url_before_the_job_is_reported_done(
    node: Node, s3: S3
) -> None:
    manager = node.start()
    await manager.recover()
    target = UploadTarget(url=s3.presign_put("jobs/up-1/result.txt"))
    await node.offer("up-1", {"result.txt": target})
    await manager.wait_idle()
    assert node.states("up-1") == ["accepted", "running", "uploading", "completed"]
    [receipt] = node.receipts("up-1")
    assert receipt["outputs"][0] == {
        "path": "result.txt",
        "status": "ok",
        "size_bytes": len(RESULT),
        "sha256": RESULT_SHA,
    }
    assert s3.sha256("jobs/up-1/result.txt") == RESULT_SHA
    assert s3.keys() == ["jobs/up-1/result.txt"]
    assert not (node.tmp / "spool" / "up-1").exists()
    assert manager.ledger.held("up-1") is None


async def test_a_store_that_fails_past_the_retries_ends_the_job_upload_failed(
    node: Node, store: Store
) -> None:
    manager = node.start()
    await manager.recover()
    store.script = [500] * 10
    await node.offer("up-2", {"result.txt": UploadTarget(url=f"{store.url}/r")})
    await manager.wait_idle()
    assert node.states("up-2") == ["accepted", "running", "uploading", "error"]
    assert node.messages("up-2")[-1][1]["code"] == "upload_failed"
    [receipt] = node.receipts("up-2")
    # The receipt still names what the job made: the failure is the delivery's.
    assert (receipt["state"], receipt["code"]) == ("error", "upload_failed")
    assert receipt["outputs"][0]["sha256"] == RESULT_SHA
    assert store.puts == 3
    assert not (node.tmp / "spool" / "up-2").exists()


async def test_a_store_that_is_down_ends_the_job_upload_failed(node: Node) -> None:
    manager = node.start()
    await manager.recover()
    with running_store() as gone:
        url = f"{gone.url}/r"
    await node.offer("up-3", {"result.txt": UploadTarget(url=url)})
    await manager.wait_idle()
    assert node.states("up-3")[-1] == "error"
    assert node.receipts("up-3")[0]["code"] == "upload_failed"


async def test_a_store_that_stays_down_is_retried_until_the_deadline_after_the_job_ended(
    node: Node,
) -> None:
    # No cap on attempts: only the deadline (a second after the job ended) ends them.
    retry = RetryPolicy(base_s=0.01, max_s=0.05, timeout_s=20, give_up_s=1.0)
    manager = node.start(retry=retry)
    await manager.recover()
    with running_store() as gone:
        url = f"{gone.url}/r"
    await node.offer("up-late", {"result.txt": UploadTarget(url=url)})
    await manager.wait_idle()
    assert node.states("up-late") == ["accepted", "running", "uploading", "error"]
    [receipt] = node.receipts("up-late")
    assert receipt["code"] == "upload_failed"
    [detail] = [b["detail"] for k, b in node.messages("up-late") if b.get("state") == "error"]
    attempts = int(detail.split("upload_failed: ")[1].split(" attempts")[0])
    assert attempts > 3  # many tries, not a count spent in a blink


@pytest.mark.parametrize(
    ("uploads", "code"),
    [
        ({"../result.txt": UploadTarget(url="https://x/y")}, "bad_upload_target"),
        ({"other.txt": UploadTarget(url="https://x/y")}, "bad_upload_target"),
        ({"result.txt": UploadTarget(url="file:///etc/shadow")}, "bad_upload_target"),
    ],
)
async def test_an_offer_with_a_bad_target_is_refused_and_nothing_runs(
    node: Node, uploads: dict[str, UploadTarget], code: str
) -> None:
    manager = node.start()
    await manager.recover()
    await node.offer("up-bad", uploads)
    assert node.states("up-bad") == ["refused"]
    assert node.messages("up-bad")[0][1]["code"] == code
    assert manager.tasks == {}


async def test_an_upload_host_the_owner_did_not_list_is_refused_and_nothing_runs(
    node: Node, s3: S3
) -> None:
    # As shipped: only the coordinator's own host, which the S3 store is not.
    manager = node.start(upload_hosts=["@coordinator"], coordinator_host="coordinator.example")
    await manager.recover()
    url = s3.presign_put("jobs/up-host/result.txt")
    await node.offer("up-host", {"result.txt": UploadTarget(url=url)})
    assert node.states("up-host") == ["refused"]
    refusal = node.messages("up-host")[0][1]
    assert refusal["code"] == "upload_host_refused"
    assert "127.0.0.1" in refusal["detail"]
    assert "Signature" not in refusal["detail"]  # a presigned URL's query is a credential
    assert manager.tasks == {}
    assert not (node.tmp / "spool" / "up-host").exists()
    assert s3.keys() == []
    assert manager.delivery is not None
    assert manager.delivery.reserve("next", 1 << 30)  # the refused offer holds no spool


async def test_the_coordinators_own_host_is_allowed_by_default(node: Node, store: Store) -> None:
    manager = node.start(upload_hosts=["@coordinator"], coordinator_host="127.0.0.1")
    await manager.recover()
    await node.offer("up-own", {"result.txt": UploadTarget(url=f"{store.url}/r")})
    await manager.wait_idle()
    assert node.states("up-own") == ["accepted", "running", "uploading", "completed"]
    assert store.objects == {"/r": RESULT_SHA}


async def test_an_offer_whose_outputs_do_not_fit_the_spool_is_refused_spool_full(
    node: Node, s3: S3
) -> None:
    manager = node.start(spool_max=1 << 20)
    await manager.recover()
    target = UploadTarget(url=s3.presign_put("x"))
    await node.offer("up-big", {"result.txt": target}, output_max_bytes=2 << 20)
    assert node.states("up-big") == ["refused"]
    assert node.messages("up-big")[0][1]["code"] == "spool_full"


async def test_a_stop_mid_upload_resumes_at_the_next_start_and_reports_once(
    node: Node, store: Store
) -> None:
    manager = node.start()
    await manager.recover()
    store.stall = True
    await node.offer("up-4", {"result.txt": UploadTarget(url=f"{store.url}/r4")})
    await _wait_for(store.stalled.is_set)
    await manager.shutdown()  # the agent stops while the store holds the PUT
    assert node.states("up-4") == ["accepted", "running", "uploading"]
    assert (node.tmp / "spool" / "up-4" / "0").is_file()

    store.stall = False
    store.release.set()
    manager = node.start()
    assert await manager.recover() == []  # nothing reported interrupted
    await manager.wait_idle()
    assert node.states("up-4") == ["accepted", "running", "uploading", "completed"]
    assert len(node.receipts("up-4")) == 1
    assert store.objects["/r4"] == RESULT_SHA
    assert not (node.tmp / "spool" / "up-4").exists()


async def _wait_for(condition: Callable[[], bool]) -> None:
    for _ in range(2000):
        if condition():
            return
        await asyncio.sleep(0.01)
    pytest.fail("timed out")


async def test_a_cancel_mid_upload_ends_the_job_cancelled_with_its_receipt(
    node: Node, store: Store
) -> None:
    manager = node.start()
    await manager.recover()
    store.stall = True
    await node.offer("up-5", {"result.txt": UploadTarget(url=f"{store.url}/r5")})
    await _wait_for(store.stalled.is_set)
    assert manager.stop("up-5", "cancelled")
    await manager.wait_idle()
    assert node.states("up-5") == ["accepted", "running", "uploading", "cancelled"]
    [receipt] = node.receipts("up-5")
    assert (receipt["state"], receipt["outputs"][0]["sha256"]) == ("cancelled", RESULT_SHA)
    assert not (node.tmp / "spool" / "up-5").exists()
    assert manager.ledger.held("up-5") is None


async def test_a_job_uploading_holds_no_slot_nor_gpu_for_the_next_offer(
    node: Node, store: Store
) -> None:
    manager = node.start(max_concurrent=1)
    await manager.recover()
    store.stall = True
    await node.offer("up-6", {"result.txt": UploadTarget(url=f"{store.url}/r6")})
    await _wait_for(store.stalled.is_set)
    await node.offer("up-7", {})  # the one GPU and the one slot are free again
    assert node.states("up-7")[0] == "accepted"
    store.stall = False
    store.release.set()
    await manager.wait_idle()
    assert node.states("up-6")[-1] == node.states("up-7")[-1] == "completed"
