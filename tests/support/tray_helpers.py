"""Opening and closing a tray in a test; import it after ``QT_QPA_PLATFORM`` is set."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from PySide6.QtCore import QCoreApplication, QEvent

from agent.tray.app import Tray
from agent.tray.bridge import Bridge


@contextmanager
def open_tray(
    path: Path, *, retry_max_s: float, clock: Callable[[], float] | None = None
) -> Iterator[Tray]:
    """A started tray on the control socket at ``path``, retrying fast; stopped and
    deleted on exit."""
    bridge = Bridge(path, retry_initial_s=0.05, retry_max_s=retry_max_s)
    tray = Tray(bridge) if clock is None else Tray(bridge, clock=clock)
    tray.start()
    try:
        yield tray
    finally:
        tray.stop()
        # Deleted now, in this thread; not by a garbage collection in a daemon's thread.
        tray.deleteLater()
        bridge.deleteLater()
        QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
