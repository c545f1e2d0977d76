"""A fake ``amdsmi`` module: the MI100's answers, and the library's status codes."""

from __future__ import annotations

import types
from typing import Any

__all__ = ["NOT_SUPPORTED", "NO_PERMISSION", "FakeAmdSmiError", "fake_amdsmi"]

NOT_SUPPORTED = 2  # AMDSMI_STATUS_NOT_SUPPORTED


NO_PERMISSION = 10


class FakeAmdSmiError(Exception):
    """Like amdsmi's AmdSmiLibraryException: a message and the library's status code."""

    def __init__(self, err_code: int) -> None:
        super().__init__(f"status {err_code}")
        self.err_code = err_code


def fake_amdsmi(handles: list[str]) -> types.ModuleType:
    lib = types.ModuleType("amdsmi")
    clk = types.SimpleNamespace(GFX="gfx", MEM="mem")
    temp = types.SimpleNamespace(EDGE="edge", HOTSPOT="hotspot", VRAM="vram")
    answers: dict[str, Any] = {
        "amdsmi_init": lambda: None,
        "amdsmi_shut_down": lambda: None,
        "amdsmi_get_processor_handles": lambda: list(handles),
        "amdsmi_get_lib_version": lambda: {"major": 24, "minor": 7, "release": 1, "build": 0},
        "amdsmi_get_gpu_device_bdf": lambda h: "0000:83:00.0",
        "amdsmi_get_gpu_asic_info": lambda h: {
            "market_name": "Arcturus GL-XL [Instinct MI100]",
            "asic_serial": "0x79CCD55167A2124A",
            "target_graphics_version": "gfx908",
            "num_compute_units": "N/A",
        },
        "amdsmi_get_power_cap_info": lambda h: {
            "power_cap": 290_000_000,  # microwatts
            "default_power_cap": 290_000_000,
            "max_power_cap": 300_000_000,
        },
        "amdsmi_get_gpu_vram_usage": lambda h: {"vram_total": 32752, "vram_used": 6},  # MiB
        "amdsmi_get_gpu_driver_info": lambda h: {
            "driver_name": "amdgpu",
            "driver_version": "6.3.6",
        },
        "amdsmi_get_pcie_info": lambda h: {
            "pcie_static": {"max_pcie_width": 16, "pcie_interface_version": 4}
        },
        "amdsmi_get_clock_info": lambda h, kind: {
            "clk": 300 if kind == "gfx" else 1200,
            "max_clk": 1502 if kind == "gfx" else 1200,
        },
        "amdsmi_get_gpu_activity": lambda h: {
            "gfx_activity": 0,
            "umc_activity": 0,
            "mm_activity": "N/A",
        },
        "amdsmi_get_temp_metric": lambda h, sensor, metric: {
            "edge": 53,
            "hotspot": 55,
            "vram": 53,
        }[sensor],
        # An MI100 predates socket_power and current_socket_power.
        "amdsmi_get_power_info": lambda h: {
            "current_socket_power": "N/A",
            "average_socket_power": 36,
        },
        "amdsmi_get_energy_count": lambda h: {
            "energy_accumulator": 1_000_000,
            "counter_resolution": 15.3,  # microjoules per tick
        },
    }
    for name, answer in answers.items():
        setattr(lib, name, answer)

    def replay_counter(h: str) -> int:
        raise FakeAmdSmiError(NOT_SUPPORTED)

    def ecc_count(h: str) -> dict[str, int]:
        raise FakeAmdSmiError(NO_PERMISSION)

    lib.amdsmi_get_gpu_pci_replay_counter = replay_counter  # type: ignore[attr-defined]
    lib.amdsmi_get_gpu_total_ecc_count = ecc_count  # type: ignore[attr-defined]
    lib.AmdSmiException = FakeAmdSmiError  # type: ignore[attr-defined]
    lib.AmdSmiClkType = clk  # type: ignore[attr-defined]
    lib.AmdSmiTemperatureType = temp  # type: ignore[attr-defined]
    lib.AmdSmiTemperatureMetric = types.SimpleNamespace(CURRENT="current")  # type: ignore[attr-defined]
    return lib
