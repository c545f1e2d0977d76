"""The tray under Qt's offscreen platform, against the real control server over a daemon in
memory (tests/support/tray_daemon.py): what it shows, what its menu and windows make the daemon
do, and how it copes with the daemon going away and coming back."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager
from datetime import datetime
from pathlib import Path

import msgspec
import pytest
from pytestqt.qtbot import QtBot
from support.control_target import job, short_dir
from support.tray_daemon import LoopThread, ServedTarget

from agent.control.client import GROUP_FIX, START_FIX, ControlClient
from agent.tray.notices import Notice
from agent.tray.present import dashboard_url, tomorrow_morning

# Before pytest-qt makes the QApplication: no display needed, whatever DISPLAY says.
os.environ["QT_QPA_PLATFORM"] = "offscreen"

from PySide6.QtCore import QObject, QUrl, Signal, Slot
from PySide6.QtGui import QDesktopServices
from PySide6.QtWidgets import QSystemTrayIcon
from support.tray_helpers import open_tray

from agent.tray.app import Tray

WAIT_MS = 20_000
NOW = 1_767_225_600.0  # a fixed clock for the timed pauses: 2026-01-01 00:00 UTC


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    with short_dir() as path:
        yield path


@pytest.fixture
def daemon(sock_dir: Path) -> Iterator[ServedTarget]:
    served = ServedTarget(sock_dir / "agent.sock")
    served.start()
    yield served
    served.close()


def _tray(path: Path) -> AbstractContextManager[Tray]:
    return open_tray(path, retry_max_s=0.2, clock=lambda: NOW)


@pytest.fixture
def tray(qtbot: QtBot, daemon: ServedTarget) -> Iterator[Tray]:
    with _tray(daemon.path) as shown:
        yield shown


@pytest.fixture
def notices(tray: Tray) -> list[Notice]:
    told: list[Notice] = []
    tray.noticed.connect(told.append)
    return told


def _connected(qtbot: QtBot, tray: Tray) -> None:
    qtbot.waitUntil(lambda: tray.presentation.kind != "offline", timeout=WAIT_MS)
    qtbot.waitUntil(tray.idle.isEnabled, timeout=WAIT_MS)  # settings read too


def _status(path: Path) -> object:
    async def ask() -> object:
        async with await ControlClient.connect(path) as client:
            return await client.status()

    return asyncio.run(ask())


# ---------------------------------------------------------------------- Qt itself


def test_emitting_a_signal_leaves_pythons_true_alone(qtbot: QtBot) -> None:
    # PySide6 6.12.0 drops a reference to True at every emit, and the interpreter aborts
    # once it reaches zero (pyproject.toml keeps to 6.11 and older): the tray emits often.
    class Emitter(QObject):
        said = Signal(object)

    emitter = Emitter()
    heard: list[object] = []
    emitter.said.connect(heard.append)
    before = sys.getrefcount(True)
    for n in range(1000):
        emitter.said.emit(n)
    assert (len(heard), sys.getrefcount(True)) == (1000, before)


# ---------------------------------------------------------------------- what it shows


def test_the_icon_and_tooltip_follow_the_daemons_state(
    qtbot: QtBot, tray: Tray, daemon: ServedTarget
) -> None:
    _connected(qtbot, tray)
    assert tray.presentation.kind == "busy"
    tooltip = tray.icon.toolTip()
    assert "GPU 0 NVIDIA GeForce RTX 4090: 61 °C, 97 % busy, job job-2" in tooltip
    assert "GPU 1 NVIDIA GeForce RTX 4090: unhealthy (xid 79: fallen off the bus)" in tooltip
    assert "Current job: job-2" in tooltip
    assert "Today: 5 jobs done" in tooltip
    assert tray.headline.text() == "Running 1 job"

    daemon.change(jobs=[], jobs_done_today=6)
    qtbot.waitUntil(lambda: tray.presentation.kind == "sharing", timeout=WAIT_MS)
    assert "Today: 6 jobs done" in tray.icon.toolTip()

    daemon.change(guard="too_hot", guard_detail="GPU GPU-aaaa at 91 °C, above 85 °C")
    qtbot.waitUntil(lambda: tray.presentation.kind == "paused", timeout=WAIT_MS)
    assert tray.headline.text() == "Paused: a GPU is too hot"
    assert "GPU GPU-aaaa at 91 °C, above 85 °C" in tray.icon.toolTip()

    daemon.change(guard="", guard_detail="", connection="connecting", connection_error="refused")
    qtbot.waitUntil(lambda: tray.presentation.kind == "offline", timeout=WAIT_MS)
    assert "Coordinator: refused" in tray.icon.toolTip()
    assert tray.pause.isEnabled()  # the daemon is there: it can still be paused


def test_a_missing_socket_shows_the_fix_instead_of_failing(qtbot: QtBot, sock_dir: Path) -> None:
    with _tray(sock_dir / "agent.sock") as tray:
        qtbot.waitUntil(lambda: tray.presentation.kind == "error", timeout=WAIT_MS)
        assert tray.headline.text() == "Agent not running"
        assert tray.fix.isVisible()
        assert tray.fix.text() == f"Fix: {START_FIX}"
        assert f"Fix: {START_FIX}" in tray.icon.toolTip()
        actions = (tray.pause, tray.resume, tray.pause_hour, tray.idle, tray.open_settings)
        assert not any(action.isEnabled() for action in actions)
        assert tray.quit.isEnabled()


def test_a_daemon_that_refuses_us_shows_the_group_to_join(qtbot: QtBot, sock_dir: Path) -> None:
    # What the control server sends a peer outside its group, then it hangs up.
    refusal = (
        b'{"id": null, "error": {"code": "permission_denied", "message": '
        b"\"uid 1000 is not root, the agent's user or a member of the socket's group\"}}\n"
    )
    path = sock_dir / "agent.sock"
    server = _Refuser(path, refusal)
    try:
        with _tray(path) as tray:
            # The refusal can race the request the tray sends (the kernel resets a
            # connection closed with unread data): then it is "lost", and a retry tells.
            qtbot.waitUntil(lambda: tray.fix.text() == f"Fix: {GROUP_FIX}", timeout=WAIT_MS)
            assert tray.presentation.kind == "error"
            assert tray.headline.text() == "Not allowed to reach the agent"
    finally:
        server.close()


class _Refuser:
    """A socket that answers every connection with one line and closes."""

    def __init__(self, path: Path, line: bytes) -> None:
        self.thread = LoopThread()

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(line)
            await writer.drain()
            writer.close()
            await writer.wait_closed()

        self.server = self.thread.call(asyncio.start_unix_server(answer, path))

    def close(self) -> None:
        self.server.close()
        self.thread.call(self.server.wait_closed())
        self.thread.close()


def test_the_daemon_going_away_and_coming_back(
    qtbot: QtBot, tray: Tray, daemon: ServedTarget, notices: list[Notice]
) -> None:
    _connected(qtbot, tray)
    daemon.stop()
    # First the connection is lost, then the retry finds no socket: that one has a fix.
    qtbot.waitUntil(lambda: tray.fix.text() == f"Fix: {START_FIX}", timeout=WAIT_MS)
    assert tray.presentation.kind == "error"
    assert tray.headline.text() == "Agent not running"

    daemon.target.state = msgspec.structs.replace(daemon.target.state, jobs=[])
    daemon.start()
    qtbot.waitUntil(lambda: tray.presentation.kind == "sharing", timeout=WAIT_MS)
    qtbot.waitUntil(tray.idle.isEnabled, timeout=WAIT_MS)
    assert not tray.fix.isVisible()
    # Told once each: the unhealthy GPU when first seen, the daemon's absence (not the
    # lost connection before it, nor every failed retry), and nothing again on return.
    assert [(n.title, n.error) for n in notices] == [
        ("GPU 1 is unhealthy", True),
        ("Agent not running", True),
    ]


# ---------------------------------------------------------------------- the menu


def test_pause_and_resume_reach_the_daemon(qtbot: QtBot, tray: Tray, daemon: ServedTarget) -> None:
    _connected(qtbot, tray)
    tray.pause.trigger()
    qtbot.waitUntil(lambda: tray.presentation.kind == "paused", timeout=WAIT_MS)
    assert daemon.target.state.paused
    assert daemon.target.state.paused_until is None
    assert (tray.pause.isEnabled(), tray.resume.isEnabled()) == (False, True)
    assert tray.headline.text() == "Paused, 1 job still running"

    tray.resume.trigger()
    qtbot.waitUntil(lambda: tray.presentation.kind == "busy", timeout=WAIT_MS)
    assert not daemon.target.state.paused


def test_pause_for_an_hour_sets_when_the_pause_ends(
    qtbot: QtBot, tray: Tray, daemon: ServedTarget
) -> None:
    _connected(qtbot, tray)
    tray.pause_hour.trigger()
    qtbot.waitUntil(lambda: tray.presentation.kind == "paused", timeout=WAIT_MS)
    assert daemon.target.state.paused_until == NOW + 3600
    end = datetime.fromtimestamp(NOW + 3600)
    assert f"{end:%H:%M}" in tray.headline.text()


def test_pause_until_tomorrow_ends_at_eight_the_next_morning(
    qtbot: QtBot, tray: Tray, daemon: ServedTarget
) -> None:
    _connected(qtbot, tray)
    assert tray.pause_tomorrow.text() == "Pause until tomorrow 08:00"
    tray.pause_tomorrow.trigger()
    qtbot.waitUntil(lambda: tray.presentation.kind == "paused", timeout=WAIT_MS)
    assert daemon.target.state.paused_until == tomorrow_morning(datetime.fromtimestamp(NOW))
    assert tray.headline.text().startswith("Paused until tomorrow 08:00")


def test_the_idle_toggle_changes_the_daemons_settings(
    qtbot: QtBot, tray: Tray, daemon: ServedTarget
) -> None:
    _connected(qtbot, tray)
    assert not tray.idle.isChecked()
    tray.idle.trigger()
    qtbot.waitUntil(lambda: daemon.target.owner.share_only_when_idle, timeout=WAIT_MS)
    # The check mark flips at the click; it is the daemon's answer that counts.
    qtbot.waitUntil(lambda: tray.settings == daemon.target.owner, timeout=WAIT_MS)
    assert tray.idle.isChecked()
    tray.idle.trigger()
    qtbot.waitUntil(lambda: not daemon.target.owner.share_only_when_idle, timeout=WAIT_MS)
    qtbot.waitUntil(lambda: tray.settings == daemon.target.owner, timeout=WAIT_MS)
    assert not tray.idle.isChecked()


def test_a_refused_toggle_falls_back_to_what_the_daemon_holds(
    qtbot: QtBot, tray: Tray, daemon: ServedTarget, notices: list[Notice]
) -> None:
    _connected(qtbot, tray)
    daemon.stop()
    tray.idle.trigger()
    assert tray.idle.isChecked()  # as clicked...
    qtbot.waitUntil(lambda: not tray.idle.isChecked(), timeout=WAIT_MS)  # ...until refused
    assert any(n.title == "Could not change the settings: Agent not running" for n in notices)


def test_open_dashboard_opens_the_coordinators_dashboard(qtbot: QtBot, tray: Tray) -> None:
    _connected(qtbot, tray)

    class Browser(QObject):
        def __init__(self) -> None:
            super().__init__()
            self.opened: list[str] = []

        @Slot(QUrl)
        def open(self, url: QUrl) -> None:
            self.opened.append(url.toString())

    browser = Browser()
    # The stub says bytes; PySide6 takes the method's name only as str.
    QDesktopServices.setUrlHandler("https", browser, "open")  # type: ignore[arg-type]
    try:
        tray.open_dashboard.trigger()
    finally:
        QDesktopServices.unsetUrlHandler("https")
    assert browser.opened == ["https://coordinator.example/"]
    assert dashboard_url("wss://coordinator.example/agent") == browser.opened[0]


def test_a_left_click_on_the_icon_opens_the_menu(qtbot: QtBot, tray: Tray) -> None:
    assert not tray.menu.isVisible()
    tray.icon.activated.emit(QSystemTrayIcon.ActivationReason.Trigger)
    qtbot.waitUntil(tray.menu.isVisible, timeout=WAIT_MS)
    tray.menu.hide()


def test_quit_leaves_the_daemon_running(qtbot: QtBot, tray: Tray, daemon: ServedTarget) -> None:
    _connected(qtbot, tray)
    with qtbot.waitSignal(tray.quit_requested, timeout=WAIT_MS):
        tray.quit.trigger()
    assert not tray.icon.isVisible()
    assert _status(daemon.path) == daemon.target.state


# ---------------------------------------------------------------------- notifications


def test_a_preempted_job_is_notified_once(
    qtbot: QtBot, tray: Tray, daemon: ServedTarget, notices: list[Notice]
) -> None:
    _connected(qtbot, tray)
    detail = "GPU GPU-aaaa at 91 °C, above 85 °C; sharing resumes below 75 °C"
    daemon.target.history = [
        job("job-2", "preempted", code="preempted", detail=detail),
        job("job-1", "preempted"),  # an older one: not news
    ]
    daemon.change(jobs=[], guard="too_hot", guard_detail=detail)

    def about_jobs() -> list[Notice]:
        return [n for n in notices if n.title.startswith("Job")]

    qtbot.waitUntil(lambda: len(about_jobs()) == 1, timeout=WAIT_MS)
    assert about_jobs() == [Notice("Job job-2 was preempted", detail)]

    daemon.change(guard="", guard_detail="", jobs_done_today=6)
    qtbot.waitUntil(lambda: tray.presentation.kind == "sharing", timeout=WAIT_MS)
    assert len(about_jobs()) == 1


def test_a_failed_action_is_notified(
    qtbot: QtBot, tray: Tray, daemon: ServedTarget, notices: list[Notice]
) -> None:
    _connected(qtbot, tray)
    daemon.stop()  # the menu still thinks the daemon is there
    tray.pause.trigger()
    qtbot.waitUntil(
        lambda: any(n.title.startswith("Could not pause") for n in notices), timeout=WAIT_MS
    )
    failed = next(n for n in notices if n.title.startswith("Could not pause"))
    assert failed.title == "Could not pause: Agent not running"
    assert f"Fix: {START_FIX}" in failed.text


# ---------------------------------------------------------------------- the windows


def test_settings_are_saved_through_the_daemon_which_may_refuse_them(
    qtbot: QtBot, tray: Tray, daemon: ServedTarget
) -> None:
    _connected(qtbot, tray)
    tray.open_settings.trigger()
    window = tray.settings_window
    assert window is not None
    qtbot.waitUntil(window.save_button.isEnabled, timeout=WAIT_MS)
    assert window.pause_above.text() == "off"

    window.pause_above.setValue(80)  # without a temperature to resume below
    window.save()
    qtbot.waitUntil(lambda: "refused" in window.message.text(), timeout=WAIT_MS)
    assert window.message.text() == (
        "The agent refused these settings: pause_above_c and resume_below_c go together"
    )
    assert daemon.target.owner.pause_above_c is None

    window.resume_below.setValue(70)
    window.idle.setChecked(True)
    window.idle_delay.setValue(600)
    window.max_gpus.setValue(1)
    window.schedule.setPlainText("mon-fri 22:00-07:00\nsat,sun 00:00-00:00")
    window.save()
    qtbot.waitUntil(lambda: window.message.text() == "Saved.", timeout=WAIT_MS)
    owner = daemon.target.owner
    assert (owner.pause_above_c, owner.resume_below_c) == (80, 70)
    assert (owner.share_only_when_idle, owner.idle_delay_s, owner.max_shared_gpus) == (True, 600, 1)
    assert [(w.days, w.start, w.end) for w in owner.schedule] == [
        (["mon", "tue", "wed", "thu", "fri"], "22:00", "07:00"),
        (["sat", "sun"], "00:00", "00:00"),
    ]
    assert owner.power_limit_w is None
    # The menu's toggle follows what the window saved.
    qtbot.waitUntil(tray.idle.isChecked, timeout=WAIT_MS)


def test_a_schedule_line_without_times_is_refused_before_it_is_sent(
    qtbot: QtBot, tray: Tray, daemon: ServedTarget
) -> None:
    _connected(qtbot, tray)
    tray.open_settings.trigger()
    window = tray.settings_window
    assert window is not None
    qtbot.waitUntil(window.save_button.isEnabled, timeout=WAIT_MS)
    window.schedule.setPlainText("weekends")
    window.save()
    assert window.message.text().startswith("schedule line 1: 'weekends' ends in no time span")
    assert daemon.target.owner.schedule == []


def test_the_log_window_shows_the_selected_jobs_output(
    qtbot: QtBot, tray: Tray, daemon: ServedTarget
) -> None:
    daemon.do(lambda: daemon.target.log("job-1", "stdout", "epoch 1 loss 0.42\n"))
    daemon.do(lambda: daemon.target.log("job-1", "stderr", "warning: slow disk\n"))
    _connected(qtbot, tray)
    tray.open_log.trigger()
    window = tray.log_window
    assert window is not None
    qtbot.waitUntil(lambda: window.jobs.count() == 2, timeout=WAIT_MS)
    assert window.jobs.item(0).text().startswith("job-2 · running")
    assert window.jobs.item(1).text().startswith("job-1 · completed")
    window.jobs.setCurrentRow(1)
    qtbot.waitUntil(
        lambda: window.output.toPlainText() == "epoch 1 loss 0.42\nwarning: slow disk\n",
        timeout=WAIT_MS,
    )
    window.jobs.setCurrentRow(0)
    qtbot.waitUntil(lambda: window.output.toPlainText() == "(no output)", timeout=WAIT_MS)


def test_the_windows_say_when_the_daemon_is_gone(
    qtbot: QtBot, tray: Tray, daemon: ServedTarget
) -> None:
    _connected(qtbot, tray)
    daemon.stop()
    tray.open_settings.trigger()
    window = tray.settings_window
    assert window is not None
    qtbot.waitUntil(lambda: window.message.text().startswith("Agent not running"), timeout=WAIT_MS)
    assert f"Fix: {START_FIX}" in window.message.text()
    assert not window.save_button.isEnabled()
