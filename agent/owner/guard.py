"""The owner's controls at work in the daemon: observe, decide, hold or preempt.

Every sample tick the daemon hands :meth:`OwnerGuard.tick` the GPUs' readings; the guard
turns them, the session's idle time and the clock into an :class:`~agent.owner.policy.Observation`,
asks :func:`~agent.owner.policy.decide`, and acts:

- sharing not allowed: new offers are refused with the guard's code (the coordinator
  hears it in ``node_status``) and running jobs are stopped with their grace period and
  reported ``preempted``, with their receipts; a service is drained first (no new
  requests; those in flight finish within its grace period), then ends ``preempted``;
- allowed again: the hold is lifted.

The owner's own pause (for an hour, until tomorrow, until resumed) and the settings changed
through the control API are kept in ``state_dir/owner.json``, so a restart neither resumes
sharing behind the owner's back nor forgets their choices.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import msgspec

from agent.errors import ControlError
from agent.jobs.manager import JobManager
from agent.jobs.node import PAUSED, NodeState
from agent.owner.policy import (
    MAX_PAUSE_UNTIL,
    Observation,
    OwnerPolicy,
    Verdict,
    changed,
    decide,
)
from hal.types import GpuSample, is_value
from sandbox.cgroups import in_job_container

__all__ = ["GUARD_CODES", "OwnerGuard"]

_log = logging.getLogger(__name__)

#: The codes an owner guard holds offers back with (agent.owner.policy.decide's).
GUARD_CODES = ("too_hot", "outside_schedule", "gpu_in_use", "idle_unknown", "owner_active")


class Stale:
    """The type of :data:`STALE`: no new idle reading this time."""


STALE = Stale()


class _Saved(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What ``owner.json`` keeps."""

    policy: dict[str, Any] | None = None
    paused: bool = False
    # Checked as the control API checks it: a file edited by hand must not crash the start.
    paused_until: Annotated[float, msgspec.Meta(ge=0, le=MAX_PAUSE_UNTIL)] | None = None


class OwnerGuard:
    """Applies the owner's policy to the job manager, tick by tick."""

    def __init__(
        self,
        *,
        jobs: JobManager,
        node: NodeState,
        policy: OwnerPolicy,
        store: Path,
        idle_seconds: Callable[[], float | None] = lambda: None,
        clock: Callable[[], float] = time.time,
        proc: Path = Path("/proc"),
    ) -> None:
        self.jobs = jobs
        self.node = node
        self.proc = proc
        self.configured = policy
        self.policy = policy
        self.store = store
        self.idle_seconds = idle_seconds
        self.clock = clock
        self.verdict = Verdict(True)
        self.last_idle: float | None = None
        self.paused_until: float | None = None
        self._load()
        self.node.share_limit = self.policy.max_shared_gpus

    # -- the owner's choices ----------------------------------------------------------

    def pause(self, until: float | None) -> None:
        """Take no new jobs until ``until`` (Unix seconds) or until :meth:`resume`."""
        if until is not None and until <= self.clock():
            raise ControlError("bad_params", "a pause must end in the future")
        self.paused_until = until
        self.node.hold(PAUSED, "paused by the owner" + _until_text(until))
        self._save()

    def resume(self) -> None:
        """Take jobs again (the guards still apply)."""
        self.paused_until = None
        self.node.release(PAUSED)
        self._save()

    def change(self, changes: Mapping[str, object]) -> OwnerPolicy:
        """Change some settings; refused as a whole (``bad_settings``) if invalid."""
        try:
            policy = changed(self.policy, changes)
        except ValueError as exc:
            raise ControlError("bad_settings", str(exc)) from None
        self.policy = policy
        self.node.share_limit = policy.max_shared_gpus
        self._save()
        return policy

    # -- every tick ----------------------------------------------------------------------

    def power_limit_w(self) -> float | None:
        """The power limit the GPUs are to be held to now: the owner's, while sharing (no
        guard tripped, not paused); None (their own limits) otherwise."""
        sharing = self.verdict.share and not self.node.held(PAUSED)
        return self.policy.power_limit_w if sharing else None

    def read_idle(self) -> float | None:
        """The session's idle time, when the policy needs it (else None, and no cost).
        Blocking (D-Bus, X11): the daemon calls it in its sampler thread."""
        return self.idle_seconds() if self.policy.share_only_when_idle else None

    def tick(self, gpus: Iterable[GpuSample], idle_s: float | Stale | None = STALE) -> Verdict:
        """Observe, decide, act; the verdict. ``idle_s`` is :meth:`read_idle`'s answer;
        left out, the last one given stands (a settings change between two samples)."""
        if not isinstance(idle_s, Stale):
            self.last_idle = idle_s
        now = self.clock()
        if self.paused_until is not None and now >= self.paused_until:
            _log.info("the owner's pause has ended")
            self.resume()
        seen = self.observe(list(gpus), now)
        verdict = decide(self.policy, seen, self.verdict.hot)
        if verdict.share:
            for code in GUARD_CODES:
                self.node.release(code)
        else:
            if not self.verdict.share and self.verdict.code != verdict.code:
                self.node.release(self.verdict.code)
            self.node.hold(verdict.code, verdict.detail)
            self.jobs.preempt(verdict.detail)
        self.verdict = verdict
        return verdict

    def observe(self, gpus: list[GpuSample], now: float) -> Observation:
        """What the policy needs to know of the machine now."""
        temperatures = {g.id: g.temperature_c for g in gpus if is_value(g.temperature_c)}
        return Observation(
            now=datetime.fromtimestamp(now).astimezone(),
            idle_s=self.last_idle if self.policy.share_only_when_idle else None,
            foreign_gpu_processes=self._foreign_processes(gpus),
            temperatures_c={k: float(v) for k, v in temperatures.items()},
        )

    def _foreign_processes(self, gpus: list[GpuSample]) -> int:
        """Processes on a GPU that are neither in one of our jobs' containers nor a
        display server the owner's policy ignores."""
        pids = {p.pid for g in gpus if is_value(g.processes) for p in g.processes}
        if not pids:
            return 0
        ours, ignored = self.jobs.container_ids(), set(self.policy.ignored_processes)
        return sum(
            1
            for pid in pids
            if not in_job_container(pid, ours, self.proc) and _name(self.proc, pid) not in ignored
        )

    # -- storage --------------------------------------------------------------------------

    def _load(self) -> None:
        try:
            saved = msgspec.json.decode(self.store.read_bytes(), type=_Saved)
        except FileNotFoundError:
            return
        except (OSError, msgspec.DecodeError) as exc:
            _log.error("ignoring %s (%s): the configured owner settings apply", self.store, exc)
            return
        if saved.policy is not None:
            try:
                self.policy = changed(self.configured, saved.policy)
            except ValueError as exc:
                _log.error("ignoring the saved owner settings in %s: %s", self.store, exc)
        if saved.paused:
            self.paused_until = saved.paused_until
            self.node.hold(PAUSED, "paused by the owner" + _until_text(saved.paused_until))

    def _save(self) -> None:
        changes = {
            name: value
            for name, value in msgspec.to_builtins(self.policy).items()
            if msgspec.to_builtins(self.configured).get(name) != value
        }
        saved = _Saved(
            policy=changes or None,
            paused=self.node.held(PAUSED),
            paused_until=self.paused_until,
        )
        staging = self.store.with_suffix(".new")
        staging.write_bytes(msgspec.json.encode(saved))
        os.replace(staging, self.store)


def _name(proc: Path, pid: int) -> str:
    """A process's name (``comm``), "" when it is gone or hidden."""
    try:
        return (proc / str(pid) / "comm").read_text(encoding="utf-8").strip()
    except OSError:
        return ""


def _until_text(until: float | None) -> str:
    if until is None:
        return ""
    return f" until {datetime.fromtimestamp(until).astimezone():%a %H:%M}"
