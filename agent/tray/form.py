"""The settings window's fields to and from the owner's controls. Pure.

The daemon validates the settings as a whole (``bad_settings``, naming the field); this
module only turns what the window holds into the ``changes`` that ``set_settings`` takes,
and refuses only what cannot be put into that shape (a schedule line without a time span).

The schedule is edited as text, one window a line: ``mon-fri 22:00-07:00``,
``sat,sun 00:00-00:00`` (all day), or ``22:00-07:00`` alone for every day.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, NamedTuple

from agent.owner.policy import WEEKDAYS, OwnerPolicy, Window

__all__ = ["FormValues", "changes", "format_schedule", "parse_schedule", "values_of"]

_SEPARATORS = re.compile(r"[\s,]+")


class FormValues(NamedTuple):
    """What the settings window holds; None is "off" (no guard, all GPUs, power left as is)."""

    share_only_when_idle: bool
    idle_delay_s: float
    pause_above_c: float | None
    resume_below_c: float | None
    schedule: str
    max_shared_gpus: int | None
    power_limit_w: float | None


def values_of(policy: OwnerPolicy) -> FormValues:
    """The window's fields for the controls in force."""
    return FormValues(
        share_only_when_idle=policy.share_only_when_idle,
        idle_delay_s=policy.idle_delay_s,
        pause_above_c=policy.pause_above_c,
        resume_below_c=policy.resume_below_c,
        schedule=format_schedule(policy.schedule),
        max_shared_gpus=policy.max_shared_gpus,
        power_limit_w=policy.power_limit_w,
    )


def changes(values: FormValues) -> dict[str, Any]:
    """Every control, for ``set_settings``. Raises ``ValueError`` on a bad schedule line."""
    return {
        "share_only_when_idle": values.share_only_when_idle,
        "idle_delay_s": values.idle_delay_s,
        "pause_above_c": values.pause_above_c,
        "resume_below_c": values.resume_below_c,
        "schedule": parse_schedule(values.schedule),
        "max_shared_gpus": values.max_shared_gpus,
        "power_limit_w": values.power_limit_w,
    }


def format_schedule(windows: Sequence[Window]) -> str:
    """One line a window; its days left out when it is every day, three or more days in a
    row written as a range (``mon-fri``)."""
    lines = []
    for window in windows:
        span = f"{window.start}-{window.end}"
        days = sorted({WEEKDAYS.index(day) for day in window.days})
        lines.append(span if len(days) == len(WEEKDAYS) else f"{_day_runs(days)} {span}")
    return "\n".join(lines)


def _day_runs(days: list[int]) -> str:
    runs: list[list[int]] = []
    for day in days:
        if runs and runs[-1][-1] == day - 1:
            runs[-1].append(day)
        else:
            runs.append([day])
    words = []
    for run in runs:
        if len(run) >= 3:
            words.append(f"{WEEKDAYS[run[0]]}-{WEEKDAYS[run[-1]]}")
        else:
            words += [WEEKDAYS[day] for day in run]
    return ",".join(words)


def parse_schedule(text: str) -> list[dict[str, Any]]:
    """The windows of the schedule text (blank lines skipped). Day ranges such as
    ``mon-fri`` or ``fri-mon`` are expanded; the times and day names are left for the
    daemon to judge. Raises ``ValueError`` naming the line."""
    windows: list[dict[str, Any]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        words = [word for word in _SEPARATORS.split(line.strip().lower()) if word]
        if not words:
            continue
        *day_words, span = words
        start, dash, end = span.partition("-")
        if not dash or ":" not in start or ":" not in end:
            raise ValueError(
                f"schedule line {number}: {line.strip()!r} ends in no time span; "
                "write it as: mon-fri 22:00-07:00"
            )
        window: dict[str, Any] = {"start": start, "end": end}
        if day_words:
            window["days"] = [day for word in day_words for day in _days(word, number)]
        windows.append(window)
    return windows


def _days(word: str, number: int) -> list[str]:
    first, dash, last = word.partition("-")
    if not dash:
        return [word]
    if first not in WEEKDAYS or last not in WEEKDAYS:
        raise ValueError(f"schedule line {number}: {word!r} is not a range of days such as mon-fri")
    begin, stop = WEEKDAYS.index(first), WEEKDAYS.index(last)
    return [WEEKDAYS[(begin + i) % 7] for i in range((stop - begin) % 7 + 1)]
