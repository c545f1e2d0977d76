"""The reconciler's passes carried out on a real store, a fake clock and fake sessions:
offers placed, renewals and cancels in the nodes' streams, a failure held back."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from agent.protocol.messages import JobStatusBody
from coordinator import keys
from coordinator.deployments import Deployments
from coordinator.errors import JobError
from coordinator.job_service import JobService
from coordinator.reconcile import NODE_LOST, hold_s
from coordinator.store import Store

LEASE = 30.0
GRACE = 10.0
IMAGE = "sha256:" + "ab" * 32


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeSessions:
    """No session here: every message is kept in the store, which is what the test reads."""

    async def deliver(self, node_id: str) -> None:
        return None


class World:
    def __init__(self, tmp_path: Path) -> None:
        self.clock = Clock()
        self.store = Store(tmp_path / "c.db")
        self.connected = {"node-a", "node-b"}
        self.seq = 0
        key = keys.load_or_create(tmp_path / "key")
        jobs = JobService(self.store, key, FakeSessions(), self.clock)
        self.deployments = Deployments(
            self.store, jobs, key, lambda: self.connected, self.clock, grace_s=GRACE
        )
        for node in ("node-a", "node-b", "node-c"):
            self.store.nodes.seen(node, key.public_key_b64, self.clock())
            self.report(node, "node_status", {"available": True})

    def report(self, node: str, kind: str, body: dict[str, Any], job: Any = None) -> None:
        self.seq += 1
        self.store.add(node, self.seq, kind, body, self.clock(), job=job)

    def state(self, job_id: str, state: str, code: str = "") -> None:
        row = self.store.jobs.get(job_id)
        assert row is not None
        status = JobStatusBody(job_id=job_id, state=state, code=code)
        self.report(row.node_id, "job_status", msgspec.to_builtins(status), job=status)

    def sent(self, node: str, kind: str) -> list[dict[str, Any]]:
        return [b for _, k, b in self.store.streams.outbound(node).pending if k == kind]

    def live(self) -> dict[str, str]:
        return {r.job_id: r.node_id for r in self.store.deployments.replicas("web")}


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    made = World(tmp_path)
    yield made
    made.store.close()


def service() -> dict[str, Any]:
    return {
        "kind": "service",
        "image": IMAGE,
        "command": ["httpd"],
        "service": {"port": 8080, "models": ["m"], "lease_s": LEASE},
    }


async def test_a_pass_places_renews_replaces_and_undeploy_cancels(world: World) -> None:
    await world.deployments.deploy("web", service(), 2)
    await world.deployments.tick()
    placed = world.live()
    assert sorted(placed.values()) == ["node-a", "node-b"]
    for job_id in placed:
        world.state(job_id, "ready")

    world.clock.now += LEASE / 3
    await world.deployments.tick()
    renewals = world.sent("node-a", "service_renew") + world.sent("node-b", "service_renew")
    assert sorted(r["job_id"] for r in renewals) == sorted(placed)
    assert {r["lease_until"] for r in renewals} == {world.clock.now + LEASE}

    world.connected = {"node-a", "node-c"}
    await world.deployments.tick()  # node-b seen away from now
    world.clock.now += GRACE
    await world.deployments.tick()
    [lost] = [j for j, n in placed.items() if n == "node-b"]
    [retired] = world.store.deployments.replicas("web", retired=True)
    assert (retired.job_id, retired.retired_code) == (lost, NODE_LOST)
    assert [c["job_id"] for c in world.sent("node-b", "job_cancel")] == [lost]
    assert sorted(world.live().values()) == ["node-a", "node-c"]

    live = world.live()
    cancelled = await world.deployments.undeploy("web")
    assert sorted(cancelled) == sorted([*live, lost])  # every replica that has not ended
    for node in ("node-a", "node-c"):
        assert {c["job_id"] for c in world.sent(node, "job_cancel")} <= set(cancelled)
    assert world.store.deployments.all() == []
    with pytest.raises(JobError) as err:
        await world.deployments.undeploy("web")
    assert err.value.code == "unknown_deployment"


async def test_a_replica_that_ends_is_replaced_after_its_hold(world: World) -> None:
    await world.deployments.deploy("web", service(), 1)
    await world.deployments.tick()
    [(first, node)] = world.live().items()
    world.state(first, "stopped", "restart_limit")
    await world.deployments.tick()
    assert world.live() == {}
    row = world.store.deployments.get("web")
    assert row is not None
    assert (row.failures, row.hold_until) == (1, world.clock.now + hold_s(1))
    await world.deployments.tick()  # held back: nothing placed yet
    assert world.live() == {}
    world.clock.now += hold_s(1)
    await world.deployments.tick()
    [(second, other)] = world.live().items()
    assert second != first
    assert other != node  # the node where it failed comes last


async def test_an_unavailable_node_gets_no_replica(world: World) -> None:
    world.report("node-b", "node_status", {"available": False})
    await world.deployments.deploy("web", service(), 2)
    await world.deployments.tick()
    assert sorted(world.live().values()) == ["node-a", "node-a"]
