"""What the tray shows for a state of the daemon: icon, headline, tooltip, menu. Pure.

:func:`present` maps the last thing the state stream said (a ``StatusView``, or the
``ControlError`` that says why there is none) and the owner's settings to a
:class:`Presentation`; the Qt side only applies it. One icon kind at a time, the first
that holds of:

    error     the daemon cannot be reached (with the fix: start it, join its group)
    paused    the owner paused it, or a guard holds sharing back (too hot, owner active,
              outside the schedule...), or the daemon itself does (still checking the
              GPUs, no Docker engine), with the reason
    busy      a job runs on this machine
    offline   no coordinator connection (the daemon retries by itself)
    sharing   connected and waiting for work

A pause outranks a running job: the owner who pressed pause sees that it took, and the
tooltip says which jobs are still finishing.
"""

from __future__ import annotations

from datetime import datetime, time, timedelta
from typing import Final, Literal, NamedTuple
from urllib.parse import urlsplit, urlunsplit

from agent.control.wire import GpuView, StatusView
from agent.errors import ControlError
from agent.owner.policy import OwnerPolicy

__all__ = [
    "GUARD_WORDS",
    "KINDS",
    "MORNING",
    "Kind",
    "Menu",
    "Presentation",
    "dashboard_url",
    "error_headline",
    "present",
    "tomorrow_morning",
    "until_text",
]

Kind = Literal["sharing", "busy", "paused", "offline", "error"]
KINDS: Final[tuple[Kind, ...]] = ("sharing", "busy", "paused", "offline", "error")

#: "Pause until tomorrow" ends at this local time on the next calendar day.
MORNING: Final = time(8, 0)

#: A guard's code (``StatusView.guard``) in the owner's words.
GUARD_WORDS: Final = {
    "owner_active": "you are using this computer",
    "gpu_in_use": "another program uses a GPU",
    "idle_unknown": "cannot tell whether you are away",
    "too_hot": "a GPU is too hot",
    "outside_schedule": "outside your sharing hours",
}

_LOOKING: Final = "Looking for the agent…"
_ERROR_HEADLINES: Final = {
    "daemon_not_running": "Agent not running",
    "permission_denied": "Not allowed to reach the agent",
    "connection_lost": "Lost the agent",
}


class Menu(NamedTuple):
    """Which menu items are enabled, and the idle toggle's check mark.

    Attributes:
        dashboard: the coordinator's dashboard URL; "" disables "Open dashboard".
    """

    pause: bool = False
    resume: bool = False
    pause_timed: bool = False
    idle_toggle: bool = False
    idle_checked: bool = False
    dashboard: str = ""
    log: bool = False
    settings: bool = False


class Presentation(NamedTuple):
    """The tray for one state.

    Attributes:
        headline: one line: the menu's first item and a notification's title.
        fix: what the user can do about an error ("" otherwise).
    """

    kind: Kind
    headline: str
    tooltip: str
    fix: str = ""
    menu: Menu = Menu()


def present(
    state: StatusView | ControlError | None, settings: OwnerPolicy | None, now: datetime
) -> Presentation:
    """The tray for ``state`` (None: no answer yet) at local time ``now``."""
    if state is None:
        return Presentation(
            "offline", "Looking for the agent…", "gpu-agent: looking for the agent…"
        )
    if isinstance(state, ControlError):
        return _present_error(state)
    kind, headline = _headline(state, now)
    lines = [f"gpu-agent: {headline}"]
    if state.guard and state.guard_detail:
        lines.append(state.guard_detail)
    elif not state.paused and state.pause_reason:
        lines.append(state.pause_reason)
    if state.connection != "connected":
        lines.append(
            f"Coordinator: {state.connection_error}"
            if state.connection_error
            else f"Coordinator: {state.connection} to {state.coordinator_url}"
        )
    lines += [_gpu_line(gpu) for gpu in state.gpus]
    if state.jobs:
        label = "Current job" if len(state.jobs) == 1 else "Current jobs"
        shown = [
            job.job_id if job.state == "running" else f"{job.job_id} ({job.shown_state})"
            for job in state.jobs
        ]
        lines.append(f"{label}: {', '.join(shown)}")
    lines.append(f"Today: {_count(state.jobs_done_today, 'job')} done")
    menu = Menu(
        pause=not state.paused,
        resume=state.paused,
        pause_timed=True,
        idle_toggle=settings is not None,
        idle_checked=settings is not None and settings.share_only_when_idle,
        dashboard=dashboard_url(state.coordinator_url),
        log=True,
        settings=True,
    )
    return Presentation(kind, headline, "\n".join(lines), menu=menu)


def error_headline(code: str) -> str:
    """An error's one-line name for the owner."""
    return _ERROR_HEADLINES.get(code, f"Agent error ({code})")


def _present_error(error: ControlError) -> Presentation:
    headline = error_headline(error.code)
    lines = [f"gpu-agent: {headline}"]
    if error.detail:
        lines.append(error.detail)
    if error.fix:
        lines.append(f"Fix: {error.fix}")
    return Presentation("error", headline, "\n".join(lines), fix=error.fix)


def _headline(state: StatusView, now: datetime) -> tuple[Kind, str]:
    running = len(state.jobs)
    if state.paused:
        headline = "Paused"
        if state.paused_until is not None:
            headline += f" {until_text(state.paused_until, now)}"
        if state.draining:
            headline += f", finishing {_count(running, 'job')}"
        elif running:
            headline += f", {_count(running, 'job')} still running"
        return "paused", headline
    if state.guard:
        return "paused", f"Paused: {GUARD_WORDS.get(state.guard, state.guard)}"
    if state.pause_reason:  # held back by the daemon itself: starting, no Docker engine...
        return "paused", "Not taking jobs"
    if running:
        return "busy", f"Running {_count(running, 'job')}"
    if state.connection != "connected":
        return "offline", "Offline: no coordinator"
    return "sharing", "Sharing, waiting for work"


def _gpu_line(gpu: GpuView) -> str:
    line = f"GPU {gpu.index} {gpu.name}: "
    if gpu.health == "unhealthy":
        return line + "unhealthy" + (f" ({gpu.health_reason})" if gpu.health_reason else "")
    readings = []
    if gpu.temperature_c is not None:
        readings.append(f"{gpu.temperature_c:.0f} °C")
    if gpu.utilization_pct is not None:
        readings.append(f"{gpu.utilization_pct:.0f} % busy")
    if gpu.assigned_job:
        readings.append(f"job {gpu.assigned_job}")
    return line + (", ".join(readings) or "no reading")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def dashboard_url(coordinator_url: str) -> str:
    """The coordinator's dashboard: ``ws(s)://host:port/agent`` -> ``http(s)://host:port/``;
    "" if the URL is not a websocket one."""
    parts = urlsplit(coordinator_url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        return ""
    return urlunsplit((scheme, parts.netloc, "/", "", ""))


def tomorrow_morning(now: datetime) -> float:
    """When "pause until tomorrow" ends: :data:`MORNING` on the calendar day after ``now``'s,
    as Unix seconds. ``now`` is local: naive (the system's zone) or with a ``ZoneInfo``; the
    hour is a wall-clock one across a daylight-saving change."""
    return datetime.combine(now.date() + timedelta(days=1), MORNING, tzinfo=now.tzinfo).timestamp()


def until_text(until: float, now: datetime) -> str:
    """``until 14:05``, ``until tomorrow 08:00`` or ``until Tue 3 Mar 08:00``, in ``now``'s zone."""
    end = datetime.fromtimestamp(until, tz=now.tzinfo)
    if end.date() == now.date():
        return f"until {end:%H:%M}"
    if end.date() == now.date() + timedelta(days=1):
        return f"until tomorrow {end:%H:%M}"
    return f"until {end:%a} {end.day} {end:%b %H:%M}"
