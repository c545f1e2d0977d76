"""What the unit and the integration test_power_limit.py share."""

from __future__ import annotations

from pathlib import Path

from support.sysfs_trees import PciGpu, add_hwmon, add_pci_gpu

__all__ = ["cap_file", "mi100", "uhd620"]


def mi100(sysfs: Path, **hwmon_files: str | int) -> PciGpu:
    """An MI100 with amdgpu's power cap files (rocm-smi: 290 W cap, 300 W board power)."""
    gpu = add_pci_gpu(
        sysfs,
        card="card0",
        slot="0000:83:00.0",
        pci_id="1002:738C",
        driver="amdgpu",
        device_files={"unique_id": "79ccd55167a2124a", "board_info": "type : oam"},
    )
    files: dict[str, str | int] = {
        "power1_average": 36_000_000,
        "power1_cap": 290_000_000,
        "power1_cap_min": 0,
        "power1_cap_max": 300_000_000,
    }
    files.update(hwmon_files)
    add_hwmon(gpu.device, 2, "amdgpu", files)
    return gpu


def cap_file(gpu: PciGpu) -> Path:
    return gpu.device / "hwmon" / "hwmon2" / "power1_cap"


def uhd620(sysfs: Path) -> PciGpu:
    return add_pci_gpu(sysfs, card="card1", slot="0000:00:02.0", pci_id="8086:5917", driver="i915")
