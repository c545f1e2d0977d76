"""Telling systemd how the service is doing: ``sd_notify(3)`` without libsystemd.

Under ``Type=notify`` systemd hands the service ``$NOTIFY_SOCKET``, a unix datagram socket
(a path, or an abstract name written with a leading ``@``), and reads newline-separated
``KEY=value`` assignments from it: ``READY=1`` once started, ``STATUS=`` for
``systemctl status``, ``WATCHDOG=1`` as a keep-alive, ``STOPPING=1`` when shutting down,
``EXTEND_TIMEOUT_USEC=`` to ask for more time. Outside systemd every call is a no-op, so
the daemon calls them unconditionally.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

__all__ = ["Notifier", "watchdog_interval"]

_log = logging.getLogger(__name__)
_US_PER_S = 1_000_000


class Notifier:
    """Sends state changes to systemd's notification socket, if there is one.

    Sending never raises: a failed notification is logged once, and systemd (the
    watchdog, the start timeout) is what notices a service that stops reporting.
    """

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.address = _address(env.get("NOTIFY_SOCKET", ""))
        self._socket: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        """Whether systemd is listening (the service runs under ``Type=notify``)."""
        return self.address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` lines, e.g. ``notify(ready=1, status="serving")``; True if sent."""
        if self.address is None:
            return False
        lines = []
        for key, value in fields.items():
            text = str(value)
            if "\n" in text:
                raise ValueError(f"{key}: a notification value is one line")
            lines.append(f"{key.upper()}={text}")
        try:
            if self._socket is None:
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                )
            self._socket.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:
            if not self._warned:
                _log.warning("cannot notify systemd at %s: %s", self.address, exc)
                self._warned = True
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """The service is up: systemd ends the start job and starts dependent units."""
        return self.notify(ready=1, **_status(status))

    def status(self, text: str) -> bool:
        """A one-line state for ``systemctl status``."""
        return self.notify(status=_one_line(text))

    def watchdog(self) -> bool:
        """The keep-alive: the event loop is turning."""
        return self.notify(watchdog=1)

    def stopping(self, status: str | None = None) -> bool:
        """The service is shutting down (on SIGTERM, before the grace periods run out)."""
        return self.notify(stopping=1, **_status(status))

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before the current start or stop timeout kills us."""
        return self.notify(extend_timeout_usec=max(0, round(seconds * _US_PER_S)))

    def close(self) -> None:
        """Close the socket; later calls open it again."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def watchdog_interval(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """How often to send ``WATCHDOG=1``, in seconds (half of ``WatchdogSec=``); None if never.

    None outside systemd, without a watchdog, or when ``$WATCHDOG_PID`` names another
    process (the variables were inherited, the watchdog is not ours).
    """
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    owner = env.get("WATCHDOG_PID", "")
    if owner and owner != str(os.getpid() if pid is None else pid):
        return None
    return int(usec) / _US_PER_S / 2


def _address(value: str) -> str | bytes | None:
    if value.startswith("@"):
        # Abstract namespace (unix(7)): a leading NUL, no file on disk.
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # unset, or a kind this module does not speak (vsock:)


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())


def _status(text: str | None) -> dict[str, str]:
    return {} if text is None else {"status": _one_line(text)}
