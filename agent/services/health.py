"""A service's health as a pure machine: what each probe's answer means.

The supervisor (:mod:`agent.services.supervisor`) probes the server and feeds each answer
here with the time; :meth:`Health.observe` says what changed. A new server is
``starting``: it is probed by its readiness check until one passes (``ready``) or its
start-up allowance runs out (restart, ``not_ready``). A ready server is probed by its
liveness check: one failure makes it ``unhealthy`` (no new requests go to it), a pass
makes it ``ready`` again, ``failures`` in a row restart it (``liveness_failed``).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

from sandbox.service_spec import HttpCheck, ServiceSpec

__all__ = ["Health", "Phase", "Verdict"]

Phase = Literal["starting", "ready", "unhealthy"]


class Verdict(NamedTuple):
    """What an answer changed: the phase to report, or a restart with its code."""

    phase: Phase | None = None
    restart: str = ""
    detail: str = ""


class Health:
    """One run of a server, from its start."""

    def __init__(self, service: ServiceSpec, started_at: float) -> None:
        self._service = service
        self._started_at = started_at
        self.phase: Phase = "starting"
        self._failed = 0

    @property
    def check(self) -> HttpCheck:
        """The check to send next: readiness until ready, then liveness."""
        return self._service.readiness if self.phase == "starting" else self._service.liveness

    def observe(self, ok: bool, now: float, why: str = "") -> Verdict:
        """One probe's answer (``why`` it failed, if it did) at ``now``."""
        if self.phase == "starting":
            if ok:
                self.phase = "ready"
                return Verdict(phase="ready")
            allowance = self._service.start_allowance_s
            if now - self._started_at >= allowance:
                detail = f"not ready after {allowance:g} s" + (f": {why}" if why else "")
                return Verdict(restart="not_ready", detail=detail)
            return Verdict()
        if ok:
            self._failed = 0
            if self.phase == "unhealthy":
                self.phase = "ready"
                return Verdict(phase="ready")
            return Verdict()
        self._failed += 1
        limit = self._service.liveness.failures
        if self._failed >= limit:
            detail = f"{limit} liveness checks failed in a row" + (f": {why}" if why else "")
            return Verdict(restart="liveness_failed", detail=detail)
        if self.phase == "ready":
            self.phase = "unhealthy"
            return Verdict(phase="unhealthy", detail=why)
        return Verdict()
