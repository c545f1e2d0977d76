"""PCI display devices as the kernel lists them, whatever driver (if any) is bound."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

from hal.sysfs import read_str

__all__ = ["VENDOR_IDS", "PciDisplayDevice", "display_devices"]

VENDOR_IDS = {"0x10de": "nvidia", "0x1002": "amd", "0x8086": "intel"}
_DISPLAY_CLASS_PREFIX = "0x03"  # PCI base class 03: display controllers


class PciDisplayDevice(msgspec.Struct, frozen=True, kw_only=True):
    """A display-class PCI function: which vendor, and which kernel driver serves it."""

    bus_id: str
    vendor: str
    driver: str | None


def display_devices(sysfs_root: Path) -> list[PciDisplayDevice]:
    """Every GPU on the PCI bus, found without any vendor library."""
    devices = []
    try:
        entries = sorted((sysfs_root / "bus" / "pci" / "devices").iterdir())
    except OSError:
        return []
    for entry in entries:
        if not str(read_str(entry / "class")).startswith(_DISPLAY_CLASS_PREFIX):
            continue
        vendor_id = str(read_str(entry / "vendor")).lower()
        driver_link = entry / "driver"
        driver = os.path.basename(os.readlink(driver_link)) if driver_link.is_symlink() else None
        devices.append(
            PciDisplayDevice(
                bus_id=entry.name, vendor=VENDOR_IDS.get(vendor_id, vendor_id), driver=driver
            )
        )
    return devices
