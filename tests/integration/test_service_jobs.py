"""Services through the job manager on the real engine: offered, probed, reported on
change, restarted, stopped with a code and a receipt."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from support.world import World, deliver, offer_message, spec

from agent.owner.guard import OwnerGuard
from agent.owner.policy import OwnerPolicy
from agent.protocol.bodies import JobCancelBody, ServiceRenewBody
from agent.protocol.messages import JobCancel, ServiceRenew, wrap
from hal.types import GpuSample

FAST = {
    "readiness": {"interval_s": 0.2, "timeout_s": 1},
    "liveness": {"interval_s": 0.2, "timeout_s": 1, "failures": 2},
    "start_allowance_s": 5,
    "restart": {"limit": 1, "backoff_s": 0.1, "max_backoff_s": 0.1},
}
# busybox's httpd in the foreground, serving /health from the job's scratch space.
SERVE = "mkdir -p /scratch/www && echo up > /scratch/www/health && exec httpd -f -p 8080 -h /scratch/www"  # noqa: E501


def _service(world: World, script: str, **service: Any) -> dict[str, Any]:
    table = {"port": 8080, "models": ["tiny"], **FAST, **service}
    return spec(world.image, script, kind="service", service=table)


async def _until(what: Callable[[], bool], timeout: float = 60) -> None:
    async with asyncio.timeout(timeout):
        while not what():
            await asyncio.sleep(0.05)


async def test_a_service_becomes_ready_answers_and_stops_when_cancelled(world: World) -> None:
    await deliver(world, offer_message(world, "svc-a", _service(world, SERVE)))
    await _until(lambda: "ready" in world.states("svc-a"))
    service = world.manager.services["svc-a"]
    assert service.ready
    async with httpx.AsyncClient(trust_env=False) as client:
        answer = await client.get(f"http://{service.address}:8080/health")
    assert answer.text == "up\n"
    cancel = wrap(JobCancelBody(job_id="svc-a", reason="undeploy"), 900)
    assert isinstance(cancel, JobCancel)
    await deliver(world, cancel)
    await world.manager.wait_idle()
    assert world.states("svc-a") == ["accepted", "starting", "ready", "stopped"]
    assert world.messages("svc-a")[-1][1]["code"] == "cancelled"
    receipt = world.receipt("svc-a")
    assert (receipt["state"], receipt["code"]) == ("stopped", "cancelled")
    assert world.manager.services == {}


async def test_a_server_that_keeps_exiting_is_restarted_to_its_limit(world: World) -> None:
    await deliver(world, offer_message(world, "svc-b", _service(world, "echo bye; exit 3")))
    await _until(lambda: world.ledger.get("svc-b").final)  # type: ignore[union-attr]
    await world.manager.wait_idle()
    assert world.states("svc-b") == ["accepted", "starting", "restarting", "starting", "stopped"]
    bodies = [b for kind, b in world.messages("svc-b") if kind == "job_status"]
    assert (bodies[2]["code"], "exited 3" in bodies[2]["detail"]) == ("exited", True)
    assert bodies[-1]["code"] == "restart_limit"


async def test_a_server_that_never_answers_is_restarted_for_it(world: World) -> None:
    silent = _service(world, "exec sleep 600", start_allowance_s=1, restart={"limit": 0})
    await deliver(world, offer_message(world, "svc-c", silent))
    await _until(lambda: world.ledger.get("svc-c").final)  # type: ignore[union-attr]
    bodies = [b for kind, b in world.messages("svc-c") if kind == "job_status"]
    assert [b["state"] for b in bodies] == ["accepted", "starting", "stopped"]
    assert bodies[-1]["code"] == "restart_limit"
    assert "not_ready" in bodies[-1]["detail"]


async def test_a_service_spec_is_refused_with_its_field_like_any_spec(world: World) -> None:
    bad = spec(world.image, "true", kind="service")
    await deliver(world, offer_message(world, "svc-d", bad))
    [(_, body)] = world.messages("svc-d")
    assert (body["state"], body["code"]) == ("refused", "missing_field")
    assert world.manager.tasks == {}


async def test_a_drain_takes_a_service_out_lets_its_requests_finish_then_stops_it(
    world: World,
) -> None:
    await deliver(world, offer_message(world, "svc-e", _service(world, SERVE)))
    await _until(lambda: "ready" in world.states("svc-e"))
    service = world.manager.services["svc-e"]
    requests = [1]  # one request in flight, until the test ends it

    world.manager.in_flight = lambda _: requests[0]
    draining = asyncio.create_task(world.manager.drain_services())
    await _until(lambda: "unhealthy" in world.states("svc-e"))
    assert not service.ready  # no new requests go to it, though its checks still pass
    await asyncio.sleep(0.5)  # its liveness checks go on passing meanwhile
    assert world.states("svc-e")[-1] == "unhealthy"
    requests[0] = 0
    await draining
    await world.manager.wait_idle()
    bodies = [b for kind, b in world.messages("svc-e") if kind == "job_status"]
    assert [(b["state"], b["code"]) for b in bodies[-2:]] == [
        ("unhealthy", "draining"),
        ("stopped", "drained"),
    ]


async def test_a_tripped_guard_drains_a_service_but_preempts_a_batch_job_at_once(
    world: World, tmp_path: Path
) -> None:
    guard = OwnerGuard(
        jobs=world.manager,
        node=world.manager.node,
        policy=OwnerPolicy(pause_above_c=85, resume_below_c=75),
        store=tmp_path / "owner.json",
    )
    await deliver(world, offer_message(world, "svc-g", _service(world, SERVE)))
    await deliver(world, offer_message(world, "job-g", spec(world.image, "sleep 60")))
    await _until(lambda: "ready" in world.states("svc-g") and "running" in world.states("job-g"))
    service = world.manager.services["svc-g"]
    requests = [1]  # one request in flight to the service, until the test ends it
    world.manager.in_flight = lambda job_id: requests[0] if job_id == "svc-g" else 0

    hot = [GpuSample(id="pci:0000:00:00.0", temperature_c=90.0)]
    assert guard.tick(hot).code == "too_hot"
    # The batch job is stopped now; the service takes no new request but is not stopped.
    await _until(lambda: "preempted" in world.states("job-g"))
    await _until(lambda: "unhealthy" in world.states("svc-g"))
    assert not service.ready
    guard.tick(hot)  # the guard goes on ticking: a second drain is not started
    await asyncio.sleep(0.5)  # its liveness checks go on passing meanwhile
    assert world.states("svc-g")[-1] == "unhealthy"
    assert "svc-g" in world.manager.services
    requests[0] = 0
    await world.manager.wait_idle()
    bodies = [b for kind, b in world.messages("svc-g") if kind == "job_status"]
    drained = [(b["state"], b["code"]) for b in bodies[-2:]]
    assert drained == [("unhealthy", "draining"), ("stopped", "preempted")]
    assert bodies[-1]["detail"].startswith("the owner's guard: GPU pci:0000:00:00.0 at 90 °C")
    receipt = world.receipt("svc-g")
    assert (receipt["state"], receipt["code"]) == ("stopped", "preempted")


async def test_a_service_outlives_its_specs_timeout_which_is_a_jobs_not_a_services(
    world: World,
) -> None:
    short = {**_service(world, SERVE), "timeout_s": 1}
    await deliver(world, offer_message(world, "svc-f", short))
    await _until(lambda: "ready" in world.states("svc-f"))
    await asyncio.sleep(2)  # past timeout_s: a batch job would be stopped by now
    assert world.states("svc-f")[-1] == "ready"
    assert world.manager.services["svc-f"].ready
    world.manager.stop("svc-f", "cancelled")
    await world.manager.wait_idle()
    assert world.states("svc-f")[-1] == "stopped"


async def test_a_renewal_extends_a_running_lease_to_one_lease_from_now_at_most(
    world: World,
) -> None:
    await deliver(world, offer_message(world, "svc-e", _service(world, SERVE, lease_s=10)))
    await _until(lambda: "ready" in world.states("svc-e"))
    service = world.manager.services["svc-e"]
    first = service.lease_until
    world.manager.on_renew(_renew("svc-e", 1e11, 901))  # far ahead: held to a lease from now
    held = service.lease_until
    assert first < held <= world.manager.clock() + 10
    world.manager.on_renew(_renew("svc-e", 1000.0, 902))  # in the past: never shortens
    assert service.lease_until == held
    world.manager.on_renew(_renew("svc-unknown", 1e11, 903))  # no such service: ignored
    await deliver(world, _cancel("svc-e", 904))
    await world.manager.wait_idle()
    world.manager.on_renew(_renew("svc-e", 1e11, 905))  # ended: ignored
    assert world.messages("svc-e")[-1][1]["code"] == "cancelled"


def _renew(job_id: str, until: float, seq: int) -> ServiceRenew:
    message = wrap(ServiceRenewBody(job_id=job_id, lease_until=until), seq)
    assert isinstance(message, ServiceRenew)
    return message


def _cancel(job_id: str, seq: int) -> JobCancel:
    message = wrap(JobCancelBody(job_id=job_id, reason="undeploy"), seq)
    assert isinstance(message, JobCancel)
    return message
