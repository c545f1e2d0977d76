"""A fake logind on a private D-Bus, and input devices as the kernel lays them out."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from jeepney import (  # type: ignore[import-untyped]
    HeaderFields,
    MessageType,
    message_bus,
    new_error,
    new_method_return,
)
from jeepney.io.blocking import open_dbus_connection  # type: ignore[import-untyped]

__all__ = [
    "BUS_CONFIG",
    "KEYBOARD_EV",
    "KEYBOARD_KEYS",
    "LOGIND",
    "PROPERTIES",
    "SEAT0",
    "FakeLogind",
    "add_input_device",
]

LOGIND = "org.freedesktop.login1"


SEAT0 = "/org/freedesktop/login1/seat/seat0"


PROPERTIES = "org.freedesktop.DBus.Properties"


BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>custom</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"""


class FakeLogind:
    """logind's Manager, seat0 and sessions, served on a bus by a thread."""

    def __init__(self, address: str, *, seats: tuple[str, ...] = ("seat0",)) -> None:
        self.seats = seats
        self.active = ("", "/")
        self.sessions: dict[str, dict[str, tuple[str, Any]]] = {}
        self.calls = 0
        self._connection = open_dbus_connection(address)
        self._connection.send_and_get_reply(message_bus.RequestName(LOGIND), timeout=5)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def log_in(
        self, session_id: str, *, idle: bool, since_mono_us: int = 0, since_us: int = 0
    ) -> None:
        """Make ``session_id`` the active session of seat0, with these idle hints."""
        path = f"/org/freedesktop/login1/session/_3{session_id}"
        self.sessions[path] = {
            "IdleHint": ("b", idle),
            "IdleSinceHintMonotonic": ("t", since_mono_us),
            "IdleSinceHint": ("t", since_us),
        }
        self.active = (session_id, path)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._connection.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                message = self._connection.receive(timeout=0.05)
            except TimeoutError:
                continue
            if message.header.message_type == MessageType.method_call:
                self.calls += 1
                self._connection.send(self._answer(message))

    def _answer(self, message: Any) -> Any:
        fields = message.header.fields
        path, member = fields[HeaderFields.path], fields[HeaderFields.member]
        interface = fields.get(HeaderFields.interface)
        if interface == LOGIND + ".Manager" and member == "GetSeat":
            (seat,) = message.body
            if seat not in self.seats:
                return new_error(message, LOGIND + ".NoSuchSeat", "s", (f"No seat '{seat}' known",))
            return new_method_return(message, "o", (f"/org/freedesktop/login1/seat/{seat}",))
        if interface == PROPERTIES and member == "Get":
            _, name = message.body
            if path == SEAT0 and name == "ActiveSession":
                return new_method_return(message, "v", (("(so)", self.active),))
            if path in self.sessions and name in self.sessions[path]:
                return new_method_return(message, "v", (self.sessions[path][name],))
        return new_error(message, "org.freedesktop.DBus.Error.UnknownMethod", "s", ("no",))


KEYBOARD_EV = "120013"  # SYN KEY MSC LED REP


KEYBOARD_KEYS = "1000000000007 ff9f207ac14057ff febeffdfffefffff fffffffffffffffe"


def add_input_device(root: Path, name: str, ev: str, keys: str) -> Path:
    """An event node (a FIFO standing in) and its sysfs capabilities."""
    capabilities = root / "sys" / "class" / "input" / name / "device" / "capabilities"
    capabilities.mkdir(parents=True)
    (capabilities / "ev").write_text(ev + "\n", encoding="ascii")
    (capabilities / "key").write_text(keys + "\n", encoding="ascii")
    node = root / "dev" / "input" / name
    node.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(node)
    return node
