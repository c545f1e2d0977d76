"""The job manager on a real Docker engine and a real outbox: offers to receipts.

The link is played by :func:`deliver`, which stores a reply exactly as the link does; the
coordinator's side of the end-to-end path is in test_daemon_jobs.py.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from support.world import (
    World,
    _seqs,
    deliver,
    offer_message,
    spec,
)

from agent.errors import ControlError
from agent.jobs.ledger import Ledger
from agent.jobs.machine import NewJob
from agent.owner.guard import OwnerGuard
from agent.owner.policy import OwnerPolicy
from agent.protocol import crypto
from agent.protocol.bodies import JobCancelBody
from agent.protocol.jobs import Offer, RegistryLogin, receipt_digest
from agent.protocol.messages import wrap
from hal.types import GpuProcess, GpuSample
from sandbox.container import LABEL_JOB
from sandbox.docker_api import DockerClient


async def containers_of(client: DockerClient, job_id: str) -> list[Any]:
    filters = msgspec.json.encode({"label": [f"{LABEL_JOB}={job_id}"]}).decode()
    listed = await client.request("GET", "/containers/json", params={"all": 1, "filters": filters})
    return list(listed.json())


async def test_an_offer_runs_once_and_ends_with_a_signed_receipt(world: World) -> None:
    await deliver(world, offer_message(world, "job-1", spec(world.image, "echo hello")))
    await world.manager.wait_idle()
    assert world.states("job-1") == ["accepted", "running", "completed"]
    assert world.log("job-1") == "hello\n"
    receipt = world.receipt("job-1")
    assert receipt["state"] == "completed"
    assert receipt["exit_code"] == 0
    assert receipt["image_id"].startswith("sha256:")
    assert receipt["prev_receipt"] == ""
    record = world.ledger.get("job-1")
    assert record is not None
    assert (record.state, record.exit_code) == ("completed", 0)
    assert [line.data for line in world.ledger.logs("job-1")] == ["hello\n"]
    assert await containers_of(world.client, "job-1") == []

    # The next receipt names this one: a hash chain the coordinator can check.
    await deliver(world, offer_message(world, "job-2", spec(world.image, "exit 3")))
    await world.manager.wait_idle()
    assert world.states("job-2") == ["accepted", "running", "failed"]
    second = world.receipt("job-2")
    assert (second["state"], second["exit_code"]) == ("failed", 3)
    assert second["prev_receipt"] == receipt_digest(receipt)


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"key": crypto.generate_private_key()}, "untrusted_key"),
        ({"node_id": "node-someoneelse"}, "node_mismatch"),
        ({"expires_in": -1.0}, "offer_expired"),
    ],
)
async def test_an_offer_that_does_not_verify_is_refused_and_nothing_runs(
    world: World, change: dict[str, Any], code: str
) -> None:
    await deliver(world, offer_message(world, "job-x", spec(world.image, "echo ran"), **change))
    await world.manager.wait_idle()
    [(kind, body)] = world.messages("job-x")
    assert (kind, body["state"], body["code"]) == ("job_status", "refused", code)
    assert world.manager.tasks == {}
    assert await containers_of(world.client, "job-x") == []


async def test_a_tampered_offer_is_refused(world: World) -> None:
    message = offer_message(world, "job-t", spec(world.image, "echo ran"))
    forged = Offer(
        job_id="job-t",
        node_id=world.identity.node_id,
        spec=spec(world.image, "echo pwned"),
        issued_at=0,
        expires_at=time.time() + 600,
    )
    envelope = message.body.offer
    tampered = msgspec.structs.replace(
        envelope, payload=crypto.b64encode(msgspec.json.encode(forged))
    )
    body = msgspec.structs.replace(message.body, offer=tampered)
    await deliver(world, msgspec.structs.replace(message, body=body))
    assert world.states("job-t") == ["refused"]
    assert world.messages("job-t")[0][1]["code"] == "bad_signature"


@pytest.mark.parametrize(
    ("changes", "code", "detail"),
    [
        (
            {"image": "docker.io/library/evil@sha256:" + "e" * 64},
            "policy_violation",
            "image_not_allowed",
        ),
        ({"image": "docker.io/library/evil:1"}, "image_not_pinned", "is a tag"),
        ({"resources": {"cpus": 64}}, "policy_violation", "cpus_over_limit"),
        ({"gpus": {"count": 3}}, "no_matching_gpus", ""),
        ({"gpus": {"count": 1, "vendor": "nvidia"}}, "policy_violation", "gpu_vendor_not_offered"),
        ({"gpus": {"count": 1, "min_vram_bytes": 1 << 50}}, "no_matching_gpus", ""),
        ({"command": "not a list"}, "bad_value", "command"),
        ({"mounts": ["/etc:/etc"]}, "forbidden_field", ""),
    ],
)
async def test_an_offer_against_policy_or_capacity_is_refused_with_its_code(
    world: World, changes: dict[str, Any], code: str, detail: str
) -> None:
    await deliver(world, offer_message(world, "job-p", {**spec(world.image, "true"), **changes}))
    [(_, body)] = world.messages("job-p")
    assert (body["state"], body["code"]) == ("refused", code)
    assert detail in body["detail"]
    assert world.manager.tasks == {}


async def test_an_offer_with_a_login_for_another_registry_than_its_images_is_refused(
    world: World,
) -> None:
    login = RegistryLogin(username="u", password="short-lived")
    message = offer_message(
        world, "job-l", spec(world.image, "true"), registry_logins={"elsewhere.example": login}
    )
    await deliver(world, message)
    [(_, body)] = world.messages("job-l")
    assert (body["state"], body["code"]) == ("refused", "bad_registry_login")
    assert "short-lived" not in body["detail"]
    assert world.manager.tasks == {}


async def test_a_duplicate_offer_runs_once(world: World) -> None:
    message = offer_message(world, "job-d", spec(world.image, "echo once"))
    await deliver(world, message)
    await deliver(world, offer_message(world, "job-d", spec(world.image, "echo twice")))
    await world.manager.wait_idle()
    states = [
        (b["state"], b["code"]) for kind, b in world.messages("job-d") if kind == "job_status"
    ]
    assert states[0] == ("accepted", "")
    assert states[1][1] == "duplicate_offer"
    assert [s for s, _ in states].count("running") == 1
    assert world.log("job-d") == "once\n"


async def test_each_job_sees_only_its_own_gpu(world: World) -> None:
    gpu_job = spec(world.image, "ls /dev/dri; sleep 1", gpus={"count": 1, "vendor": "intel"})
    await deliver(world, offer_message(world, "job-g1", gpu_job))
    await deliver(world, offer_message(world, "job-g2", gpu_job))
    # Both GPUs are taken now: a third job is refused as busy, not queued.
    await deliver(world, offer_message(world, "job-g3", gpu_job))
    assert world.states("job-g3") == ["refused"]
    assert world.messages("job-g3")[0][1]["code"] == "busy"
    await world.manager.wait_idle()
    first, second = world.log("job-g1").split(), world.log("job-g2").split()
    assert sorted(first + second) == ["renderD128", "renderD129"]
    assert world.receipt("job-g1")["gpus"] != world.receipt("job-g2")["gpus"]
    # Released: the next one gets a GPU again.
    await deliver(world, offer_message(world, "job-g4", gpu_job))
    await world.manager.wait_idle()
    assert world.states("job-g4") == ["accepted", "running", "completed"]


async def test_cancel_stops_the_job_and_reports_it_cancelled(world: World) -> None:
    await deliver(world, offer_message(world, "job-c", spec(world.image, "echo up; sleep 60")))
    while "running" not in world.states("job-c"):
        await _tick()
    await deliver(world, wrap(JobCancelBody(job_id="job-c", reason="test"), next(_seqs)))  # type: ignore[arg-type]
    await world.manager.wait_idle()
    assert world.states("job-c") == ["accepted", "running", "cancelled"]
    assert world.receipt("job-c")["state"] == "cancelled"
    assert await containers_of(world.client, "job-c") == []


async def test_shutdown_interrupts_running_jobs_with_receipts(world: World) -> None:
    await deliver(world, offer_message(world, "job-s", spec(world.image, "sleep 60")))
    while "running" not in world.states("job-s"):
        await _tick()
    await world.manager.shutdown()
    assert world.states("job-s") == ["accepted", "running", "interrupted"]
    assert world.receipt("job-s")["state"] == "interrupted"
    # Stopping: later offers are refused, with the reason.
    await deliver(world, offer_message(world, "job-late", spec(world.image, "true")))
    assert world.messages("job-late")[0][1]["code"] == "shutting_down"


async def test_jobs_a_crash_cut_short_are_reported_interrupted_once(
    world: World, tmp_path: Path
) -> None:
    offer = offer_message(world, "job-k", spec(world.image, "true"))
    payload = crypto.b64decode(offer.body.offer.payload)
    # What a daemon killed mid-job leaves: the job accepted or running in the ledger.
    crashed = NewJob(job_id="job-k", state="running", offer=payload)
    world.outbox.append_many([], time.time(), also=Ledger.write([crashed], 1.0))
    assert await world.manager.recover() == ["job-k"]
    assert world.states("job-k") == ["interrupted"]
    receipt = world.receipt("job-k")
    assert (receipt["state"], receipt["code"]) == ("interrupted", "agent_restarted")
    assert await world.manager.recover() == []
    assert world.states("job-k") == ["interrupted"]
    # And the same offer again does not run it.
    await deliver(world, offer)
    assert world.manager.tasks == {}


async def _tick() -> None:
    await asyncio.sleep(0.05)


async def test_old_logs_are_pruned_at_start_and_receipts_kept(world: World) -> None:
    await deliver(world, offer_message(world, "job-old", spec(world.image, "echo old")))
    await world.manager.wait_idle()
    assert world.ledger.logs("job-old")
    world.manager.clock = lambda: time.time() + 8 * 86400
    await world.manager.recover()
    assert world.ledger.logs("job-old") == []
    assert world.ledger.receipt("job-old") is not None


# The owner's guard on the same real job manager: preemption, pauses, settings.


def _hot(degrees: float, *, pids: tuple[int, ...] = ()) -> list[GpuSample]:
    processes = [GpuProcess(pid=pid, used_memory_bytes=0, kind="compute") for pid in pids]
    return [
        GpuSample(id="pci:0000:00:00.0", temperature_c=degrees, processes=processes),
        GpuSample(id="pci:0000:01:00.0", temperature_c=40.0),
    ]


def _guard(world: World, tmp_path: Path, **policy: Any) -> OwnerGuard:
    return OwnerGuard(
        jobs=world.manager,
        node=world.manager.node,
        policy=msgspec.convert(policy, OwnerPolicy),
        store=tmp_path / "owner.json",
    )


async def test_a_tripped_guard_preempts_the_running_job_and_refuses_offers(
    world: World, tmp_path: Path
) -> None:
    guard = _guard(world, tmp_path, pause_above_c=85, resume_below_c=75)
    await deliver(world, offer_message(world, "job-hot", spec(world.image, "sleep 60")))
    while "running" not in world.states("job-hot"):
        await _tick()
    verdict = guard.tick(_hot(90))
    assert (verdict.share, verdict.code) == (False, "too_hot")
    await world.manager.wait_idle()
    assert world.states("job-hot") == ["accepted", "running", "preempted"]
    receipt = world.receipt("job-hot")
    assert (receipt["state"], receipt["code"]) == ("preempted", "preempted")
    assert await containers_of(world.client, "job-hot") == []
    await deliver(world, offer_message(world, "job-cold", spec(world.image, "true")))
    assert world.messages("job-cold")[0][1]["code"] == "too_hot"
    status = world.manager.node.status()
    assert status is not None
    assert (status.available, status.reason) == (False, "too_hot")
    # Hysteresis: 80 °C is not cool enough; 70 °C is.
    assert not guard.tick(_hot(80)).share
    assert guard.tick(_hot(70)).share
    assert world.manager.node.unavailable is None


async def test_another_process_on_a_gpu_holds_sharing_back_when_idle_only(
    world: World, tmp_path: Path
) -> None:
    guard = _guard(world, tmp_path, share_only_when_idle=True, idle_delay_s=0)
    # This test's own process is not in a job's container: to the guard it is the owner's.
    verdict = guard.tick(_hot(40, pids=(os.getpid(),)), 3600.0)
    assert (verdict.share, verdict.code) == (False, "gpu_in_use")
    assert guard.tick(_hot(40), 3600.0).share
    # Unless it is a display server the policy ignores (they hold a GPU all day).
    name = Path("/proc/self/comm").read_text().strip()
    guard.change({"ignored_processes": [name]})
    assert guard.tick(_hot(40, pids=(os.getpid(),)), 3600.0).share
    # An idle time that cannot be read counts as the owner being there.
    assert guard.tick(_hot(40), None).code == "idle_unknown"


async def test_a_timed_pause_ends_by_itself_and_survives_a_restart(
    world: World, tmp_path: Path
) -> None:
    now = [1_000_000.0]
    guard = _guard(world, tmp_path)
    guard.clock = lambda: now[0]
    guard.pause(now[0] + 3600)
    assert world.manager.node.unavailable is not None
    assert world.manager.node.unavailable[0] == "paused"
    # A new daemon reads the pause back: sharing does not resume behind the owner's back.
    world.manager.node.release("paused")
    again = _guard(world, tmp_path)
    again.clock = lambda: now[0]
    assert again.paused_until == now[0] + 3600
    assert world.manager.node.held("paused")
    now[0] += 3601
    again.tick([])
    assert not world.manager.node.held("paused")
    assert again.paused_until is None


async def test_settings_are_validated_whole_and_kept(world: World, tmp_path: Path) -> None:
    guard = _guard(world, tmp_path, max_shared_gpus=2)
    with pytest.raises(ControlError) as caught:
        guard.change({"pause_above_c": 80})  # without resume_below_c
    assert caught.value.code == "bad_settings"
    assert guard.policy.pause_above_c is None
    guard.change({"share_only_when_idle": True, "max_shared_gpus": 1})
    assert world.manager.node.share_limit == 1
    assert _guard(world, tmp_path, max_shared_gpus=2).policy.share_only_when_idle is True


@pytest.mark.parametrize("until", [1e300, -1.0])
async def test_a_saved_pause_no_date_can_show_is_ignored_at_start(
    world: World, tmp_path: Path, until: float
) -> None:
    # owner.json edited by hand: the daemon starts with the configured settings.
    (tmp_path / "owner.json").write_text(f'{{"paused": true, "paused_until": {until}}}')
    guard = _guard(world, tmp_path)
    assert guard.paused_until is None
    assert world.manager.node.unavailable is None
