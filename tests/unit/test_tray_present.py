"""The tray's pure parts, without Qt: a state to what it shows, which changes are notified,
and the settings window's fields to the daemon's settings."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import msgspec
import pytest
from support.control_target import job, status

from agent.control.client import GROUP_FIX, START_FIX
from agent.control.wire import GpuView, StatusView
from agent.errors import ControlError
from agent.owner.policy import OwnerPolicy, Window, changed
from agent.tray.form import FormValues, changes, format_schedule, parse_schedule, values_of
from agent.tray.notices import Notice, Notices
from agent.tray.present import (
    GUARD_WORDS,
    Menu,
    dashboard_url,
    present,
    tomorrow_morning,
    until_text,
)

BERLIN = ZoneInfo("Europe/Berlin")
NOW = datetime(2026, 3, 10, 14, 0, tzinfo=BERLIN)  # a Tuesday


def idle(**changes: object) -> StatusView:
    """Connected, nothing running, the GPU cool and idle."""
    gpu = GpuView(
        index=0,
        uuid="GPU-aaaa",
        name="RTX 4090",
        vendor="nvidia",
        health="healthy",
        temperature_c=41.0,
        utilization_pct=0.0,
    )
    return status(**{"gpus": [gpu], "jobs": [], **changes})


# ---------------------------------------------------------------------- present


def test_a_connected_idle_daemon_is_sharing() -> None:
    shown = present(idle(), OwnerPolicy(), NOW)
    assert (shown.kind, shown.headline, shown.fix) == ("sharing", "Sharing, waiting for work", "")
    assert shown.tooltip == (
        "gpu-agent: Sharing, waiting for work\nGPU 0 RTX 4090: 41 °C, 0 % busy\nToday: 5 jobs done"
    )
    assert shown.menu == Menu(
        pause=True,
        resume=False,
        pause_timed=True,
        idle_toggle=True,
        idle_checked=False,
        dashboard="https://coordinator.example/",
        log=True,
        settings=True,
    )


def test_a_running_job_is_busy_and_the_tooltip_says_where() -> None:
    shown = present(status(), None, NOW)
    assert (shown.kind, shown.headline) == ("busy", "Running 1 job")
    assert shown.tooltip.splitlines() == [
        "gpu-agent: Running 1 job",
        "GPU 0 NVIDIA GeForce RTX 4090: 61 °C, 97 % busy, job job-2",
        "GPU 1 NVIDIA GeForce RTX 4090: unhealthy (xid 79: fallen off the bus)",
        "Current job: job-2",
        "Today: 5 jobs done",
    ]
    # The settings are not read yet: the idle toggle waits for them.
    assert (shown.menu.idle_toggle, shown.menu.idle_checked) == (False, False)


def test_a_gpu_without_readings_says_so() -> None:
    gpu = GpuView(index=3, uuid="GPU-c", name="Arc A770", vendor="intel", health="initialising")
    shown = present(idle(gpus=[gpu], jobs_done_today=1), None, NOW)
    assert "GPU 3 Arc A770: no reading" in shown.tooltip.splitlines()
    assert shown.tooltip.endswith("Today: 1 job done")


def test_several_jobs() -> None:
    shown = present(status(jobs=[job("a", "running"), job("b", "running")]), None, NOW)
    assert shown.headline == "Running 2 jobs"
    assert "Current jobs: a, b" in shown.tooltip


def test_the_owners_pause_outranks_a_running_job() -> None:
    shown = present(status(paused=True, pause_reason="paused by the owner"), None, NOW)
    assert (shown.kind, shown.headline) == ("paused", "Paused, 1 job still running")
    assert (shown.menu.pause, shown.menu.resume, shown.menu.pause_timed) == (False, True, True)


def test_a_timed_pause_says_when_it_ends() -> None:
    until = datetime(2026, 3, 11, 8, 0, tzinfo=BERLIN).timestamp()
    shown = present(idle(paused=True, paused_until=until), None, NOW)
    assert shown.headline == "Paused until tomorrow 08:00"


def test_a_draining_pause_says_the_jobs_are_finishing() -> None:
    shown = present(status(paused=True, draining=True), None, NOW)
    assert shown.headline == "Paused, finishing 1 job"


@pytest.mark.parametrize("guard", sorted(GUARD_WORDS))
def test_a_guard_pauses_with_its_reason(guard: str) -> None:
    state = idle(guard=guard, guard_detail="the details", pause_reason=f"{guard}: the details")
    shown = present(state, None, NOW)
    assert (shown.kind, shown.headline) == ("paused", f"Paused: {GUARD_WORDS[guard]}")
    assert shown.tooltip.splitlines()[1] == "the details"
    # A guard is not the owner's pause: the owner can still pause on top of it.
    assert (shown.menu.pause, shown.menu.resume) == (True, False)


def test_a_daemon_holding_offers_back_itself_is_not_taking_jobs() -> None:
    shown = present(idle(pause_reason="engine_unavailable: no Docker engine"), None, NOW)
    assert (shown.kind, shown.headline) == ("paused", "Not taking jobs")
    assert shown.tooltip.splitlines()[1] == "engine_unavailable: no Docker engine"
    assert (shown.menu.pause, shown.menu.resume) == (True, False)


def test_no_coordinator_is_offline_with_the_reason() -> None:
    shown = present(idle(connection="connecting", connection_error="connection refused"), None, NOW)
    assert (shown.kind, shown.headline) == ("offline", "Offline: no coordinator")
    assert "Coordinator: connection refused" in shown.tooltip
    bare = present(idle(connection="offline"), None, NOW)
    assert "Coordinator: offline to wss://coordinator.example/agent" in bare.tooltip


def test_a_job_still_runs_while_the_coordinator_is_away() -> None:
    assert present(status(connection="connecting"), None, NOW).kind == "busy"


@pytest.mark.parametrize(
    ("code", "fix", "headline"),
    [
        ("daemon_not_running", START_FIX, "Agent not running"),
        ("permission_denied", GROUP_FIX, "Not allowed to reach the agent"),
        ("bad_response", "", "Agent error (bad_response)"),
    ],
)
def test_an_unreachable_daemon_is_an_error_with_its_fix(code: str, fix: str, headline: str) -> None:
    shown = present(ControlError(code, "on /run/gpu-agent/agent.sock", fix=fix), None, NOW)
    assert (shown.kind, shown.headline, shown.fix) == ("error", headline, fix)
    lines = [f"gpu-agent: {headline}", "on /run/gpu-agent/agent.sock"]
    assert shown.tooltip.splitlines() == [*lines, f"Fix: {fix}"] if fix else lines
    assert shown.menu == Menu()  # nothing to do but quit


def test_before_the_first_answer_the_tray_is_looking() -> None:
    shown = present(None, None, NOW)
    assert (shown.kind, shown.menu) == ("offline", Menu())


def test_the_idle_toggle_shows_the_setting() -> None:
    shown = present(idle(), OwnerPolicy(share_only_when_idle=True), NOW)
    assert (shown.menu.idle_toggle, shown.menu.idle_checked) == (True, True)


@pytest.mark.parametrize(
    ("url", "dashboard"),
    [
        ("wss://coordinator.example/agent", "https://coordinator.example/"),
        ("ws://127.0.0.1:8765/agent", "http://127.0.0.1:8765/"),
        ("wss://[::1]:9/agent?x=1", "https://[::1]:9/"),
        ("https://coordinator.example/agent", ""),
        ("not a url", ""),
    ],
)
def test_the_dashboard_is_the_coordinators_root_over_http(url: str, dashboard: str) -> None:
    assert dashboard_url(url) == dashboard
    assert present(idle(coordinator_url=url), None, NOW).menu.dashboard == dashboard


# ---------------------------------------------------------------------- times


@pytest.mark.parametrize(
    ("now", "until"),
    [
        (datetime(2026, 3, 10, 14, 0), datetime(2026, 3, 11, 8, 0)),
        (datetime(2026, 3, 10, 0, 30), datetime(2026, 3, 11, 8, 0)),  # the next calendar day
        (datetime(2026, 12, 31, 23, 59), datetime(2027, 1, 1, 8, 0)),
        # Clocks go forward that night: still 08:00 on the wall, 23 hours on.
        (datetime(2026, 3, 28, 9, 0), datetime(2026, 3, 29, 8, 0)),
    ],
)
def test_tomorrow_morning_is_eight_on_the_next_day(now: datetime, until: datetime) -> None:
    ends = tomorrow_morning(now.replace(tzinfo=BERLIN))
    assert datetime.fromtimestamp(ends, BERLIN) == until.replace(tzinfo=BERLIN)


def test_tomorrow_morning_across_daylight_saving_is_23_hours_away() -> None:
    now = datetime(2026, 3, 28, 8, 0, tzinfo=BERLIN)
    assert tomorrow_morning(now) - now.timestamp() == 23 * 3600


def test_until_text_names_the_day_only_when_needed() -> None:
    at = datetime(2026, 3, 10, 15, 5, tzinfo=BERLIN).timestamp()
    assert until_text(at, NOW) == "until 15:05"
    assert until_text(at + 86400, NOW) == "until tomorrow 15:05"
    assert until_text(at + 3 * 86400, NOW) == "until Fri 13 Mar 15:05"
    utc = datetime(2026, 3, 10, 23, 30, tzinfo=UTC)
    assert until_text(utc.timestamp() + 3600, utc) == "until tomorrow 00:30"


# ---------------------------------------------------------------------- notices


def test_an_error_is_told_once_until_it_changes() -> None:
    notices = Notices()
    missing = ControlError("daemon_not_running", "nobody answers", fix=START_FIX)
    assert notices.state(missing) == (
        [Notice("Agent not running", f"nobody answers\nFix: {START_FIX}", error=True)],
        [],
    )
    assert notices.state(missing) == ([], [])  # the retry failed the same way
    denied = ControlError("permission_denied", "", fix=GROUP_FIX)
    assert notices.state(denied)[0] == [
        Notice("Not allowed to reach the agent", f"Fix: {GROUP_FIX}", error=True)
    ]
    assert notices.state(idle()) == ([], [])
    assert len(notices.state(missing)[0]) == 1  # back, then gone again: told again


def test_a_lost_connection_is_not_told_the_next_try_tells() -> None:
    notices = Notices()
    assert notices.state(ControlError("connection_lost", "the agent closed it")) == ([], [])
    assert notices.state(ControlError("timeout", "")) == ([], [])
    assert len(notices.state(ControlError("daemon_not_running", ""))[0]) == 1


def test_a_gpu_turning_unhealthy_is_told_once() -> None:
    notices = Notices()
    assert notices.state(idle()) == ([], [])
    sick = msgspec.structs.replace(idle().gpus[0], health="unhealthy", health_reason="xid 79")
    told, _ = notices.state(idle(gpus=[sick]))
    assert told == [Notice("GPU 0 is unhealthy", "RTX 4090 takes no more jobs: xid 79", True)]
    assert notices.state(idle(gpus=[sick])) == ([], [])


def test_a_job_that_stops_is_looked_up_and_told_if_it_was_preempted() -> None:
    notices = Notices()
    running = idle(jobs=[job("a", "running"), job("b", "running")])
    assert notices.state(running) == ([], [])
    hot = "GPU 0 at 91 °C, above 85 °C"
    assert notices.state(idle(guard="too_hot", guard_detail=hot)) == ([], ["a", "b"])
    told = notices.ended(
        [
            job("b", "completed"),
            job("a", "preempted"),  # the daemon gave no detail: the guard's is used
            job("old", "preempted"),  # not one that was asked about
        ]
    )
    assert told == [Notice("Job a was preempted", hot)]
    assert notices.ended([job("a", "preempted")]) == []


def test_a_job_seen_preempted_in_the_stream_is_told_once() -> None:
    notices = Notices()
    notices.state(idle(jobs=[job("a", "running")]))
    stopping = idle(jobs=[job("a", "preempted", detail="the owner is back")])
    assert notices.state(stopping)[0] == [Notice("Job a was preempted", "the owner is back")]
    assert notices.state(idle()) == ([], [])  # gone from the list: already told, no look-up


def test_jobs_running_across_a_daemon_restart_are_looked_up() -> None:
    notices = Notices()
    notices.state(idle(jobs=[job("a", "running")]))
    notices.state(ControlError("daemon_not_running", ""))
    assert notices.state(idle())[1] == ["a"]


# ---------------------------------------------------------------------- the settings form


def test_schedule_lines_become_windows() -> None:
    text = "mon-fri 22:00-07:00\n\n  sat, sun 00:00-00:00  \n09:00-17:00\nFRI-MON 20:00-23:00"
    assert parse_schedule(text) == [
        {"start": "22:00", "end": "07:00", "days": ["mon", "tue", "wed", "thu", "fri"]},
        {"start": "00:00", "end": "00:00", "days": ["sat", "sun"]},
        {"start": "09:00", "end": "17:00"},
        {"start": "20:00", "end": "23:00", "days": ["fri", "sat", "sun", "mon"]},
    ]
    assert parse_schedule("  \n") == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("weekends", "schedule line 1: 'weekends' ends in no time span"),
        ("mon\ntue 22:00", "schedule line 1: 'mon' ends in no time span"),
        ("mon 9-17", "schedule line 1: 'mon 9-17' ends in no time span"),
        ("09:00-10:00\nmon-fry 09:00-17:00", "schedule line 2: 'mon-fry' is not a range of days"),
    ],
)
def test_a_schedule_line_that_cannot_be_read_names_its_line(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="^" + message):
        parse_schedule(text)


def test_times_and_day_names_are_left_for_the_daemon_to_judge() -> None:
    windows = parse_schedule("someday 25:00-07:00")
    assert windows == [{"start": "25:00", "end": "07:00", "days": ["someday"]}]
    with pytest.raises(ValueError, match="schedule"):
        changed(OwnerPolicy(), {"schedule": windows})


def test_a_schedule_reads_back_as_it_was_written() -> None:
    policy = changed(
        OwnerPolicy(), {"schedule": parse_schedule("fri,mon 22:00-07:00\n09:00-17:00")}
    )
    assert policy.schedule == [
        Window(days=["fri", "mon"], start="22:00", end="07:00"),
        Window(start="09:00", end="17:00"),
    ]
    assert format_schedule(policy.schedule) == "mon,fri 22:00-07:00\n09:00-17:00"


@pytest.mark.parametrize(
    ("days", "text"),
    [
        (["mon", "tue", "wed", "thu", "fri"], "mon-fri"),
        (["sat", "sun"], "sat,sun"),
        (["sun", "mon", "tue", "thu", "fri", "sat"], "mon,tue,thu-sun"),
        (["wed", "wed"], "wed"),
    ],
)
def test_days_in_a_row_are_written_as_a_range(days: list[str], text: str) -> None:
    window = msgspec.convert({"days": days, "start": "22:00", "end": "07:00"}, Window)
    assert format_schedule([window]) == f"{text} 22:00-07:00"
    reread = parse_schedule(format_schedule([window]))
    assert sorted(set(reread[0]["days"])) == sorted(set(days))


def test_the_form_round_trips_every_setting() -> None:
    policy = OwnerPolicy(
        share_only_when_idle=True,
        idle_delay_s=600,
        pause_above_c=85,
        resume_below_c=75,
        schedule=[Window(days=["sat", "sun"], start="00:00", end="00:00")],
        max_shared_gpus=1,
        power_limit_w=250,
    )
    assert changed(OwnerPolicy(), changes(values_of(policy))) == policy
    assert changed(policy, changes(values_of(OwnerPolicy()))) == OwnerPolicy()


def test_the_form_sends_every_field_so_the_daemon_judges_them_together() -> None:
    values = FormValues(False, 300, 80, None, "", None, None)
    assert changes(values) == {
        "share_only_when_idle": False,
        "idle_delay_s": 300,
        "pause_above_c": 80,
        "resume_below_c": None,
        "schedule": [],
        "max_shared_gpus": None,
        "power_limit_w": None,
    }
    with pytest.raises(ValueError, match="go together"):
        changed(OwnerPolicy(), changes(values))


def test_a_pulling_job_says_how_far_its_pull_is() -> None:
    pulling = job("a", "pulling", pulled_bytes=45, pull_bytes=100)
    shown = present(status(jobs=[pulling, job("b", "running")]), None, NOW)
    assert "Current jobs: a (pulling 45%), b" in shown.tooltip


def test_a_fetching_job_says_how_far_its_inputs_are() -> None:
    fetching = job("a", "fetching", fetched_bytes=30, fetch_bytes=120)
    shown = present(status(jobs=[fetching]), None, NOW)
    assert "Current job: a (fetching 25%)" in shown.tooltip
