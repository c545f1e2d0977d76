"""The owner's controls: when this machine's GPUs may be shared. Pure.

A consumer GPU owner lends the GPUs while away and must never notice the agent when back:
sharing stops when the owner is active (the session is not idle, or a process that is not
ours uses a GPU), when a GPU runs too hot, outside the owner's schedule, or while the owner
paused it. :func:`decide` turns one observation of the machine into a verdict; the daemon
does the observing and acts on the verdict (refuse offers, preempt running jobs, tell the
coordinator why).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime, time, timedelta
from typing import Annotated, Final, Literal, NamedTuple

import msgspec

__all__ = [
    "DISPLAY_SERVERS",
    "MAX_PAUSE_UNTIL",
    "WEEKDAYS",
    "Observation",
    "OwnerPolicy",
    "Verdict",
    "Window",
    "changed",
    "decide",
    "in_schedule",
    "too_hot",
]

#: Display servers and compositors: on a desktop they always hold a GPU context.
DISPLAY_SERVERS = (
    "Xorg",
    "Xwayland",
    "gnome-shell",
    "kwin_wayland",
    "kwin_x11",
    "plasmashell",
    "mutter",
    "sway",
    "weston",
    "Hyprland",
    "labwc",
    "wayfire",
    "cosmic-comp",
)

Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
WEEKDAYS: tuple[Weekday, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_HH_MM = re.compile(r"(?:[01]\d|2[0-3]):[0-5]\d")


#: The latest pause ``until``: the end of 9998, Unix seconds. Later ones cannot be shown
#: as local dates (year 9999 and a time zone overflow); nobody pauses that long.
MAX_PAUSE_UNTIL: Final = 253370764800.0


class Window(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A time window in which sharing is allowed, in the machine's local time.

    ``start`` and ``end`` are ``HH:MM``. A window whose end is not after its start crosses
    midnight: ``22:00``-``07:00`` on ``fri`` runs from Friday 22:00 to Saturday 07:00;
    ``00:00``-``00:00`` is the whole day. ``days`` are the days the window starts on.
    """

    days: list[Weekday] = msgspec.field(default_factory=lambda: list(WEEKDAYS))
    start: str = "00:00"
    end: str = "00:00"

    def __post_init__(self) -> None:
        for name in ("start", "end"):
            if not _HH_MM.fullmatch(getattr(self, name)):
                raise ValueError(f"{name}: {getattr(self, name)!r} is not HH:MM (00:00-23:59)")
        if not self.days:
            raise ValueError("days: a window needs at least one day")


_Celsius = Annotated[float, msgspec.Meta(gt=0, lt=150)]


class OwnerPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What the owner allows. The defaults share all GPUs at any time, as a server would.

    Attributes:
        share_only_when_idle: share only while the owner is away: the session idle for
            ``idle_delay_s`` and no other process on a GPU.
        idle_delay_s: how long the session must be idle first.
        pause_above_c: stop sharing when any GPU is hotter than this...
        resume_below_c: ...and share again once every GPU is below this (hysteresis).
        schedule: windows in which sharing is allowed; empty: any time.
        max_shared_gpus: how many GPUs (or MIG instances) jobs may use at once; None: all.
        power_limit_w: the power limit to set on each GPU while sharing, where the driver
            allows it and the agent has the right; None: leave it as it is.
        ignored_processes: process names (``/proc/PID/comm``, at most 15 characters)
            that do not count as the owner using a GPU: the display server and the
            compositor hold the GPU all the time a desktop runs.
    """

    share_only_when_idle: bool = False
    # Finite bounds on each: an infinite delay or limit is never reached, only stored.
    idle_delay_s: Annotated[float, msgspec.Meta(ge=0, le=86400)] = 300.0
    pause_above_c: _Celsius | None = None
    resume_below_c: _Celsius | None = None
    schedule: list[Window] = []
    max_shared_gpus: Annotated[int, msgspec.Meta(ge=0, le=1024)] | None = None
    power_limit_w: Annotated[float, msgspec.Meta(gt=0, le=10000)] | None = None
    ignored_processes: list[Annotated[str, msgspec.Meta(min_length=1, max_length=15)]] = (
        msgspec.field(default_factory=lambda: list(DISPLAY_SERVERS))
    )

    def __post_init__(self) -> None:
        hot, cool = self.pause_above_c, self.resume_below_c
        if (hot is None) != (cool is None):
            raise ValueError("pause_above_c and resume_below_c go together")
        if hot is not None and cool is not None and not cool < hot:
            raise ValueError(f"resume_below_c ({cool}) must be below pause_above_c ({hot})")


class Observation(msgspec.Struct, frozen=True, kw_only=True):
    """What the daemon saw of the machine at one moment.

    Attributes:
        now: the local time, with its time zone.
        idle_s: how long the owner's session has been idle; None when it cannot be told.
        foreign_gpu_processes: processes not started by the agent that hold a GPU context.
        temperatures_c: each GPU's temperature, where it reads one.
    """

    now: datetime
    idle_s: float | None = None
    foreign_gpu_processes: int = 0
    temperatures_c: Mapping[str, float] = {}


class Verdict(NamedTuple):
    """Whether to share now, and if not, the code and words that say why.

    ``hot`` is the GPUs over the thermal guard, carried to the next :func:`decide` (the
    hysteresis is in it).
    """

    share: bool
    code: str = ""
    detail: str = ""
    hot: frozenset[str] = frozenset()


def changed(policy: OwnerPolicy, changes: Mapping[str, object]) -> OwnerPolicy:
    """``policy`` with some of its fields changed, validated as a whole.

    Raises:
        ValueError: a change names an unknown field or makes the policy invalid; the
            message names the field.
    """
    merged = {**msgspec.to_builtins(policy), **changes}
    try:
        return msgspec.convert(merged, OwnerPolicy)
    except msgspec.ValidationError as exc:
        raise ValueError(str(exc)) from None


def decide(policy: OwnerPolicy, seen: Observation, hot: frozenset[str] = frozenset()) -> Verdict:
    """The verdict for one observation; ``hot`` is the previous verdict's."""
    hot = too_hot(policy, seen.temperatures_c, hot)
    if hot:
        hottest = max(hot, key=lambda gpu: seen.temperatures_c.get(gpu, 0.0))
        degrees = seen.temperatures_c.get(hottest)
        shown = f"{degrees:.0f} °C" if degrees is not None else "no reading"
        detail = (
            f"GPU {hottest} at {shown}, above {policy.pause_above_c:.0f} °C; "
            f"sharing resumes below {policy.resume_below_c:.0f} °C"
        )
        return Verdict(False, "too_hot", detail, hot)
    if policy.schedule and not in_schedule(policy.schedule, seen.now):
        return Verdict(False, "outside_schedule", "outside the owner's sharing hours", hot)
    if policy.share_only_when_idle:
        if seen.foreign_gpu_processes:
            detail = f"{seen.foreign_gpu_processes} other process(es) use a GPU"
            return Verdict(False, "gpu_in_use", detail, hot)
        if seen.idle_s is None:
            detail = "sharing only when idle, and this session's idle time cannot be read"
            return Verdict(False, "idle_unknown", detail, hot)
        if seen.idle_s < policy.idle_delay_s:
            detail = f"the owner was active {seen.idle_s:.0f} s ago"
            return Verdict(False, "owner_active", detail, hot)
    return Verdict(True, hot=hot)


def too_hot(
    policy: OwnerPolicy, temperatures_c: Mapping[str, float], hot: frozenset[str]
) -> frozenset[str]:
    """The GPUs over the thermal guard now: those above ``pause_above_c``, and those that
    were and are not yet below ``resume_below_c``. A GPU that was hot and has no reading
    now stays hot: unknown is not cool."""
    above, below = policy.pause_above_c, policy.resume_below_c
    if above is None or below is None:
        return frozenset()
    now_hot = {gpu for gpu, degrees in temperatures_c.items() if degrees > above}
    still_hot = {gpu for gpu in hot if temperatures_c.get(gpu, above) >= below}
    return frozenset(now_hot | still_hot)


def in_schedule(windows: list[Window], now: datetime) -> bool:
    """Whether ``now`` (local time) falls in one of the windows."""
    return any(_in_window(window, now) for window in windows)


def _in_window(window: Window, now: datetime) -> bool:
    start, end = _clock(window.start), _clock(window.end)
    length = (
        timedelta(days=1)
        if start == end
        else (datetime.combine(now.date(), end) - datetime.combine(now.date(), start))
        % timedelta(days=1)
    )
    # The window that could contain now started today or, if it crosses midnight,
    # yesterday: look at both starts.
    for days_back in (0, 1):
        day = now.date() - timedelta(days=days_back)
        if WEEKDAYS[day.weekday()] not in window.days:
            continue
        opened = datetime.combine(day, start, tzinfo=now.tzinfo)
        if opened <= now < opened + length:
            return True
    return False


def _clock(text: str) -> time:
    hours, minutes = text.split(":")
    return time(int(hours), int(minutes))
