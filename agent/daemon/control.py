"""The daemon's side of the local control API: its state as views, pause and resume.

:class:`DaemonControl` implements :class:`agent.control.wire.ControlTarget` over the job manager,
the scheduler, the ledger and the link; the control server (agent/control/server.py) and
the metrics endpoint read it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any

from agent.control.wire import GpuView, JobView, LogChunkView, StatusView
from agent.daemon.metrics import MetricsInput
from agent.errors import ControlError
from agent.jobs.ledger import JobRecord
from agent.jobs.manager import JobManager
from agent.jobs.node import DRAINING, PAUSED, NodeState
from agent.link.connection import Link
from agent.link.identity import Identity
from agent.owner.guard import OwnerGuard
from agent.owner.policy import OwnerPolicy
from hal import __version__
from hal.types import GpuSample, is_value

__all__ = ["DaemonControl"]

_FOLLOW_POLL_S = 0.2


class DaemonControl:
    """What ``gpu-agent status``, ``pause``, ``jobs``, ``logs`` and the tray see and do."""

    def __init__(
        self,
        *,
        identity: Identity,
        jobs: JobManager,
        node: NodeState,
        guard: OwnerGuard,
        link: Link,
        latest: Callable[[], list[GpuSample]],
        clock: Callable[[], float],
        power: Callable[[str], str] = lambda gpu_id: "",
        in_flight: Callable[[str], int] = lambda job_id: 0,
    ) -> None:
        self.identity = identity
        self.in_flight = in_flight
        """Requests in flight to a service (by job id), which a drain lets finish."""
        self.manager = jobs
        self.node = node
        self.guard = guard
        self.link = link
        self.latest = latest
        self.clock = clock
        self.power = power

    def status(self) -> StatusView:
        jobs, link = self.manager, self.link
        samples = {s.id: s for s in self.latest()}
        gpus = []
        for index, (unit_id, unit) in enumerate(self.node.scheduler.units.items()):
            sample = samples.get(unit_id)
            temperature = sample.temperature_c if sample else None
            utilisation = sample.util_gpu_pct if sample else None
            gpus.append(
                GpuView(
                    index=index,
                    uuid=unit_id,
                    name=unit.gpu.name,
                    vendor=unit.gpu.vendor,
                    health=unit.health,
                    health_reason=unit.reason,
                    assigned_job=unit.job_id,
                    temperature_c=temperature if is_value(temperature) else None,
                    utilization_pct=utilisation if is_value(utilisation) else None,
                    power_limit=self.power(unit_id),
                )
            )
        running = [self._view(r) for job_id in jobs.tasks if (r := jobs.ledger.get(job_id))]
        node = self.node
        hold = node.unavailable
        verdict = self.guard.verdict
        return StatusView(
            agent_version=__version__,
            node_id=self.identity.node_id,
            connection="connected" if link.connected.is_set() else "connecting",
            coordinator_url=link.config.url,
            paused=node.held(PAUSED),
            pause_reason=node.hold_detail(PAUSED)
            or (f"{hold[0]}: {hold[1]}" if hold and hold[0] != DRAINING else ""),
            paused_until=self.guard.paused_until if node.held(PAUSED) else None,
            draining=node.held(DRAINING),
            guard="" if verdict.share else verdict.code,
            guard_detail="" if verdict.share else verdict.detail,
            gpus=gpus,
            jobs=running,
            outbox_depth=jobs.outbox.depth(),
            jobs_done_today=jobs.ledger.count_finished_since(_midnight(self.clock())),
        )

    async def pause(self, drain: bool, until: float | None = None) -> StatusView:
        self.guard.pause(until)
        if drain:
            self.node.hold(DRAINING, "waiting for running jobs to end")
            try:
                # A service never ends by itself: it ends once its requests are done.
                await self.manager.drain_services(self.in_flight)
                await self.manager.wait_idle()
            finally:
                self.node.release(DRAINING)
        return self.status()

    async def resume(self) -> StatusView:
        self.node.release(DRAINING)
        self.guard.resume()
        return self.status()

    def settings(self) -> OwnerPolicy:
        return self.guard.policy

    async def set_settings(self, changes: dict[str, Any]) -> OwnerPolicy:
        policy = self.guard.change(changes)
        # Applied now, not at the next sample: a guard the owner just set trips at once.
        self.guard.tick(self.latest())
        self.node.changed()
        return policy

    def jobs(self, limit: int) -> list[JobView]:
        return [self._view(record) for record in self.manager.ledger.recent(limit)]

    def job(self, job_id: str) -> JobView:
        return self._view(self._record(job_id))

    async def logs(self, job_id: str, follow: bool) -> AsyncIterator[LogChunkView]:
        ledger = self.manager.ledger
        self._record(job_id)
        after = 0
        while True:
            lines = ledger.logs(job_id, after)
            for line in lines:
                yield LogChunkView(
                    stream="stderr" if line.stream == "stderr" else "stdout", data=line.data
                )
                after = line.n
            if lines or not follow:
                if not follow:
                    return
                continue
            if self._record(job_id).final and not ledger.logs(job_id, after):
                return
            await asyncio.sleep(_FOLLOW_POLL_S)

    def metrics(self) -> MetricsInput:
        """The figures ``/metrics`` serves."""
        return MetricsInput.from_status(self.status(), self.manager.ledger.count_by_state())

    def _record(self, job_id: str) -> JobRecord:
        record = self.manager.ledger.get(job_id)
        if record is None:
            raise ControlError("unknown_job", f"this node has no job {job_id!r}")
        return record

    def _view(self, record: JobRecord) -> JobView:
        pulled = self.manager.pull_progress(record.job_id)
        fetched = self.manager.fetch_progress(record.job_id)
        return JobView(
            pulled_bytes=None if pulled is None else pulled[0],
            pull_bytes=None if pulled is None else pulled[1],
            fetched_bytes=None if fetched is None else fetched[0],
            fetch_bytes=None if fetched is None else fetched[1],
            job_id=record.job_id,
            state=record.state,
            gpus=record.gpus,
            created_at=record.created,
            updated_at=record.updated,
            exit_code=record.exit_code,
            code=record.code,
            detail=record.detail,
        )


def _midnight(now: float) -> float:
    """The start of today, local time, in seconds since the epoch."""
    local = datetime.fromtimestamp(now).astimezone()
    return local.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
