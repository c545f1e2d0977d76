"""The tray's two windows: the owner's settings, and recent jobs with their output.

Both ask the daemon through the :class:`~agent.tray.bridge.Bridge` and show its answer or
its error; neither judges a setting itself: the daemon validates the settings as a whole
and its ``bad_settings`` message is shown as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, Final

from PySide6.QtCore import Qt
from PySide6.QtGui import QFontDatabase
from PySide6.QtWidgets import (
    QCheckBox,
    QDialogButtonBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from agent.control.client import ControlClient
from agent.control.wire import JobView, LogChunkView
from agent.errors import ControlError
from agent.owner.policy import OwnerPolicy
from agent.tray import icons
from agent.tray.bridge import Bridge
from agent.tray.form import FormValues, changes, values_of
from agent.tray.present import error_headline

__all__ = ["JOURNAL_HINT", "LogWindow", "SettingsWindow"]

JOURNAL_HINT: Final = "The agent's own log: journalctl -u gpu-agent"
#: Jobs the log window lists, newest first.
LOG_JOBS: Final = 50
#: The end of a job's output that the log window keeps (characters).
LOG_TAIL_CHARS: Final = 1 << 20
_JOB_ID_ROLE: Final = Qt.ItemDataRole.UserRole
_OK_STYLE: Final = "color: #2e7d32;"
_ERROR_STYLE: Final = "color: #c62828;"


def _error_text(error: ControlError) -> str:
    if error.code == "bad_settings":
        return f"The agent refused these settings: {error.detail}"
    text = error_headline(error.code) + (f": {error.detail}" if error.detail else "")
    return f"{text}\nFix: {error.fix}" if error.fix else text


class SettingsWindow(QWidget):
    """The owner's controls, read from and written to the daemon."""

    def __init__(self, bridge: Bridge, on_saved: Callable[[OwnerPolicy], Any]) -> None:
        super().__init__()
        self.bridge = bridge
        self.on_saved = on_saved
        self.setWindowTitle("gpu-agent settings")
        self.setWindowIcon(icons.icon("sharing"))

        self.idle = QCheckBox("Share only when I am away from this computer")
        self.idle_delay = _spin(0, 86_400, suffix=" s")
        self.pause_above = _spin(0, 149, suffix=" °C", off="off")
        self.resume_below = _spin(0, 149, suffix=" °C", off="off")
        self.schedule = QPlainTextEdit()
        self.schedule.setPlaceholderText("any time")
        self.schedule.setFixedHeight(72)
        self.max_gpus = _spin(-1, 64, off="all")
        self.power_limit = _spin(0, 2000, suffix=" W", off="as it is")
        self.message = QLabel()
        self.message.setWordWrap(True)
        self.buttons = QDialogButtonBox(
            QDialogButtonBox.StandardButton.Save | QDialogButtonBox.StandardButton.Close
        )
        self.save_button = self.buttons.button(QDialogButtonBox.StandardButton.Save)
        self.buttons.accepted.connect(self.save)
        self.buttons.rejected.connect(self.close)

        form = QFormLayout()
        form.addRow(self.idle)
        form.addRow("Away after", self.idle_delay)
        form.addRow("Pause when a GPU is above", self.pause_above)
        form.addRow("Resume when all are below", self.resume_below)
        form.addRow("Share during", self.schedule)
        form.addRow("", _hint("One window a line: mon-fri 22:00-07:00, or sat,sun 00:00-00:00"))
        form.addRow("GPUs to share at most", self.max_gpus)
        form.addRow("Power limit while sharing", self.power_limit)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.message)
        layout.addWidget(self.buttons)
        self._fields: list[QWidget] = [
            self.idle,
            self.idle_delay,
            self.pause_above,
            self.resume_below,
            self.schedule,
            self.max_gpus,
            self.power_limit,
            self.save_button,
        ]

    def load(self) -> None:
        """Read the settings in force from the daemon."""
        self._enable(False)
        self._say("Reading the agent's settings…", "")
        self.bridge.request(lambda client: client.settings(), self._loaded)

    def values(self) -> FormValues:
        """What the fields hold."""
        return FormValues(
            share_only_when_idle=self.idle.isChecked(),
            idle_delay_s=float(self.idle_delay.value()),
            pause_above_c=_float(_value(self.pause_above)),
            resume_below_c=_float(_value(self.resume_below)),
            schedule=self.schedule.toPlainText(),
            max_shared_gpus=_value(self.max_gpus),
            power_limit_w=_float(_value(self.power_limit)),
        )

    def show_values(self, values: FormValues) -> None:
        """Fill the fields."""
        self.idle.setChecked(values.share_only_when_idle)
        self.idle_delay.setValue(round(values.idle_delay_s))
        _set(self.pause_above, values.pause_above_c)
        _set(self.resume_below, values.resume_below_c)
        self.schedule.setPlainText(values.schedule)
        _set(self.max_gpus, values.max_shared_gpus)
        _set(self.power_limit, values.power_limit_w)

    def save(self) -> None:
        """Send the fields to the daemon, which takes them all or none."""
        try:
            wanted = changes(self.values())
        except ValueError as exc:
            self._say(str(exc), _ERROR_STYLE)
            return
        self._enable(False)
        self._say("Saving…", "")
        self.bridge.request(lambda client: client.set_settings(wanted), self._saved)

    def _loaded(self, result: OwnerPolicy | ControlError) -> None:
        if isinstance(result, ControlError):
            self._say(_error_text(result), _ERROR_STYLE)
            return
        self.show_values(values_of(result))
        self._enable(True)
        self._say("", "")

    def _saved(self, result: OwnerPolicy | ControlError) -> None:
        self._enable(True)
        if isinstance(result, ControlError):
            self._say(_error_text(result), _ERROR_STYLE)
            return
        self.show_values(values_of(result))
        self._say("Saved.", _OK_STYLE)
        self.on_saved(result)

    def _enable(self, enabled: bool) -> None:
        for field in self._fields:
            field.setEnabled(enabled)

    def _say(self, text: str, style: str) -> None:
        self.message.setText(text)
        self.message.setStyleSheet(style)


class LogWindow(QWidget):
    """The most recent jobs; the output of the one selected."""

    def __init__(self, bridge: Bridge) -> None:
        super().__init__()
        self.bridge = bridge
        self.setWindowTitle("gpu-agent jobs")
        self.setWindowIcon(icons.icon("busy"))
        self.jobs = QListWidget()
        self.output = QPlainTextEdit()
        self.output.setReadOnly(True)
        self.output.setFont(QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont))
        self.message = QLabel(JOURNAL_HINT)
        self.message.setWordWrap(True)
        self.refresh_button = QPushButton("Refresh")
        self.refresh_button.clicked.connect(self.refresh)
        self.jobs.currentItemChanged.connect(self._selected)
        panes = QHBoxLayout()
        panes.addWidget(self.jobs, 1)
        panes.addWidget(self.output, 3)
        bottom = QHBoxLayout()
        bottom.addWidget(self.message, 1)
        bottom.addWidget(self.refresh_button)
        layout = QVBoxLayout(self)
        layout.addLayout(panes)
        layout.addLayout(bottom)
        self.resize(860, 420)
        self._showing = ""

    def refresh(self) -> None:
        """List the recent jobs again."""
        self.bridge.request(lambda client: client.jobs(LOG_JOBS), self._listed)

    def _listed(self, result: list[JobView] | ControlError) -> None:
        if isinstance(result, ControlError):
            self.message.setText(_error_text(result))
            return
        self.message.setText(JOURNAL_HINT)
        current = self._showing
        self.jobs.blockSignals(True)
        self.jobs.clear()
        for job in result:
            item = QListWidgetItem(_job_line(job))
            item.setData(_JOB_ID_ROLE, job.job_id)
            item.setToolTip(": ".join(part for part in (job.code, job.detail) if part))
            self.jobs.addItem(item)
            if job.job_id == current:
                self.jobs.setCurrentItem(item)
        self.jobs.blockSignals(False)
        if self.jobs.currentItem() is None and self.jobs.count():
            self.jobs.setCurrentRow(0)
        elif current:
            self._show_log(current)

    def _selected(self, item: QListWidgetItem | None) -> None:
        if item is not None:
            self._show_log(str(item.data(_JOB_ID_ROLE)))

    def _show_log(self, job_id: str) -> None:
        self._showing = job_id
        self.bridge.request(
            lambda client: _read_log(client, job_id),
            lambda result: self._shown(job_id, result),
        )

    def _shown(self, job_id: str, result: str | ControlError) -> None:
        if job_id != self._showing:  # another job was selected meanwhile
            return
        if isinstance(result, ControlError):
            self.output.setPlainText(_error_text(result))
        else:
            self.output.setPlainText(result or "(no output)")


async def _read_log(client: ControlClient, job_id: str) -> str:
    text = ""
    async for item in client.logs(job_id):
        if isinstance(item, LogChunkView):
            text = (text + item.data)[-LOG_TAIL_CHARS:]
    return text


def _job_line(job: JobView) -> str:
    when = datetime.fromtimestamp(job.created_at)
    return f"{job.job_id} · {job.state} · {when:%d %b %H:%M}"


def _spin(low: int, high: int, *, suffix: str = "", off: str = "") -> QSpinBox:
    """A spin box; with ``off``, its lowest value stands for None and shows as ``off``."""
    box = QSpinBox()
    box.setRange(low, high)
    box.setSuffix(suffix)
    if off:
        box.setSpecialValueText(off)
    return box


def _value(box: QSpinBox) -> int | None:
    """The box's value; None when it shows its ``off`` text."""
    return None if box.specialValueText() and box.value() == box.minimum() else box.value()


def _float(value: int | None) -> float | None:
    return None if value is None else float(value)


def _set(box: QSpinBox, value: float | None) -> None:
    box.setValue(box.minimum() if value is None else round(value))


def _hint(text: str) -> QLabel:
    label = QLabel(text)
    label.setStyleSheet("color: palette(mid);")
    return label
