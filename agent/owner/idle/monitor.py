"""How long the machine's owner has been away: the idle time of the session at its screen.

Sources, asked in this order at each reading; the first that can tell answers:

1. logind over the system bus (:mod:`agent.owner.idle.logind`): the idle hint of the session
   active on seat0, set by the desktop itself;
2. X11 (:mod:`agent.owner.idle.x11`): the X server's time since its last input, where
   ``DISPLAY`` is set and the server lets the agent in;
3. input devices (:mod:`agent.owner.idle.input`): the kernel's input events, or the i8042
   interrupt count.

Every source keeps its connection or open files between readings, so a reading costs well
under a millisecond and can be taken every tick. A source that cannot tell says why; the
reason is logged at debug level when it changes, and :meth:`IdleDetector.reasons` has the
latest of each.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from agent.owner.idle.input import InputIdle
from agent.owner.idle.logind import LogindIdle
from agent.owner.idle.x11 import X11Idle
from hal.types import Reading, Unavailable

__all__ = ["IdleDetector", "IdleSource", "default_sources"]

_log = logging.getLogger(__name__)


class IdleSource(Protocol):
    """One way of telling how long the owner has been idle."""

    name: str

    def read(self) -> Reading[float]:
        """Seconds idle, or why this source cannot tell now."""

    def close(self) -> None:
        """Release the connection or files held between readings."""


def default_sources(
    *,
    system_bus: str | None = None,
    display: str | None = None,
    dev_root: Path = Path("/dev"),
    sysfs_root: Path = Path("/sys"),
    proc_root: Path = Path("/proc"),
    monotonic: Callable[[], float] = time.monotonic,
) -> list[IdleSource]:
    """logind, X11 and input devices, in that order.

    ``system_bus`` defaults to ``DBUS_SYSTEM_BUS_ADDRESS`` (else the standard socket) and
    ``display`` to ``DISPLAY``.
    """
    return [
        LogindIdle(system_bus, monotonic=monotonic),
        X11Idle(display, monotonic=monotonic),
        InputIdle(
            dev_root=dev_root, sysfs_root=sysfs_root, proc_root=proc_root, monotonic=monotonic
        ),
    ]


class IdleDetector:
    """Seconds the owner has been idle, from the first source that can tell."""

    def __init__(self, sources: Sequence[IdleSource] | None = None) -> None:
        self.sources = list(sources) if sources is not None else default_sources()
        self.source: str | None = None
        """The name of the source that answered the last reading; None if none could."""
        self._reasons: dict[str, Unavailable] = {}

    def idle_seconds(self) -> float | None:
        """Seconds idle (0 while the owner is at work); None when no source can tell."""
        for source in self.sources:
            reading = source.read()
            if isinstance(reading, float):
                self._reasons.pop(source.name, None)
                self.source = source.name
                return reading
            reason = reading if isinstance(reading, Unavailable) else Unavailable("unsupported")
            if self._reasons.get(source.name) != reason:
                _log.debug("idle time from %s: %s (%s)", source.name, reason.detail, reason.reason)
            self._reasons[source.name] = reason
        self.source = None
        return None

    def reasons(self) -> dict[str, Unavailable]:
        """Why each source that did not answer the last reading could not."""
        return dict(self._reasons)

    def close(self) -> None:
        """Release every source's connection or files."""
        for source in self.sources:
            source.close()
