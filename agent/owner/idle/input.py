"""Seconds since the last keyboard, mouse, touchpad or game pad input, from the kernel.

Methods, and why these:

- **evdev, read.** Every ``/dev/input/eventN`` whose capabilities (sysfs
  ``capabilities/ev`` and ``key``) make it a human input device is opened non-blocking and
  drained at each reading; a key, relative or absolute event is input. It sees all input
  the kernel sees (USB, Bluetooth, PS/2, I2C), whatever the session or display server.
  Only the event type is looked at, nothing is kept. It needs read access to the nodes:
  root, or the ``input`` group.
- **/proc/interrupts**, where no event node can be read: the interrupt count of the i8042
  controller (the PS/2 keyboard and touchpad of most laptops), readable by anyone. USB
  input shares its host controller's interrupt with every other USB device, so it cannot
  be told apart there and is not counted.
- Not used: the access and modification times of the event nodes, which input does not
  change (evdev's reads bypass the file system's time keeping; only terminals update
  theirs, which is how logind times text consoles).

Devices that are not human input are left out: switches (lid, headphone jack),
accelerometers, power and brightness buttons (keys without letters, pointer or axes).
Until an input is seen, the idle time counts from when watching began, a lower bound.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable
from pathlib import Path

from hal.types import Reading, Unavailable

__all__ = ["InputIdle", "is_human_input", "parse_bitmap"]

_EV_KEY, _EV_REL, _EV_ABS = 1, 2, 3
_INPUT_TYPES = frozenset((_EV_KEY, _EV_REL, _EV_ABS))
_LETTERS = range(16, 26)  # KEY_Q..KEY_P: a keyboard's top letter row
# struct input_event: struct timeval (two longs), __u16 type, __u16 code, __s32 value.
_EVENT = struct.Struct("@llHHi")
_LONG_BITS = struct.calcsize("@l") * 8
_RESCAN_S = 30.0
_READ_BYTES = _EVENT.size * 64


def parse_bitmap(text: str) -> int:
    """A sysfs capability bitmap (hex longs, most significant first) as one integer."""
    value = 0
    for word in text.split():
        value = value << _LONG_BITS | int(word, 16)
    return value


def is_human_input(ev: int, keys: int) -> bool:
    """Whether a device with these event types and keys is worked by a person."""
    if not ev >> _EV_KEY & 1:
        return False
    if ev >> _EV_REL & 1 or ev >> _EV_ABS & 1:
        return True  # a pointer, touchpad, touchscreen, tablet or game pad
    return all(keys >> key & 1 for key in _LETTERS)


class InputIdle:
    """Seconds since the last input the kernel saw, by evdev or by i8042 interrupts."""

    name = "input"

    def __init__(
        self,
        *,
        dev_root: Path = Path("/dev"),
        sysfs_root: Path = Path("/sys"),
        proc_root: Path = Path("/proc"),
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.dev_root = dev_root
        self.sysfs_root = sysfs_root
        self.proc_root = proc_root
        self._monotonic = monotonic
        self._devices: dict[str, int] = {}
        self._denied: set[str] = set()
        self._directory: int | None = None
        self._scanned_at = float("-inf")
        self._since: float | None = None
        self._interrupts: int | None = None

    def read(self) -> Reading[float]:
        """Seconds since the last input; unavailable when no method can see input."""
        now = self._monotonic()
        if self._since is None:
            self._since = now
        self._rescan(now)
        if self._devices:
            if self._drain():
                self._since = now
            return now - self._since
        count = self._i8042_interrupts()
        if isinstance(count, Unavailable):
            return Unavailable("no_input_source", f"{self._evdev_reason()}; {count.detail}")
        if self._interrupts is not None and count != self._interrupts:
            self._since = now
        self._interrupts = count
        return now - self._since

    def close(self) -> None:
        """Close the event nodes."""
        for fd in self._devices.values():
            os.close(fd)
        self._devices.clear()
        self._directory = None

    def _rescan(self, now: float) -> None:
        """Open the human input devices added since the last look, when the directory changed."""
        directory = self.dev_root / "input"
        try:
            changed = os.stat(directory).st_mtime_ns
            names = {n for n in os.listdir(directory) if n.startswith("event")}
        except OSError:
            changed, names = None, set()
        if changed == self._directory and now - self._scanned_at < _RESCAN_S:
            return
        self._directory, self._scanned_at = changed, now
        for gone in self._devices.keys() - names:
            os.close(self._devices.pop(gone))
        self._denied &= names
        for name in sorted(names - self._devices.keys()):
            if not self._human(name):
                continue
            try:
                self._devices[name] = os.open(
                    directory / name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
                )
                self._denied.discard(name)
            except PermissionError:
                self._denied.add(name)
            except OSError:
                continue  # unplugged meanwhile

    def _human(self, name: str) -> bool:
        capabilities = self.sysfs_root / "class" / "input" / name / "device" / "capabilities"
        try:
            ev = parse_bitmap((capabilities / "ev").read_text(encoding="ascii"))
            keys = parse_bitmap((capabilities / "key").read_text(encoding="ascii"))
        except (OSError, ValueError):
            return False
        return is_human_input(ev, keys)

    def _drain(self) -> bool:
        """Read every queued event; whether any of them was input."""
        seen = False
        for name, fd in list(self._devices.items()):
            while True:
                try:
                    data = os.read(fd, _READ_BYTES)
                except BlockingIOError:
                    break
                except OSError:  # ENODEV: unplugged
                    os.close(self._devices.pop(name))
                    break
                if not data:
                    break
                count = len(data) // _EVENT.size
                types = (_EVENT.unpack_from(data, i * _EVENT.size)[2] for i in range(count))
                seen = seen or any(kind in _INPUT_TYPES for kind in types)
        return seen

    def _evdev_reason(self) -> str:
        where = self.dev_root / "input"
        if self._denied:
            return f"{len(self._denied)} input device(s) under {where} not readable (input group)"
        return f"no human input device under {where}"

    def _i8042_interrupts(self) -> int | Unavailable:
        path = self.proc_root / "interrupts"
        try:
            text = path.read_text(encoding="ascii", errors="replace")
        except OSError as exc:
            return Unavailable("no_input_source", f"{path}: {exc.strerror}")
        total, found = 0, False
        for line in text.splitlines()[1:]:  # the first line names the CPUs
            fields = line.split()
            if "i8042" not in line or not fields or not fields[0].endswith(":"):
                continue
            counts = [int(f) for f in _leading_numbers(fields[1:])]
            if any(name.strip(",") == "i8042" for name in fields[1 + len(counts) :]):
                total += sum(counts)
                found = True
        if not found:
            return Unavailable("no_input_source", f"no i8042 interrupts in {path}")
        return total


def _leading_numbers(fields: list[str]) -> list[str]:
    numbers = []
    for field in fields:
        if not field.isdigit():
            break
        numbers.append(field)
    return numbers
