"""Reading sysfs files under a configurable root, turning errors into readings."""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Collection
from pathlib import Path

from hal.errors import BackendUnavailable
from hal.types import UNSUPPORTED, Reading, Unavailable

__all__ = [
    "HwmonLocator",
    "cards_bound_to",
    "device_numa_node",
    "driver_name",
    "drm_cards",
    "find_hwmon",
    "hwmon_temperatures",
    "may_read_write",
    "mode_grants_read_write",
    "no_cards",
    "pci_slot",
    "pcie_gen_max",
    "read_int",
    "read_scaled",
    "read_str",
    "read_uevent",
    "render_node",
]

_CARD = re.compile(r"card(\d+)")
_SENSOR = re.compile(r"temp(\d+)_input")
_PCI_ADDRESS = re.compile(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]")
# PCIe generation by per-lane transfer rate (GT/s), as ``max_link_speed`` spells it.
_PCIE_GEN_BY_GTS = {2.5: 1, 5.0: 2, 8.0: 3, 16.0: 4, 32.0: 5, 64.0: 6}


def read_str(path: Path) -> Reading[str]:
    """The stripped text of a sysfs attribute; a missing file means unsupported."""
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except FileNotFoundError:
        return UNSUPPORTED
    except PermissionError:
        return Unavailable("permission_denied", str(path))
    except OSError as exc:
        # amdgpu answers EINVAL/ENODEV/EOPNOTSUPP for attributes the ASIC lacks.
        if exc.errno in (errno.EINVAL, errno.ENODEV, errno.EOPNOTSUPP, errno.ENOTSUP):
            return UNSUPPORTED
        return Unavailable("read_error", f"{path}: {exc.strerror}")


def read_int(path: Path, *, scale: int = 1, base: int = 10) -> Reading[int]:
    """An integer attribute times ``scale``; text that is not a number is unavailable."""
    text = read_str(path)
    if not isinstance(text, str):
        return text
    try:
        return int(text, base) * scale
    except ValueError:
        return Unavailable("bad_value", f"{path}: {text[:40]!r}")


def find_hwmon(device_dir: Path, name: str) -> Path | None:
    """The hwmon directory of a device whose ``name`` file says ``name``.

    hwmon numbers change from boot to boot, so sensors are found by name, never by number.
    """
    try:
        candidates = sorted((device_dir / "hwmon").iterdir())
    except OSError:
        return None
    for hwmon in candidates:
        if read_str(hwmon / "name") == name:
            return hwmon
    return None


def device_numa_node(device_dir: Path) -> Reading[int]:
    """The NUMA node of a device directory; the kernel's -1 (no affinity) is unsupported."""
    node = read_int(device_dir / "numa_node")
    if isinstance(node, int) and node < 0:
        return UNSUPPORTED
    return node


def read_scaled(path: Path, divisor: float) -> Reading[float]:
    """An integer attribute divided by ``divisor``: microwatts to watts and the like."""
    value = read_int(path)
    return value / divisor if isinstance(value, int) else value


def read_uevent(device_dir: Path) -> dict[str, str]:
    """The ``KEY=value`` lines of a device's ``uevent`` file; empty when unreadable."""
    text = read_str(device_dir / "uevent")
    if not isinstance(text, str):
        return {}
    pairs = (line.partition("=") for line in text.splitlines())
    return {key: value for key, sep, value in pairs if sep}


def drm_cards(sysfs_root: Path) -> list[Path]:
    """The DRM card directories (``class/drm/cardN``, not their connectors), by number."""
    try:
        entries = list((sysfs_root / "class" / "drm").iterdir())
    except OSError:
        return []
    numbered = [(int(m[1]), entry) for entry in entries if (m := _CARD.fullmatch(entry.name))]
    return [entry for _, entry in sorted(numbered)]


def cards_bound_to(sysfs_root: Path, drivers: Collection[str]) -> list[Path]:
    """The DRM card directories whose device one of ``drivers`` is bound to."""
    return [card for card in drm_cards(sysfs_root) if driver_name(card / "device") in drivers]


def no_cards(sysfs_root: Path, drivers: Collection[str]) -> BackendUnavailable:
    """Why no card is bound to ``drivers``: none present, or the driver is not loaded."""
    loaded = any((sysfs_root / "module" / driver).is_dir() for driver in drivers)
    return BackendUnavailable(
        "no_devices" if loaded else "driver_not_loaded",
        f"no card bound to {' or '.join(sorted(drivers))} under {sysfs_root / 'class' / 'drm'}",
    )


def driver_name(device_dir: Path) -> str | None:
    """The kernel driver bound to a device, or None when none is.

    The ``driver`` link is read, not followed: its target may not be visible (a recorded
    tree, a container). Where ``driver`` is not a link at all (recorded trees flatten links
    into files), the kernel's own ``DRIVER=`` line in ``uevent`` answers instead.
    """
    try:
        target = os.readlink(device_dir / "driver")
    except OSError:
        return read_uevent(device_dir).get("DRIVER")
    return Path(target).name


def pci_slot(device_dir: Path) -> str | None:
    """A device's PCI address (``0000:09:00.0``), lowercase, or None when it has none."""
    for name in (read_uevent(device_dir).get("PCI_SLOT_NAME", ""), device_dir.resolve().name):
        if _PCI_ADDRESS.fullmatch(name.lower()):
            return name.lower()
    return None


def pcie_gen_max(device_dir: Path) -> Reading[int]:
    """The PCIe generation of a device's fastest link speed (``8.0 GT/s PCIe`` is gen 3)."""
    text = read_str(device_dir / "max_link_speed")
    if not isinstance(text, str):
        return text
    try:
        rate = float(text.split()[0])
    except (IndexError, ValueError):
        # The kernel writes "Unknown" when the link speed field holds no known rate.
        return UNSUPPORTED
    return _PCIE_GEN_BY_GTS.get(rate, UNSUPPORTED)


def mode_grants_read_write(st: os.stat_result, uid: int, gids: set[int]) -> bool:
    """Whether a file's mode bits alone let ``uid`` (in ``gids``) read and write it.

    POSIX picks exactly one class: owner if ``uid`` owns the file, else group, else other.
    """
    if st.st_uid == uid:
        bits = (st.st_mode >> 6) & 0o7
    elif st.st_gid in gids:
        bits = (st.st_mode >> 3) & 0o7
    else:
        bits = st.st_mode & 0o7
    return bits & 0o6 == 0o6


def may_read_write(path: Path) -> bool:
    """Whether this process may open ``path`` for reading and writing without privilege.

    For an ordinary user the kernel answers (``os.access``, which also honours ACLs such as
    the ``uaccess`` grant a desktop seat puts on render nodes). Root passes every such check
    through CAP_DAC_OVERRIDE, so for root the mode bits decide: a node that only a
    capability opens is one the agent's unprivileged workloads cannot open either.
    """
    if os.geteuid() != 0:
        return os.access(path, os.R_OK | os.W_OK)
    return mode_grants_read_write(path.stat(), 0, {os.getegid(), *os.getgroups()})


def render_node(device_dir: Path, dev_root: Path) -> Reading[str]:
    """The path of a DRM device's render node under ``dev_root``, if this user may use it.

    Unsupported when the device has no render node; unavailable (``not_found``,
    ``permission_denied``) when it has one that this process cannot open.
    """
    try:
        names = sorted(p.name for p in (device_dir / "drm").iterdir())
    except OSError:
        return UNSUPPORTED
    nodes = [name for name in names if name.startswith("renderD")]
    if not nodes:
        return UNSUPPORTED
    node = dev_root / "dri" / nodes[0]
    if not node.exists():
        # sysfs knows the node but this /dev lacks it: a container without /dev/dri.
        return Unavailable("not_found", str(node))
    try:
        allowed = may_read_write(node)
    except OSError as exc:
        return Unavailable("read_error", f"{node}: {exc.strerror}")
    return str(node) if allowed else Unavailable("permission_denied", str(node))


def hwmon_temperatures(hwmon: Path) -> dict[str, Reading[float]]:
    """Every ``tempN_input`` of an hwmon directory in degrees Celsius, keyed by its label.

    Sensors come in number order (temp2 before temp10); one without a ``tempN_label`` is
    keyed ``tempN``.
    """
    temps: dict[str, Reading[float]] = {}
    sensors = [(_SENSOR.fullmatch(p.name), p) for p in hwmon.glob("temp*_input")]
    for _, sensor in sorted((int(m[1]), p) for m, p in sensors if m):
        index = sensor.name.removesuffix("_input")
        label = read_str(hwmon / f"{index}_label")
        key = label.lower() if isinstance(label, str) and label else index
        temps[key] = read_scaled(sensor, 1000)  # millidegrees Celsius
    return temps


class HwmonLocator:
    """One device's hwmon directory, found by name, and found again if it goes away."""

    def __init__(self, device_dir: Path, name: str) -> None:
        self.device_dir = device_dir
        self.name = name
        self._path = find_hwmon(device_dir, name)

    def path(self) -> Path | None:
        """The hwmon directory now, or None when the device has none by that name."""
        if self._path is None or read_str(self._path / "name") != self.name:
            # A rebind or driver reload renumbers hwmon directories.
            self._path = find_hwmon(self.device_dir, self.name)
        return self._path
