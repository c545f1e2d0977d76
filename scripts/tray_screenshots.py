"""Screenshots of the tray for the README: ``python scripts/tray_screenshots.py [--out docs]``.

Starts an X server of its own (Xvfb, ``apt-get install xvfb``), a control server over the
tests' in-memory daemon (``tests/support/tray_daemon.py``) and the real tray on Qt's X11 platform;
opens the menu and the settings window and grabs them from the screen:

- ``tray-menu.png``: the menu, with the icon's tooltip beside it;
- ``tray-settings.png``: the settings window, saved through the daemon;
- ``tray-icons.png``: the five icons, drawn at 48 px.

Xvfb has no system tray to dock the icon in, so the menu is opened where the icon would be.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support.control_target import job, short_dir  # noqa: E402
from support.tray_daemon import ServedTarget  # noqa: E402

from agent.control.wire import GpuView  # noqa: E402
from agent.owner.policy import OwnerPolicy, Window  # noqa: E402

if TYPE_CHECKING:
    from PySide6.QtCore import QRect
    from PySide6.QtGui import QPixmap, QScreen

SCREEN = (1100, 700)
PANEL = 30  # the height of the stand-in desktop panel
ICON_X = 760  # where the icon sits in it


@contextmanager
def xvfb() -> Iterator[str]:
    """An X server on a free display; its name (``:N``)."""
    read, write = os.pipe()
    server = subprocess.Popen(
        [
            "Xvfb",
            "-displayfd",
            str(write),
            "-screen",
            "0",
            f"{SCREEN[0]}x{SCREEN[1]}x24",
            "-nolisten",
            "tcp",
        ],
        pass_fds=[write],
        stderr=subprocess.DEVNULL,
    )
    os.close(write)
    try:
        with os.fdopen(read) as lines:
            number = lines.readline().strip()
        if not number:
            raise SystemExit("tray_screenshots: Xvfb did not start")
        yield f":{number}"
    finally:
        server.terminate()
        server.wait()


def until(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    """Run Qt's loop until ``condition`` holds."""
    from PySide6.QtWidgets import QApplication

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"tray_screenshots: timed out waiting for {what}")
        QApplication.processEvents()
        time.sleep(0.02)


def settle(seconds: float = 0.3) -> None:
    """Let the X server draw what was shown (there is no signal for "drawn")."""
    from PySide6.QtWidgets import QApplication

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        QApplication.processEvents()
        time.sleep(0.02)


def shoot(out: Path) -> list[Path]:
    """Take the screenshots into ``out``; the files written."""
    from PySide6.QtCore import QPoint, QRect, Qt
    from PySide6.QtGui import QColor, QFont, QGuiApplication, QPainter, QPixmap
    from PySide6.QtWidgets import QApplication, QLabel, QWidget

    from agent.tray import icons
    from agent.tray.app import Tray
    from agent.tray.bridge import Bridge
    from agent.tray.present import KINDS

    app = QApplication([sys.argv[0]])
    app.setFont(QFont("DejaVu Sans", 10))
    written = []
    with short_dir() as sock_dir:
        daemon = ServedTarget(sock_dir / "agent.sock")
        daemon.target.owner = OwnerPolicy(
            share_only_when_idle=True,
            idle_delay_s=600,
            pause_above_c=85,
            resume_below_c=75,
            schedule=[
                Window(days=["mon", "tue", "wed", "thu", "fri"], start="22:00", end="07:00"),
                Window(days=["sat", "sun"], start="00:00", end="00:00"),
            ],
        )
        gpu = GpuView(
            index=0,
            uuid="GPU-aaaa",
            name="NVIDIA GeForce RTX 4090",
            vendor="nvidia",
            health="healthy",
            assigned_job="job-7f3a",
            temperature_c=64.0,
            utilization_pct=98.0,
        )
        daemon.target.state = msgspec.structs.replace(
            daemon.target.state, gpus=[gpu], jobs=[job("job-7f3a", "running")], jobs_done_today=4
        )
        daemon.start()
        tray = Tray(Bridge(daemon.path))
        tray.start()
        # A desktop to stand in for the real one: a background, a panel, the icon in it.
        desktop = QWidget()
        desktop.setStyleSheet("background: #d5dae1;")
        desktop.setGeometry(0, 0, *SCREEN)
        try:
            until(tray.idle.isEnabled, "the tray to reach the daemon")
            screen = QGuiApplication.primaryScreen()
            desktop.show()
            panel = QWidget(desktop)
            panel.setStyleSheet("background: #2b2f36;")
            panel.setGeometry(0, 0, SCREEN[0], PANEL)
            docked = QLabel(panel)
            docked.setPixmap(icons.pixmap(tray.presentation.kind, 22))
            docked.setGeometry(ICON_X, (PANEL - 22) // 2, 22, 22)
            panel.show()

            tray.menu.popup(QPoint(ICON_X, PANEL + 2))
            until(tray.menu.isVisible, "the menu")
            menu = tray.menu.geometry()
            tooltip = QLabel(tray.icon.toolTip())
            tooltip.setWindowFlags(Qt.WindowType.ToolTip)
            tooltip.setStyleSheet(
                "QLabel { background: #ffffdc; color: black; border: 1px solid #767676;"
                " padding: 4px; }"
            )
            tooltip.move(ICON_X - tooltip.sizeHint().width() - 16, PANEL + 2)
            tooltip.show()
            settle()
            area = tooltip.geometry().united(menu).adjusted(-16, 0, 16, 16)
            area.setTop(0)
            written.append(_save(_grab(screen, area), out / "tray-menu.png"))
            tray.menu.hide()
            tooltip.hide()

            tray.open_settings.trigger()
            window = tray.settings_window
            assert window is not None
            window.move(40, PANEL + 40)
            until(window.save_button.isEnabled, "the settings")
            window.save()
            until(lambda: window.message.text() == "Saved.", "the settings to be saved")
            settle()
            frame = window.frameGeometry().adjusted(-12, -12, 12, 12)
            written.append(_save(_grab(screen, frame), out / "tray-settings.png"))
            window.close()
        finally:
            tray.stop()
            daemon.close()
            desktop.close()

    size, gap = 48, 28
    strip = QPixmap(len(KINDS) * (size + 2 * gap), size + 40)
    strip.fill(QColor("white"))
    painter = QPainter(strip)
    painter.setFont(QFont("DejaVu Sans", 10))
    for n, kind in enumerate(KINDS):
        left = n * (size + 2 * gap) + gap
        painter.drawPixmap(left, 6, icons.pixmap(kind, size))
        label = QRect(left - gap, size + 12, size + 2 * gap, 20)
        painter.drawText(label, Qt.AlignmentFlag.AlignHCenter, kind)
    painter.end()
    written.append(_save(strip, out / "tray-icons.png"))
    app.quit()
    return written


def _grab(screen: QScreen, area: QRect) -> QPixmap:
    return screen.grabWindow(0, area.x(), area.y(), area.width(), area.height())


def _save(picture: QPixmap, path: Path) -> Path:
    if not picture.save(str(path), "PNG"):
        raise SystemExit(f"tray_screenshots: cannot write {path}")
    return path


def main() -> int:
    """Start Xvfb, take the screenshots, say where they went."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    with xvfb() as display:
        os.environ["DISPLAY"] = display
        os.environ["QT_QPA_PLATFORM"] = "xcb"
        for path in shoot(args.out):
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
