"""Which changes of state deserve a desktop notification, each told once. Pure.

- An error reaching the daemon, when its code changes: a retry that fails the same way
  again says nothing new. ``connection_lost`` and ``timeout`` are not told: the next try
  either gets a state (a quick restart, nothing to tell) or a lasting error, which is.
- A GPU that turns unhealthy.
- A job preempted by the owner's guards. The state stream lists running jobs only, so
  a job that leaves the list is looked up (``jobs``) to learn how it ended:
  :meth:`Notices.state` returns those to look up, :meth:`Notices.ended` takes the answer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, NamedTuple

from agent.control.wire import JobView, StatusView
from agent.errors import ControlError
from agent.tray.present import error_headline

__all__ = ["TRANSIENT", "Notice", "Notices"]

#: Error codes a retry is likely to clear: shown in the tray, not notified.
TRANSIENT: Final = frozenset({"connection_lost", "timeout"})
_PREEMPTED: Final = "preempted"


class Notice(NamedTuple):
    """One desktop notification; ``error`` ones carry the critical icon."""

    title: str
    text: str
    error: bool = False


class Notices:
    """Remembers what was told."""

    def __init__(self) -> None:
        self._error = ""
        self._running: set[str] = set()
        self._unhealthy: set[str] = set()
        self._told: set[str] = set()
        self._looking: set[str] = set()
        self._guard_detail = ""

    def state(self, state: StatusView | ControlError) -> tuple[list[Notice], list[str]]:
        """The notices for a new state, and the ids of jobs to look up (they stopped)."""
        if isinstance(state, ControlError):
            if state.code in TRANSIENT or state.code == self._error:
                return [], []
            self._error = state.code
            text = "\n".join(part for part in (state.detail, _fix(state.fix)) if part)
            return [Notice(error_headline(state.code), text, error=True)], []
        self._error = ""
        notices = []
        unhealthy = {gpu.uuid for gpu in state.gpus if gpu.health == "unhealthy"}
        for gpu in state.gpus:
            if gpu.uuid in unhealthy - self._unhealthy:
                reason = gpu.health_reason or "no reason given"
                text = f"{gpu.name} takes no more jobs: {reason}"
                notices.append(Notice(f"GPU {gpu.index} is unhealthy", text, error=True))
        self._unhealthy = unhealthy
        if state.guard_detail:
            self._guard_detail = state.guard_detail
        notices += self._preempted(state.jobs)
        running = {job.job_id for job in state.jobs}
        gone = self._running - running - self._told
        self._looking |= gone
        self._running = running
        return notices, sorted(gone)

    def ended(self, jobs: Iterable[JobView]) -> list[Notice]:
        """The notices for the jobs :meth:`state` asked to look up (others are ignored:
        the answer lists older jobs too)."""
        looked_up = [job for job in jobs if job.job_id in self._looking]
        self._looking -= {job.job_id for job in looked_up}
        return self._preempted(looked_up)

    def _preempted(self, jobs: Iterable[JobView]) -> list[Notice]:
        notices = []
        for job in jobs:
            if job.state != _PREEMPTED or job.job_id in self._told:
                continue
            self._told.add(job.job_id)
            why = job.detail or self._guard_detail or "the owner's settings hold sharing back"
            notices.append(Notice(f"Job {job.job_id} was preempted", why))
        return notices


def _fix(fix: str) -> str:
    return f"Fix: {fix}" if fix else ""
