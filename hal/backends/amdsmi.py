"""AMD GPUs through ROCm's ``amdsmi`` Python package, where ROCm is installed.

``import amdsmi`` loads ``libamd_smi.so`` as it imports, so without ROCm it fails with
OSError and the like, not only ImportError; any failure there is ``library_missing``. The
import happens in :meth:`AmdSmiBackend.open`, so a machine without ROCm pays nothing
before the backend is asked for.

Every library call goes through one place (:meth:`AmdSmiBackend._call`), which turns the
library's ``AmdSmiException`` into a reading: "not supported" into unsupported, any other
failure into unavailable (``library_error``). Fields the library fills with ``"N/A"`` are
unsupported too. Units as the library documents them: power in W, power caps in µW, clocks
in MHz, VRAM in MiB, temperatures in °C, energy in ticks of ``counter_resolution`` µJ.

The id is ROCm's UUID made from the ASIC serial, the same id the ``amdgpu`` sysfs backend
gives the same card. What the library does not say (render node, APU or not, NUMA node,
whether the card is still there) is read from the card's sysfs directory.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import msgspec

from hal.backend import Backend, HalConfig
from hal.backends.amdgpu import amdgpu_kind, rocm_uuid
from hal.errors import BackendUnavailable
from hal.sysfs import device_numa_node, render_node
from hal.types import UNSUPPORTED, GpuProfile, GpuSample, Reading, Unavailable, Unsupported

__all__ = ["AmdSmiBackend", "import_amdsmi"]

_log = logging.getLogger(__name__)

_STATUS_NOT_SUPPORTED = 2  # AMDSMI_STATUS_NOT_SUPPORTED in amdsmi.h
_NA = "N/A"
_MIB = 1 << 20
_MHZ = 1_000_000
_GFX_TARGET = re.compile(r"gfx[0-9a-f]{3,4}")


def import_amdsmi() -> Any:
    """The ``amdsmi`` module, or BackendUnavailable(``library_missing``) if it will not load."""
    try:
        import amdsmi
    except Exception as exc:  # it dlopens libamd_smi.so on import: OSError, not ImportError
        raise BackendUnavailable("library_missing", f"amdsmi: {exc!r}") from exc
    return amdsmi


class _Gpu(msgspec.Struct):
    """A GPU as opened: its id, the library's handle, and its sysfs directory if known."""

    id: str
    handle: object
    device_dir: Path | None


class AmdSmiBackend(Backend):
    """Every AMD GPU the ROCm SMI library sees."""

    name: ClassVar[str] = "amdsmi"

    def __init__(self, config: HalConfig, *, load: Callable[[], Any] = import_amdsmi) -> None:
        super().__init__(config)
        self._load = load
        self._lib: Any = None
        self._gpus: list[_Gpu] = []

    def open(self) -> list[GpuProfile]:
        """Load and initialise amdsmi, then profile every GPU it sees."""
        lib = self._load()
        try:
            lib.amdsmi_init()
        except lib.AmdSmiException as exc:
            raise BackendUnavailable("library_error", f"amdsmi_init: {exc}") from exc
        self._lib = lib
        handles = self._call("amdsmi_get_processor_handles")
        if not isinstance(handles, list) or not handles:
            self.close()
            raise BackendUnavailable("no_devices", f"amdsmi found no GPU ({handles})")
        profiles = []
        self._gpus = []
        for index, handle in enumerate(handles):
            profile = self._profile(handle, index)
            bus = profile.pci_bus_id
            device_dir = self._device_dir(bus) if isinstance(bus, str) else None
            self._gpus.append(_Gpu(id=profile.id, handle=handle, device_dir=device_dir))
            profiles.append(profile)
        return profiles

    def sample(self, now: float) -> list[GpuSample]:
        """Read the fast-changing values of every GPU opened."""
        return [self._sample(gpu) for gpu in self._gpus]

    def versions(self) -> dict[str, str]:
        """The version of the amdsmi library."""
        version = self._call("amdsmi_get_lib_version")
        if isinstance(version, dict):
            parts = (version.get(key) for key in ("major", "minor", "release"))
            return {"amdsmi": ".".join(str(part) for part in parts if part is not None)}
        return {"amdsmi": version} if isinstance(version, str) else {}

    def close(self) -> None:
        """Shut the library down."""
        if self._lib is None:
            return
        try:
            self._lib.amdsmi_shut_down()
        except self._lib.AmdSmiException as exc:
            _log.debug("amdsmi_shut_down failed: %s", exc)
        self._lib = None
        self._gpus = []

    def _call(self, function: str, *args: object) -> Reading[object]:
        call = getattr(self._lib, function, None)
        if call is None:
            return UNSUPPORTED  # an older amdsmi without this function
        try:
            value: object = call(*args)
        except self._lib.AmdSmiException as exc:
            if getattr(exc, "err_code", None) == _STATUS_NOT_SUPPORTED:
                return UNSUPPORTED
            return Unavailable("library_error", f"{function}: {exc}")
        return UNSUPPORTED if value == _NA else value

    def _device_dir(self, bus_id: str) -> Path:
        return self.config.sysfs_root / "bus" / "pci" / "devices" / bus_id

    def _profile(self, handle: object, index: int) -> GpuProfile:
        bdf = self._call("amdsmi_get_gpu_device_bdf", handle)
        bus = bdf.lower() if isinstance(bdf, str) else None
        device_dir = self._device_dir(bus) if bus else None
        asic = self._call("amdsmi_get_gpu_asic_info", handle)
        cap = self._call("amdsmi_get_power_cap_info", handle)
        vram = self._call("amdsmi_get_gpu_vram_usage", handle)
        driver = self._call("amdsmi_get_gpu_driver_info", handle)
        pcie = _field(self._call("amdsmi_get_pcie_info", handle), "pcie_static")
        gfx_clock = self._call("amdsmi_get_clock_info", handle, self._lib.AmdSmiClkType.GFX)
        mem_clock = self._call("amdsmi_get_clock_info", handle, self._lib.AmdSmiClkType.MEM)
        serial = _field(asic, "asic_serial")
        uuid = rocm_uuid(serial) if isinstance(serial, str) else _not_a_value(serial)
        market = _field(asic, "market_name")
        target = _field(asic, "target_graphics_version")
        gfx = target if isinstance(target, str) and _GFX_TARGET.fullmatch(target) else UNSUPPORTED
        node = render_node(device_dir, self.config.dev_root) if device_dir else UNSUPPORTED
        return GpuProfile(
            id=uuid if isinstance(uuid, str) else f"pci:{bus}" if bus else f"amdsmi:{index}",
            vendor="amd",
            backend=self.name,
            name=market if isinstance(market, str) and market else "AMD GPU",
            kind=amdgpu_kind(device_dir) if device_dir else UNSUPPORTED,
            uuid=uuid,
            pci_bus_id=bus or _not_a_value(bdf),
            render_node=node,
            vram_total_bytes=_int(_field(vram, "vram_total"), _MIB),
            driver_version=_text(_field(driver, "driver_version")),
            gfx_target=gfx,
            power_limit_w=_number(_field(cap, "power_cap"), 1e-6),
            power_limit_max_w=_number(_field(cap, "max_power_cap"), 1e-6),
            clock_graphics_max_hz=_int(_field(gfx_clock, "max_clk"), _MHZ),
            clock_memory_max_hz=_int(_field(mem_clock, "max_clk"), _MHZ),
            pcie_gen_max=_int(_field(pcie, "pcie_interface_version")),
            pcie_width_max=_int(_field(pcie, "max_pcie_width")),
            numa_node=device_numa_node(device_dir) if device_dir else UNSUPPORTED,
        )

    def _sample(self, gpu: _Gpu) -> GpuSample:
        if gpu.device_dir is not None and not gpu.device_dir.is_dir():
            return GpuSample(id=gpu.id, state="lost")
        handle, lib = gpu.handle, self._lib
        activity = self._call("amdsmi_get_gpu_activity", handle)
        vram = self._call("amdsmi_get_gpu_vram_usage", handle)
        ecc = self._call("amdsmi_get_gpu_total_ecc_count", handle)
        gfx_clock = self._call("amdsmi_get_clock_info", handle, lib.AmdSmiClkType.GFX)
        mem_clock = self._call("amdsmi_get_clock_info", handle, lib.AmdSmiClkType.MEM)
        return GpuSample(
            id=gpu.id,
            util_gpu_pct=_number(_field(activity, "gfx_activity")),
            util_memory_pct=_number(_field(activity, "umc_activity")),
            memory_used_bytes=_int(_field(vram, "vram_used"), _MIB),
            temperature_c=self._temperature(handle, "EDGE"),
            temperature_hotspot_c=self._temperature(handle, "HOTSPOT"),
            temperature_memory_c=self._temperature(handle, "VRAM"),
            power_w=_socket_power(self._call("amdsmi_get_power_info", handle)),
            energy_j=_energy_j(self._call("amdsmi_get_energy_count", handle)),
            clock_graphics_hz=_int(_field(gfx_clock, "clk"), _MHZ),
            clock_memory_hz=_int(_field(mem_clock, "clk"), _MHZ),
            ecc_corrected=_int(_field(ecc, "correctable_count")),
            ecc_uncorrected=_int(_field(ecc, "uncorrectable_count")),
            pcie_replay_count=_int(self._call("amdsmi_get_gpu_pci_replay_counter", handle)),
        )

    def _temperature(self, handle: object, sensor: str) -> Reading[float]:
        kind = getattr(self._lib.AmdSmiTemperatureType, sensor, None)
        if kind is None:
            return UNSUPPORTED
        current = self._lib.AmdSmiTemperatureMetric.CURRENT
        return _number(self._call("amdsmi_get_temp_metric", handle, kind, current))


def _not_a_value(reading: Reading[object]) -> Unsupported | Unavailable:
    if isinstance(reading, Unsupported | Unavailable):
        return reading
    return Unavailable("bad_value", repr(reading)[:40])


def _field(record: Reading[object], key: str) -> Reading[object]:
    """One field of a dict the library returned; a missing or "N/A" field is unsupported."""
    if not isinstance(record, dict):
        return _not_a_value(record)
    value: object = record.get(key, _NA)
    return UNSUPPORTED if value == _NA else value


def _number(value: Reading[object], scale: float = 1.0) -> Reading[float]:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return _not_a_value(value)
    return value * scale


def _int(value: Reading[object], scale: int = 1) -> Reading[int]:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return _not_a_value(value)
    return round(value * scale)


def _text(value: Reading[object]) -> Reading[str]:
    return value if isinstance(value, str) and value else _not_a_value(value)


def _socket_power(info: Reading[object]) -> Reading[float]:
    # ROCm 7 reports socket_power; before it, MI300 current_socket_power, others the average.
    if not isinstance(info, dict):
        return _not_a_value(info)
    for key in ("socket_power", "current_socket_power", "average_socket_power"):
        reading = _number(_field(info, key))
        if isinstance(reading, float | int):
            return reading
    return UNSUPPORTED


def _energy_j(count: Reading[object]) -> Reading[float]:
    ticks = _number(_field(count, "energy_accumulator"))
    resolution_uj = _number(_field(count, "counter_resolution"))
    if not isinstance(ticks, float | int):
        return ticks
    if not isinstance(resolution_uj, float | int):
        return resolution_uj
    return ticks * resolution_uj * 1e-6
