"""``gpu-agent-tray``: the tray icon for the running agent (the ``[tray]`` extra)."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Final

from agent.control.args import socket_arg

__all__ = ["main"]

EXIT_NO_QT: Final = 3
#: No display to show the icon on (Qt would abort the process instead, status 134).
EXIT_NO_DISPLAY: Final = 2
_NO_QT: Final = (
    "gpu-agent-tray: PySide6 is not installed; install the tray's extra: "
    "pip install 'gpu-provider-agent[tray]'"
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the tray until "Quit", SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(
        prog="gpu-agent-tray",
        description="The gpu-agent tray icon: the agent's state, pause and resume, settings. "
        "Quitting it leaves the agent running.",
    )
    parser.add_argument(
        "--socket",
        type=socket_arg,
        metavar="PATH",
        help="the agent's control socket (default: /run/gpu-agent/agent.sock if it exists, "
        "else the one in your runtime directory; looked for again at each retry)",
    )
    args = parser.parse_args(argv)
    problem = display_problem(os.environ, sys.platform)
    if problem:
        print(f"gpu-agent-tray: error [no_display]: {problem}", file=sys.stderr)
        return EXIT_NO_DISPLAY
    try:
        from PySide6.QtCore import QLockFile
        from PySide6.QtWidgets import QApplication, QSystemTrayIcon
    except ImportError:
        print(_NO_QT, file=sys.stderr)
        return EXIT_NO_QT
    from agent.tray.app import Tray
    from agent.tray.bridge import Bridge

    app = QApplication([sys.argv[0]])
    app.setApplicationName("gpu-agent-tray")
    app.setDesktopFileName("gpu-agent-tray")
    # The windows come and go; the icon is what keeps the application.
    app.setQuitOnLastWindowClosed(False)
    # One tray a session: the autostart entry and the user unit may both start one.
    lock = QLockFile(_lock_path())
    if not lock.tryLock(0):
        print("gpu-agent-tray: already running in this session", file=sys.stderr)
        return 0
    if not QSystemTrayIcon.isSystemTrayAvailable():
        print(
            "gpu-agent-tray: no system tray here yet; the icon shows once there is one",
            file=sys.stderr,
        )
    tray = Tray(Bridge(args.socket))
    tray.quit_requested.connect(app.quit)
    with _quit_on_signals(app.quit):
        tray.start()
        code = app.exec()
    tray.stop()
    lock.unlock()
    return code


def display_problem(env: Mapping[str, str], platform: str) -> str:
    """Why Qt would find no display here ("" if it would): on Linux and the BSDs it needs
    an X server (``DISPLAY``) or a Wayland compositor (``WAYLAND_DISPLAY``), unless
    ``QT_QPA_PLATFORM`` names a platform that needs neither (``offscreen``, ``vnc``,
    ``eglfs``: the user's explicit choice is taken as it is)."""
    if platform in ("darwin", "win32"):
        return ""
    displays = {"xcb": "DISPLAY", "wayland": "WAYLAND_DISPLAY"}
    wanted = env.get("QT_QPA_PLATFORM", "")
    # "wayland;xcb" is a list to try in order; "xcb:option=value" carries options.
    platforms = [p.split(":")[0].strip() for p in wanted.split(";") if p.strip()]
    for name in platforms or ["wayland", "xcb"]:
        kind = next((k for k in displays if name.startswith(k)), None)
        if kind is None or env.get(displays[kind]):
            return ""
    tried = ", ".join(platforms) if platforms else "wayland, xcb"
    return (
        f"no display to show the icon on: DISPLAY and WAYLAND_DISPLAY are unset (Qt "
        f"platform: {tried}); start it in a desktop session, or set QT_QPA_PLATFORM"
    )


def _lock_path() -> str:
    from PySide6.QtCore import QStandardPaths

    where = QStandardPaths.writableLocation(QStandardPaths.StandardLocation.RuntimeLocation)
    return str(Path(where or tempfile.gettempdir()) / "gpu-agent-tray.lock")


@contextlib.contextmanager
def _quit_on_signals(quit_app: Callable[[], object]) -> Iterator[None]:
    """SIGTERM (systemd stopping the unit) and SIGINT end Qt's loop.

    Python runs its signal handlers only between bytecodes, and Qt's loop is C++: the
    signal's byte on a wakeup socket is what gives Python a turn, with no polling timer.
    """
    from PySide6.QtCore import QSocketNotifier

    reader, writer = socket.socketpair()
    reader.setblocking(False)
    writer.setblocking(False)
    notifier = QSocketNotifier(reader.fileno(), QSocketNotifier.Type.Read)
    notifier.activated.connect(lambda: reader.recv(64))
    previous_fd = signal.set_wakeup_fd(writer.fileno())
    handlers = {
        sig: signal.signal(sig, lambda *_: quit_app()) for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(previous_fd)
        notifier.setEnabled(False)
        reader.close()
        writer.close()


if __name__ == "__main__":
    sys.exit(main())
