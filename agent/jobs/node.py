"""What this node can take now: its GPUs' health and assignments, and why it holds offers
back. One object that the job manager, the owner's guard and the control API read and
change through its methods; whoever reports the node (the daemon) is told of each change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from agent.jobs.scheduler import Scheduler
from agent.protocol.bodies import NodeStatusBody, UnitStatus
from agent.protocol.limits import MAX_ERROR_DETAIL_CHARS
from sandbox.spec import GpuRequest

__all__ = ["DRAINING", "HOLD_ORDER", "INITIALISING", "PAUSED", "SHUTTING_DOWN", "NodeState"]

PAUSED: Final = "paused"
DRAINING: Final = "draining"
INITIALISING: Final = "initialising"
SHUTTING_DOWN: Final = "shutting_down"

#: Which reason to give first when several hold offers back.
HOLD_ORDER: Final = (
    SHUTTING_DOWN,
    PAUSED,
    DRAINING,
    # The owner's guards (agent/owner/guard.py):
    "too_hot",
    "outside_schedule",
    "gpu_in_use",
    "idle_unknown",
    "owner_active",
    "engine_unavailable",
    INITIALISING,
)


class NodeState:
    """The node's capacity: the scheduler's units, the holds on new offers, the share limit.

    ``on_change`` is called after every change of what :meth:`status` would say (a hold,
    a unit's health or job); it reads, it does not call back into the jobs.
    """

    def __init__(self, scheduler: Scheduler, *, share_limit: int | None = None) -> None:
        self.scheduler = scheduler
        self.share_limit = share_limit
        """Most GPU units busy at once; None: all."""
        self._holds: dict[str, str] = {INITIALISING: "checking the GPUs"}
        self.on_change: Callable[[], None] = _nothing

    # -- holds ---------------------------------------------------------------------------

    def hold(self, code: str, detail: str) -> None:
        """Refuse new offers with ``code`` until :meth:`release` of that code."""
        if self._holds.get(code) != detail:
            self._holds[code] = detail
            self.on_change()

    def release(self, code: str) -> None:
        """Drop one reason to refuse offers."""
        if self._holds.pop(code, None) is not None:
            self.on_change()

    def held(self, code: str) -> bool:
        """Whether ``code`` holds offers back now."""
        return code in self._holds

    def hold_detail(self, code: str) -> str:
        """What the hold ``code`` says; empty if it is not held."""
        return self._holds.get(code, "")

    @property
    def unavailable(self) -> tuple[str, str] | None:
        """Why offers are refused now, (code, detail), the weightiest hold first; None
        when they are taken."""
        for code in HOLD_ORDER:
            if code in self._holds:
                return code, self._holds[code]
        return next(iter(self._holds.items()), None)

    # -- units ---------------------------------------------------------------------------

    def assign(self, job_id: str, request: GpuRequest) -> list[str] | None:
        """Reserve units for a job within the share limit; None if none fit now. Silent:
        the manager calls :meth:`changed` once the job's start is on disk."""
        return self.scheduler.assign(job_id, request, self.share_limit)

    def free(self, job_id: str) -> None:
        """Give a job's units back (silent, as :meth:`assign`)."""
        self.scheduler.release(job_id)

    def changed(self) -> None:
        """Tell whoever reports the node that what it would report may have changed."""
        self.on_change()

    def status(self) -> NodeStatusBody | None:
        """What the coordinator should know of this node's capacity; None while the GPUs
        have not been checked yet (no capacity is ever reported before)."""
        if self.scheduler.initialising:
            return None
        units = [
            UnitStatus(
                id=unit_id,
                health="unhealthy" if unit.health == "unhealthy" else "healthy",
                reason=unit.reason[:MAX_ERROR_DETAIL_CHARS],
                job_id=unit.job_id,
            )
            for unit_id, unit in self.scheduler.units.items()
        ]
        code, detail = self.unavailable or ("", "")
        return NodeStatusBody(
            available=self.unavailable is None, units=units, reason=code, detail=detail
        )


def _nothing() -> None:
    return None
