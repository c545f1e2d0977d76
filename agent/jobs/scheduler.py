"""Which GPUs a job gets: exclusive assignment of healthy, schedulable units. Pure.

A schedulable unit is a whole GPU, or, on a GPU with MIG enabled, each of its MIG
instances (the physical GPU itself is then never handed out). Every unit starts
``initialising`` and takes no job until the daemon has checked it once; a unit marked
``unhealthy`` keeps its current job (the job's own end will tell) but takes no new one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import msgspec

from agent.jobs.gpus import fits
from hal.types import GpuProfile, GpuSample, is_value
from sandbox.spec import GpuRequest

__all__ = [
    "IGNORED_XIDS",
    "Health",
    "Scheduler",
    "Unit",
    "sample_health",
    "schedulable",
    "xid_health",
]

Health = Literal["initialising", "healthy", "unhealthy"]

#: Xids an application causes (a bad kernel, a fault in its own memory, a reset it asked
#: for), not the hardware: NVIDIA's "Xid Errors" guide. They never mark a GPU unhealthy.
IGNORED_XIDS = frozenset({13, 31, 43, 45, 68, 109})


class Unit(msgspec.Struct, kw_only=True):
    """One schedulable GPU or MIG instance, its health and its job."""

    gpu: GpuProfile
    health: Health = "initialising"
    reason: str = ""
    job_id: str | None = None


def schedulable(gpus: Iterable[GpuProfile]) -> list[GpuProfile]:
    """The units among a profile's GPUs: MIG instances instead of their MIG-enabled parent."""
    listed = list(gpus)
    split = {g.uuid for g in listed if g.mig_enabled is True and is_value(g.uuid)}
    split &= {g.parent_uuid for g in listed if g.kind == "mig"}
    return [g for g in listed if g.kind == "mig" or not (is_value(g.uuid) and g.uuid in split)]


def sample_health(sample: GpuSample, baseline_uncorrected: int = 0) -> tuple[Health, str]:
    """A unit's health by one sample: lost, or uncorrectable ECC errors beyond the count it
    had when the agent started (volatile counters survive until a reset)."""
    if sample.state != "ok":
        return "unhealthy", f"gpu_{sample.state}"
    errors = sample.ecc_uncorrected
    if isinstance(errors, int) and errors > baseline_uncorrected:
        return "unhealthy", f"ecc_uncorrectable: {errors - baseline_uncorrected} new error(s)"
    return "healthy", ""


def xid_health(xid: int) -> tuple[Health, str] | None:
    """What an Xid event means for its GPU: unhealthy unless the application caused it."""
    if xid in IGNORED_XIDS:
        return None
    return "unhealthy", f"xid_{xid}"


class Scheduler:
    """Exclusive assignment of units to jobs."""

    def __init__(self, gpus: Sequence[GpuProfile]) -> None:
        self.units: dict[str, Unit] = {g.id: Unit(gpu=g) for g in schedulable(gpus)}

    def set_health(self, unit_id: str, health: Health, reason: str = "") -> bool:
        """Record a unit's health; whether it changed. Unknown ids are ignored."""
        unit = self.units.get(unit_id)
        if unit is None or (unit.health, unit.reason) == (health, reason):
            return False
        unit.health, unit.reason = health, reason
        return True

    def free(self) -> list[GpuProfile]:
        """Healthy units with no job."""
        return [u.gpu for u in self.units.values() if u.health == "healthy" and u.job_id is None]

    def assign(
        self, job_id: str, request: GpuRequest, limit: int | None = None
    ) -> list[str] | None:
        """Give ``job_id`` the first free units that fit ``request``; their ids, or None
        when there are not enough (nothing is assigned then).

        Args:
            limit: most units that may be busy at once (an owner's share limit); None: all.
        """
        if request.count == 0:
            return []
        busy = sum(1 for u in self.units.values() if u.job_id is not None)
        if limit is not None and busy + request.count > limit:
            return None
        chosen = [g.id for g in self.free() if fits(g, request, allow_mig=True)][: request.count]
        if len(chosen) < request.count:
            return None
        for unit_id in chosen:
            self.units[unit_id].job_id = job_id
        return chosen

    def could_ever_fit(self, request: GpuRequest) -> bool:
        """Whether this machine has enough units of that kind at all, busy or not."""
        matching = [u for u in self.units.values() if fits(u.gpu, request, allow_mig=True)]
        return len(matching) >= request.count

    def release(self, job_id: str) -> list[str]:
        """Free the units of ``job_id``; their ids."""
        freed = [uid for uid, u in self.units.items() if u.job_id == job_id]
        for unit_id in freed:
            self.units[unit_id].job_id = None
        return freed

    def gpus_of(self, unit_ids: Iterable[str]) -> list[GpuProfile]:
        """The profiles of the given units, in that order."""
        return [self.units[uid].gpu for uid in unit_ids]

    @property
    def initialising(self) -> bool:
        """Whether any unit has not been checked yet: no capacity may be reported then."""
        return any(u.health == "initialising" for u in self.units.values())
