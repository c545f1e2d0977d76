"""Each GPU unit's health, from the samples and the driver's events."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from agent.jobs.node import INITIALISING, NodeState
from agent.jobs.scheduler import sample_health, xid_health
from hal.types import GpuSample, HealthEvent

__all__ = ["HealthCheck"]

_log = logging.getLogger(__name__)


class HealthCheck:
    """Marks the node's units healthy or not, sample by sample.

    Uncorrectable ECC errors count from what each GPU had when the agent started (volatile
    counters survive until a reset); an unhealthy unit stays so until the agent restarts.
    """

    def __init__(self, node: NodeState) -> None:
        self.node = node
        self._baseline_ecc: dict[str, int] = {}

    def check(self, gpus: Sequence[GpuSample], events: Sequence[HealthEvent] = ()) -> None:
        """Each unit's health by the latest sample and the driver's events; a MIG instance
        without its own sample follows its GPU. The first call ends the initial check."""
        scheduler = self.node.scheduler
        for event in events:
            verdict = xid_health(event.code) if event.kind == "xid" else None
            if verdict is None:
                continue
            _log.error("GPU %s: Xid %d; it takes no more jobs", event.gpu_id, event.code)
            for unit_id, unit in scheduler.units.items():
                # An event on a GPU split into MIG instances concerns each of them.
                if event.gpu_id in (unit_id, unit.gpu.parent_uuid):
                    scheduler.set_health(unit_id, *verdict)
        by_id = {g.id: g for g in gpus}
        for unit_id, unit in scheduler.units.items():
            sample = by_id.get(unit_id) or by_id.get(unit.gpu.parent_uuid or "")
            if sample is None:
                scheduler.set_health(unit_id, "unhealthy", "no_readings")
                continue
            errors = sample.ecc_uncorrected
            baseline = self._baseline_ecc.setdefault(
                unit_id, errors if isinstance(errors, int) else 0
            )
            if unit.health != "unhealthy":
                scheduler.set_health(unit_id, *sample_health(sample, baseline))
        self.node.release(INITIALISING)
        self.node.changed()
