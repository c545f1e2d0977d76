"""Reading sysfs files under a configurable root, turning errors into readings."""

from __future__ import annotations

import errno
from pathlib import Path

from hal.types import UNSUPPORTED, Reading, Unavailable

__all__ = ["find_hwmon", "pci_numa_node", "read_int", "read_str"]


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


def pci_numa_node(sysfs_root: Path, pci_bus_id: str) -> Reading[int]:
    """The NUMA node of a PCI device; the kernel's -1 (no affinity) is unsupported."""
    node = read_int(sysfs_root / "bus" / "pci" / "devices" / pci_bus_id.lower() / "numa_node")
    if isinstance(node, int) and node < 0:
        return UNSUPPORTED
    return node
