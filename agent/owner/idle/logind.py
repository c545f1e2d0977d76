"""The idle time of the session in front of seat0, from systemd-logind over the system bus.

logind keeps an idle hint per session, set by the desktop (GNOME, KDE and others set it
when their own idle delay has passed; logind sets it itself for text consoles from the
terminal's last input), and the time it became idle, on the realtime and the monotonic
clock. The session that counts is the one active on seat0, the seat with the screen and
the keyboard: ``Manager.GetSeat("seat0")``, then ``Seat.ActiveSession``, then the session's
``IdleHint`` and ``IdleSinceHintMonotonic`` (``IdleSinceHint`` where that is 0).

The bus is reached through ``jeepney`` (pure Python, blocking, with timeouts), on the
address in ``DBUS_SYSTEM_BUS_ADDRESS`` or the standard socket; one connection is kept and
two or three calls are made per reading (about 0.3 ms).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from jeepney import (  # type: ignore[import-untyped]
    DBusAddress,
    DBusErrorResponse,
    Properties,
    new_method_call,
)
from jeepney.io.blocking import (  # type: ignore[import-untyped]
    DBusConnection,
    open_dbus_connection,
)
from jeepney.wrappers import unwrap_msg  # type: ignore[import-untyped]

from hal.types import Reading, Unavailable

__all__ = ["SYSTEM_BUS", "LogindIdle", "system_bus_address"]

SYSTEM_BUS = "unix:path=/var/run/dbus/system_bus_socket"
"""The system bus when ``DBUS_SYSTEM_BUS_ADDRESS`` does not say otherwise (D-Bus spec)."""

_LOGIND = "org.freedesktop.login1"
_MANAGER = DBusAddress("/org/freedesktop/login1", bus_name=_LOGIND, interface=_LOGIND + ".Manager")
_SEAT = _LOGIND + ".Seat"
_SESSION = _LOGIND + ".Session"
_SEAT_ID = "seat0"
_CALL_TIMEOUT_S = 0.5
_RECONNECT_S = 30.0
_USEC = 1e6
_NO_SERVICE = "org.freedesktop.DBus.Error.ServiceUnknown"


def system_bus_address() -> str:
    """The system bus's address, as D-Bus clients find it."""
    return os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or SYSTEM_BUS


class LogindIdle:
    """Seconds the active session of seat0 has been idle, as logind says."""

    name = "logind"

    def __init__(
        self,
        address: str | None = None,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.address = address or system_bus_address()
        self._monotonic = monotonic
        self._wall = wall
        self._connection: Any = None
        self._seat: str | None = None
        self._retry_at = float("-inf")
        self._down = Unavailable("no_bus", "")
        """Why the bus could not be reached, given again until ``_retry_at``."""

    def read(self) -> Reading[float]:
        """Seconds idle, 0 while the session is in use; unavailable with the reason: no
        bus, no logind, no seat0, no session active on it."""
        try:
            return self._read()
        except _Unknown as exc:
            return exc.reading

    def _read(self) -> float:
        connection = self._connect()
        try:
            if self._seat is None:
                get_seat = new_method_call(_MANAGER, "GetSeat", "s", (_SEAT_ID,))
                self._seat = str(self._call(connection, get_seat)[0])
            seat = DBusAddress(self._seat, bus_name=_LOGIND, interface=_SEAT)
            session_id, session_path = self._property(connection, seat, "ActiveSession")
            if not session_id:
                raise _Unknown("no_active_session", f"no session is active on {_SEAT_ID}")
            session = DBusAddress(str(session_path), bus_name=_LOGIND, interface=_SESSION)
            if not self._property(connection, session, "IdleHint"):
                return 0.0
            since = int(self._property(connection, session, "IdleSinceHintMonotonic"))
            if since:
                return max(0.0, self._monotonic() - since / _USEC)
            since = int(self._property(connection, session, "IdleSinceHint"))
            if since:
                return max(0.0, self._wall() - since / _USEC)
            raise _Unknown("no_idle_time", f"session {session_id} is idle since a time not told")
        except DBusErrorResponse as exc:
            self._seat = None
            raise _Unknown(*_error_reason(exc)) from None
        except (OSError, TimeoutError, ValueError) as exc:
            self.close()
            raise self._bus_down("bus_error", f"the system bus at {self.address}: {exc}") from None

    def close(self) -> None:
        """Drop the connection; the next reading opens a new one."""
        if self._connection is not None:
            self._connection.close()
        self._connection = None
        self._seat = None

    def _connect(self) -> Any:
        if self._connection is not None:
            return self._connection
        if self._monotonic() < self._retry_at:
            raise _Unknown(self._down.reason, self._down.detail)
        try:
            connection: DBusConnection = open_dbus_connection(
                self.address, auth_timeout=_CALL_TIMEOUT_S
            )
        except (OSError, TimeoutError, RuntimeError, ValueError) as exc:
            # RuntimeError: jeepney's word for an address with no transport it can use.
            raise self._bus_down("no_bus", f"no system bus at {self.address}: {exc}") from None
        self._connection = connection
        return connection

    def _bus_down(self, reason: str, detail: str) -> _Unknown:
        """Give the bus a rest before the next try, and say why."""
        self._retry_at = self._monotonic() + _RECONNECT_S
        self._down = Unavailable(reason, detail)
        return _Unknown(reason, detail)

    def _property(self, connection: Any, address: Any, name: str) -> Any:
        (value,) = self._call(connection, Properties(address).get(name))
        return value[1]  # a variant: (signature, value)

    @staticmethod
    def _call(connection: Any, message: Any) -> tuple[Any, ...]:
        reply = connection.send_and_get_reply(message, timeout=_CALL_TIMEOUT_S)
        return tuple(unwrap_msg(reply))  # raises DBusErrorResponse for an error reply


class _Unknown(Exception):
    """Why this reading cannot be had; it never leaves this module."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reading = Unavailable(reason, detail)


def _error_reason(exc: Any) -> tuple[str, str]:
    name = str(exc.name)
    if name in (_NO_SERVICE, "org.freedesktop.DBus.Error.NameHasNoOwner"):
        return "no_logind", "logind is not running on the system bus"
    if name == _LOGIND + ".NoSuchSeat":
        return "no_seat", f"logind knows no {_SEAT_ID}: this machine has no local seat"
    detail = exc.data[0] if exc.data else ""
    return "logind_error", f"logind answered {name}: {detail}"
