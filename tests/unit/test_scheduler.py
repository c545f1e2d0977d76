"""GPU scheduling and health decisions: pure functions over profiles and samples."""

from __future__ import annotations

import pytest
from support import factories

from agent.jobs.scheduler import Scheduler, sample_health, schedulable, xid_health
from hal.types import UNSUPPORTED, GpuProfile, GpuSample
from sandbox.spec import GpuRequest


def _healthy(scheduler: Scheduler) -> Scheduler:
    for unit_id in scheduler.units:
        scheduler.set_health(unit_id, "healthy")
    return scheduler


def _mig_machine() -> list[GpuProfile]:
    return [
        factories.gpu(id="GPU-a", uuid="GPU-a", mig_enabled=True),
        factories.gpu(id="MIG-a1", uuid="MIG-a1", kind="mig", parent_uuid="GPU-a"),
        factories.gpu(id="MIG-a2", uuid="MIG-a2", kind="mig", parent_uuid="GPU-a"),
        factories.gpu(id="GPU-b", uuid="GPU-b", mig_enabled=False),
    ]


def test_mig_instances_replace_their_parent_as_units() -> None:
    assert [g.id for g in schedulable(_mig_machine())] == ["MIG-a1", "MIG-a2", "GPU-b"]
    # MIG on, but no instance created: the GPU is not split, so it stays a unit (that
    # fits no job: a MIG-mode GPU cannot run whole-GPU work).
    alone = [factories.gpu(id="GPU-a", uuid="GPU-a", mig_enabled=True)]
    assert [g.id for g in schedulable(alone)] == ["GPU-a"]


def test_assignment_is_exclusive_and_released() -> None:
    scheduler = _healthy(Scheduler(_mig_machine()))
    assert scheduler.assign("j1", GpuRequest(count=2)) == ["MIG-a1", "MIG-a2"]
    assert scheduler.assign("j2", GpuRequest(count=2)) is None
    assert scheduler.assign("j2", GpuRequest(count=1)) == ["GPU-b"]
    assert scheduler.assign("j3", GpuRequest(count=1)) is None
    assert scheduler.release("j1") == ["MIG-a1", "MIG-a2"]
    assert scheduler.assign("j3", GpuRequest(count=1)) == ["MIG-a1"]
    assert scheduler.assign("j4", GpuRequest(count=0)) == []


def test_nothing_is_assigned_while_initialising_or_to_an_unhealthy_gpu() -> None:
    scheduler = Scheduler([factories.gpu(id="GPU-a"), factories.gpu(id="GPU-b")])
    assert scheduler.initialising
    assert scheduler.assign("j1", GpuRequest(count=1)) is None
    scheduler.set_health("GPU-a", "unhealthy", "xid_79")
    scheduler.set_health("GPU-b", "healthy")
    assert not scheduler.initialising
    assert scheduler.assign("j1", GpuRequest(count=2)) is None
    assert scheduler.assign("j1", GpuRequest(count=1)) == ["GPU-b"]
    assert scheduler.could_ever_fit(GpuRequest(count=2))
    assert not scheduler.could_ever_fit(GpuRequest(count=3))


def test_constraints_and_share_limit() -> None:
    small = factories.gpu(id="GPU-s", vram_total_bytes=8 << 30, compute_capability="7.5")
    big = factories.gpu(id="GPU-b", vram_total_bytes=48 << 30, compute_capability="8.6")
    scheduler = _healthy(Scheduler([small, big]))
    assert scheduler.assign("j1", GpuRequest(count=1, min_vram_bytes=16 << 30)) == ["GPU-b"]
    scheduler.release("j1")
    assert scheduler.assign("j1", GpuRequest(count=1, min_compute_capability="8.0")) == ["GPU-b"]
    scheduler.release("j1")
    assert scheduler.assign("j1", GpuRequest(count=1, vendor="amd")) is None
    assert scheduler.assign("j1", GpuRequest(count=1), limit=1) == ["GPU-s"]
    assert scheduler.assign("j2", GpuRequest(count=1), limit=1) is None


@pytest.mark.parametrize(
    ("sample", "baseline", "expected"),
    [
        (GpuSample(id="g", ecc_uncorrected=0), 0, ("healthy", "")),
        (GpuSample(id="g", ecc_uncorrected=UNSUPPORTED), 0, ("healthy", "")),
        (GpuSample(id="g", ecc_uncorrected=4), 4, ("healthy", "")),
        (
            GpuSample(id="g", ecc_uncorrected=5),
            4,
            ("unhealthy", "ecc_uncorrectable: 1 new error(s)"),
        ),
        (GpuSample(id="g", state="lost"), 0, ("unhealthy", "gpu_lost")),
    ],
)
def test_health_from_a_sample(sample: GpuSample, baseline: int, expected: tuple[str, str]) -> None:
    assert sample_health(sample, baseline) == expected


@pytest.mark.parametrize("xid", [13, 31, 43, 45, 68, 109])
def test_application_xids_leave_the_gpu_healthy(xid: int) -> None:
    assert xid_health(xid) is None


@pytest.mark.parametrize("xid", [48, 63, 74, 79, 94, 95, 119])
def test_hardware_xids_mark_the_gpu_unhealthy(xid: int) -> None:
    assert xid_health(xid) == ("unhealthy", f"xid_{xid}")


def test_set_health_says_whether_it_changed() -> None:
    scheduler = Scheduler([factories.gpu(id="GPU-a")])
    assert scheduler.set_health("GPU-a", "healthy")
    assert not scheduler.set_health("GPU-a", "healthy")
    assert scheduler.set_health("GPU-a", "unhealthy", "xid_79")
    assert not scheduler.set_health("GPU-unknown", "healthy")
