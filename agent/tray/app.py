"""The tray icon and its menu: applies :func:`~agent.tray.present.present` to each state.

Every action goes to the daemon through the :class:`~agent.tray.bridge.Bridge`; the tray
shows what the state stream (or, for the settings, the daemon's answer) says, never its own
guess. Only the idle toggle's check mark moves at the click, as Qt moves it; it follows the
daemon's answer once that comes, back again if the daemon refused.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Final

from PySide6.QtCore import QObject, QTimer, QUrl, Signal
from PySide6.QtGui import QAction, QCursor, QDesktopServices
from PySide6.QtWidgets import QMenu, QSystemTrayIcon

from agent.control.client import ControlClient
from agent.control.wire import JobView, StatusView
from agent.errors import ControlError
from agent.owner.policy import OwnerPolicy
from agent.tray import icons
from agent.tray.bridge import Bridge
from agent.tray.notices import Notice, Notices
from agent.tray.present import MORNING, Presentation, error_headline, present, tomorrow_morning
from agent.tray.windows import LOG_JOBS, LogWindow, SettingsWindow

__all__ = ["NOTICE_MS", "Tray"]

#: How long a desktop notification stays up (the desktop may shorten it).
NOTICE_MS: Final = 10_000
#: How often a timed pause's "until ..." is re-read against the clock (it says "today"
#: or "tomorrow").
_REDRAW_MS: Final = 60_000


class Tray(QObject):
    """The tray icon, its menu and windows, following the daemon through ``bridge``.

    Args:
        bridge: the daemon.
        clock: Unix seconds now (the local time zone turns it into wall-clock time).
    """

    noticed = Signal(object)
    """Each :class:`~agent.tray.notices.Notice`, as it is shown."""

    quit_requested = Signal()
    """"Quit" was chosen: the tray has stopped; the application should end."""

    def __init__(
        self,
        bridge: Bridge,
        *,
        clock: Callable[[], float] = time.time,
        parent: QObject | None = None,
    ) -> None:
        super().__init__(parent)
        self.bridge = bridge
        self.clock = clock
        self.state: StatusView | ControlError | None = None
        self.settings: OwnerPolicy | None = None
        self.notices = Notices()
        self.settings_window: SettingsWindow | None = None
        self.log_window: LogWindow | None = None

        self.menu = QMenu()
        self.headline = self._item("")
        self.fix = self._item("")
        for item in (self.headline, self.fix):
            item.setEnabled(False)
        self.menu.addSeparator()
        self.pause = self._item("Pause sharing", self._pause)
        self.pause_hour = self._item("Pause for 1 hour", self._pause_hour)
        self.pause_tomorrow = self._item(
            f"Pause until tomorrow {MORNING:%H:%M}", self._pause_tomorrow
        )
        self.resume = self._item("Resume sharing", self._resume)
        self.menu.addSeparator()
        self.idle = self._item("Share only when I am away", self._toggle_idle)
        self.idle.setCheckable(True)
        self.open_settings = self._item("Settings…", self._open_settings)
        self.menu.addSeparator()
        self.open_dashboard = self._item("Open dashboard", self._open_dashboard)
        self.open_log = self._item("Jobs and logs…", self._open_log)
        self.menu.addSeparator()
        self.quit = self._item("Quit (the agent keeps running)", self._quit)
        self.menu.aboutToShow.connect(self._about_to_show)

        self.icon = QSystemTrayIcon(self)
        self.icon.setContextMenu(self.menu)
        self.icon.activated.connect(self._activated)
        self.redraw = QTimer(self)
        self.redraw.setInterval(_REDRAW_MS)
        self.redraw.timeout.connect(self._show)
        self.presentation = self._show()
        bridge.state.connect(self._on_state)

    def start(self) -> None:
        """Show the icon and follow the daemon."""
        self.icon.show()
        self.redraw.start()
        self.bridge.start()

    def stop(self) -> None:
        """Stop following the daemon, hide the icon, close the windows: for good."""
        self.bridge.stop()
        self.redraw.stop()
        self.icon.hide()
        # Deleted here, in Qt's thread, rather than whenever the garbage collector gets to
        # them, which may be in another thread (see agent.tray.bridge).
        for widget in (self.settings_window, self.log_window, self.menu):
            if widget is not None:
                widget.close()
                widget.deleteLater()
        self.settings_window = self.log_window = None

    # ------------------------------------------------------------------ the state

    def _on_state(self, state: StatusView | ControlError) -> None:
        reached = isinstance(state, StatusView) and not isinstance(self.state, StatusView)
        self.state = state
        if reached:
            self._read_settings()
        notices, gone = self.notices.state(state)
        for notice in notices:
            self.notify(notice)
        if gone:
            self.bridge.request(lambda client: client.jobs(LOG_JOBS), self._looked_up)
        self._show()

    def _looked_up(self, result: list[JobView] | ControlError) -> None:
        # An error here shows in the state stream too; only the jobs are of interest.
        if not isinstance(result, ControlError):
            for notice in self.notices.ended(result):
                self.notify(notice)

    def _read_settings(self) -> None:
        self.bridge.request(lambda client: client.settings(), self._settings_read)

    def _settings_read(self, result: OwnerPolicy | ControlError) -> None:
        if not isinstance(result, ControlError):
            self.settings = result
            self._show()

    def _show(self) -> Presentation:
        shown = present(self.state, self.settings, datetime.fromtimestamp(self.clock()))
        self.presentation = shown
        self.icon.setIcon(icons.icon(shown.kind))
        self.icon.setToolTip(shown.tooltip)
        self.headline.setText(shown.headline)
        self.fix.setText(f"Fix: {shown.fix}")
        self.fix.setVisible(bool(shown.fix))
        menu = shown.menu
        self.pause.setEnabled(menu.pause)
        self.resume.setEnabled(menu.resume)
        self.pause_hour.setEnabled(menu.pause_timed)
        self.pause_tomorrow.setEnabled(menu.pause_timed)
        self.idle.setEnabled(menu.idle_toggle)
        self.idle.setChecked(menu.idle_checked)
        self.open_settings.setEnabled(menu.settings)
        self.open_dashboard.setEnabled(bool(menu.dashboard))
        self.open_log.setEnabled(menu.log)
        return shown

    def _about_to_show(self) -> None:
        self._show()
        if isinstance(self.state, StatusView):
            self._read_settings()  # nothing streams the settings: read them when they show

    def _activated(self, reason: QSystemTrayIcon.ActivationReason) -> None:
        # Some trays open the context menu on a right click only: a left click opens it too.
        if reason == QSystemTrayIcon.ActivationReason.Trigger:
            self.menu.popup(QCursor.pos())

    def notify(self, notice: Notice) -> None:
        """A desktop notification."""
        kind = QSystemTrayIcon.MessageIcon
        self.icon.showMessage(
            notice.title,
            notice.text,
            kind.Critical if notice.error else kind.Information,
            NOTICE_MS,
        )
        self.noticed.emit(notice)

    # ------------------------------------------------------------------ the actions

    def _pause(self) -> None:
        self._act("pause", lambda client: client.pause())

    def _pause_hour(self) -> None:
        until = self.clock() + 3600
        self._act("pause", lambda client: client.pause(until=until))

    def _pause_tomorrow(self) -> None:
        until = tomorrow_morning(datetime.fromtimestamp(self.clock()))
        self._act("pause", lambda client: client.pause(until=until))

    def _resume(self) -> None:
        self._act("resume", lambda client: client.resume())

    def _toggle_idle(self, checked: bool) -> None:
        wanted = {"share_only_when_idle": checked}
        self.bridge.request(lambda client: client.set_settings(wanted), self._idle_set)

    def _idle_set(self, result: OwnerPolicy | ControlError) -> None:
        if isinstance(result, ControlError):
            self._failed("change the settings", result)
        else:
            self.settings = result
        self._show()  # either way: the check mark shows what the daemon holds

    def _open_settings(self) -> None:
        if self.settings_window is None:
            self.settings_window = SettingsWindow(self.bridge, self._idle_set)
        self.settings_window.load()
        _raise(self.settings_window)

    def _open_dashboard(self) -> None:
        url = self.presentation.menu.dashboard
        if url and not QDesktopServices.openUrl(QUrl(url)):
            self.notify(Notice("Could not open the dashboard", f"No browser took {url}", True))

    def _open_log(self) -> None:
        if self.log_window is None:
            self.log_window = LogWindow(self.bridge)
        self.log_window.refresh()
        _raise(self.log_window)

    def _quit(self) -> None:
        self.stop()
        self.quit_requested.emit()

    def _act(self, what: str, call: Callable[[ControlClient], Awaitable[StatusView]]) -> None:
        # The stream shows the outcome; only a failure needs telling.
        def then(result: StatusView | ControlError) -> None:
            if isinstance(result, ControlError):
                self._failed(what, result)

        self.bridge.request(call, then)

    def _failed(self, what: str, error: ControlError) -> None:
        text = "\n".join(part for part in (error.detail, error.fix and f"Fix: {error.fix}") if part)
        self.notify(Notice(f"Could not {what}: {error_headline(error.code)}", text, error=True))

    def _item(self, text: str, slot: Callable[..., Any] | None = None) -> QAction:
        action = self.menu.addAction(text)
        if slot is not None:
            action.triggered.connect(slot)
        return action


def _raise(window: Any) -> None:
    window.show()
    window.raise_()
    window.activateWindow()
