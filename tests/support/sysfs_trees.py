"""Build sysfs and /dev trees in a temporary directory, laid out as the kernel lays them out.

A GPU is a PCI device directory under ``devices/``; ``class/drm/cardN`` links to its DRM
card directory, which links back through ``device``; ``bus/pci/devices/<slot>`` links to
it too; its ``driver`` link dangles, as it does when the driver's directory is not visible.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from support.paths import SYSFS

__all__ = [
    "FIXTURE_SYSFS",
    "PciGpu",
    "add_hwmon",
    "add_kfd_node",
    "add_pci_gpu",
    "add_render_node",
    "write",
]

FIXTURE_SYSFS = SYSFS
"""The recorded tree: card0 an amdgpu Vega 10, card1 an i915 UHD 620 (see SOURCES.md)."""

Files = Mapping[str, str | int]


@dataclass(frozen=True)
class PciGpu:
    """Where a built GPU's directories are."""

    device: Path
    """The PCI device directory (what ``class/drm/cardN/device`` resolves to)."""
    card: Path
    """The DRM card directory inside it (what ``class/drm/cardN`` resolves to)."""
    link: Path
    """The ``class/drm/cardN`` link itself."""


def write(path: Path, value: str | int) -> Path:
    """Write one attribute the way sysfs shows it: the value and a newline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{value}\n", encoding="utf-8")
    return path


def _write_all(base: Path, files: Files) -> None:
    for relative, value in files.items():
        write(base / relative, value)


def add_pci_gpu(
    sysfs: Path,
    *,
    card: str,
    slot: str,
    pci_id: str,
    driver: str,
    render_minor: int | None = 128,
    device_files: Files | None = None,
    card_files: Files | None = None,
) -> PciGpu:
    """Add one GPU: its PCI device, DRM card and render node directories, and their links."""
    device = sysfs / "devices" / "pci0000:00" / slot
    device.mkdir(parents=True)
    write(device / "uevent", f"DRIVER={driver}\nPCI_ID={pci_id}\nPCI_SLOT_NAME={slot}")
    (device / "driver").symlink_to(f"../../../bus/pci/drivers/{driver}")
    drm_card = device / "drm" / card
    drm_card.mkdir(parents=True)
    (drm_card / "device").symlink_to("../..")
    if render_minor is not None:
        (device / "drm" / f"renderD{render_minor}").mkdir()
    link = sysfs / "class" / "drm" / card
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(f"../../devices/pci0000:00/{slot}/drm/{card}")
    bus_link = sysfs / "bus" / "pci" / "devices" / slot
    bus_link.parent.mkdir(parents=True, exist_ok=True)
    bus_link.symlink_to(f"../../../devices/pci0000:00/{slot}")
    _write_all(device, device_files or {})
    _write_all(drm_card, card_files or {})
    return PciGpu(device=device, card=drm_card, link=link)


def add_hwmon(device: Path, number: int, name: str, files: Files) -> Path:
    """Add ``hwmon/hwmonN`` to a device, with its ``name`` and sensor files."""
    hwmon = device / "hwmon" / f"hwmon{number}"
    write(hwmon / "name", name)
    _write_all(hwmon, files)
    return hwmon


def add_kfd_node(sysfs: Path, node: int, properties: Mapping[str, int]) -> Path:
    """Add a KFD topology node whose ``properties`` file holds ``key value`` lines."""
    text = "\n".join(f"{key} {value}" for key, value in properties.items())
    return write(
        sysfs / "class" / "kfd" / "kfd" / "topology" / "nodes" / str(node) / "properties", text
    )


def add_render_node(dev: Path, minor: int = 128, mode: int = 0o666) -> Path:
    """Stand a regular file in for ``dri/renderDN`` under a /dev root, with the given mode."""
    node = write(dev / "dri" / f"renderD{minor}", "")
    node.chmod(mode)
    return node
