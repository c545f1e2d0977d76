"""The owner's controls as pure decisions: idle, thermal hysteresis, schedule, midnight."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import msgspec
import pytest

from agent.owner.policy import Observation, OwnerPolicy, Window, decide, in_schedule, too_hot

BERLIN = ZoneInfo("Europe/Berlin")


def at(text: str) -> datetime:
    """A local time in Berlin; 2026-11-23 is a Monday."""
    return datetime.fromisoformat(text).replace(tzinfo=BERLIN)


MONDAY_NOON = at("2026-11-23T12:00")


def test_the_default_policy_always_shares() -> None:
    assert decide(OwnerPolicy(), Observation(now=MONDAY_NOON)).share


@pytest.mark.parametrize(
    ("idle_s", "foreign", "code"),
    [
        (600.0, 0, ""),
        (299.0, 0, "owner_active"),
        (None, 0, "idle_unknown"),
        (600.0, 1, "gpu_in_use"),
    ],
)
def test_share_only_when_idle(idle_s: float | None, foreign: int, code: str) -> None:
    policy = OwnerPolicy(share_only_when_idle=True, idle_delay_s=300)
    seen = Observation(now=MONDAY_NOON, idle_s=idle_s, foreign_gpu_processes=foreign)
    verdict = decide(policy, seen)
    assert (verdict.share, verdict.code) == (code == "", code)


def test_idle_is_ignored_unless_the_owner_asked_for_it() -> None:
    seen = Observation(now=MONDAY_NOON, idle_s=0, foreign_gpu_processes=3)
    assert decide(OwnerPolicy(), seen).share


def test_thermal_guard_has_hysteresis() -> None:
    policy = OwnerPolicy(pause_above_c=85, resume_below_c=75)
    hot: frozenset[str] = frozenset()
    shares = []
    for degrees in (70, 86, 80, 76, 74.9, 84, 85.5):
        verdict = decide(policy, Observation(now=MONDAY_NOON, temperatures_c={"g0": degrees}), hot)
        hot = verdict.hot
        shares.append((verdict.share, verdict.code))
    assert shares == [
        (True, ""),
        (False, "too_hot"),  # above 85
        (False, "too_hot"),  # cooling, not yet below 75
        (False, "too_hot"),
        (True, ""),  # below 75
        (True, ""),  # warm again, but not above 85
        (False, "too_hot"),
    ]


def test_one_hot_gpu_of_several_pauses_and_is_named() -> None:
    policy = OwnerPolicy(pause_above_c=85, resume_below_c=75)
    verdict = decide(policy, Observation(now=MONDAY_NOON, temperatures_c={"a": 60, "b": 90}))
    assert (verdict.share, verdict.hot) == (False, frozenset({"b"}))
    assert "GPU b at 90 °C" in verdict.detail


def test_a_hot_gpu_without_a_reading_stays_hot() -> None:
    policy = OwnerPolicy(pause_above_c=85, resume_below_c=75)
    assert too_hot(policy, {}, frozenset({"a"})) == {"a"}
    assert too_hot(policy, {"a": 60}, frozenset({"a"})) == frozenset()


@pytest.mark.parametrize(
    ("now", "inside"),
    [
        ("2026-11-23T21:59", False),  # Monday evening, before the window
        ("2026-11-23T22:00", True),
        ("2026-11-23T23:59", True),
        ("2026-11-24T00:00", True),  # Tuesday morning: Monday's window goes on
        ("2026-11-24T06:59", True),
        ("2026-11-24T07:00", False),
        ("2026-11-24T22:30", False),  # Tuesday's night is not in the schedule
        ("2026-11-25T03:00", False),
    ],
)
def test_a_window_crossing_midnight_belongs_to_the_day_it_starts(now: str, inside: bool) -> None:
    window = Window(days=["mon"], start="22:00", end="07:00")
    assert in_schedule([window], at(now)) is inside


def test_a_whole_day_window_and_several_windows() -> None:
    weekend = Window(days=["sat", "sun"])  # 00:00-00:00: all day
    lunch = Window(days=["mon", "tue", "wed", "thu", "fri"], start="12:00", end="13:30")
    schedule = [weekend, lunch]
    assert in_schedule(schedule, at("2026-11-28T03:00"))  # Saturday
    assert in_schedule(schedule, at("2026-11-23T12:15"))  # Monday lunch
    assert not in_schedule(schedule, at("2026-11-23T14:00"))
    policy = OwnerPolicy(schedule=schedule)
    verdict = decide(policy, Observation(now=at("2026-11-23T14:00")))
    assert (verdict.share, verdict.code) == (False, "outside_schedule")


def test_schedule_follows_local_time_across_a_dst_change() -> None:
    # 2026-03-29: Europe/Berlin springs forward at 02:00; a 01:00-04:00 window is 2 h.
    window = Window(days=["sun"], start="01:00", end="04:00")
    assert in_schedule([window], at("2026-03-29T03:30"))
    assert not in_schedule([window], at("2026-03-29T04:00"))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"pause_above_c": 85}, "go together"),
        ({"pause_above_c": 80, "resume_below_c": 80}, "must be below"),
        ({"schedule": [{"start": "25:00"}]}, "not HH:MM"),
        ({"schedule": [{"days": []}]}, "at least one day"),
        ({"schedule": [{"days": ["monday"]}]}, "Invalid enum value .monday."),
        ({"max_shared_gpus": -1}, ">= 0"),
        ({"idle": True}, "unknown field"),
    ],
)
def test_a_bad_policy_is_refused_with_what_is_wrong(raw: dict[str, object], message: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=message):
        msgspec.convert(raw, OwnerPolicy)
