"""AMD GPUs through the amdgpu kernel driver's sysfs files; no ROCm needed.

Every ``class/drm/cardN`` whose device is bound to ``amdgpu`` is one GPU. Static facts are
read once at :meth:`AmdgpuSysfsBackend.open`; each tick reads the fast-changing files
again. hwmon sensors are found by the name ``amdgpu``, never by number.

Rules this backend chooses, and why:

- ``uuid`` is ``GPU-`` and the 16 hex digits of ``unique_id``: ROCm's own spelling of a
  GPU's UUID (``rocminfo``, ``ROCR_VISIBLE_DEVICES``), so it agrees with the ROCm tools and
  the ``amdsmi`` backend. A board without ``unique_id`` has no uuid; its id is
  ``pci:<bus id>``.
- ``kind`` is ``discrete`` when ``board_info`` or ``mem_info_vram_vendor`` exists: amdgpu
  hides the first on APUs, and the second when there are no VRAM chips to name. With
  neither, it is ``integrated`` when VRAM has the shape of a BIOS carve-out (at most 2 GiB,
  with GTT at least four times larger), and otherwise ``undetermined`` rather than guessed.
- An APU's ``vram_total_bytes`` is its carve-out; the system memory it can map besides is
  ``gtt_total_bytes``, reported separately.
- Energy comes from a counter or not at all: integrating power over sample intervals
  would pass an estimate off as a measurement.
- ``gfx_target`` comes from the KFD topology node at the card's PCI location.
"""

from __future__ import annotations

import errno
import importlib.util
import logging
import math
import os
import re
from pathlib import Path
from typing import ClassVar

import msgspec

from hal.backend import Backend, HalConfig
from hal.drm_clients import DrmClients, scanner_for
from hal.sysfs import (
    HwmonLocator,
    cards_bound_to,
    device_numa_node,
    hwmon_temperatures,
    no_cards,
    pci_slot,
    pcie_gen_max,
    read_int,
    read_scaled,
    read_str,
    read_uevent,
    render_node,
)
from hal.types import (
    UNSUPPORTED,
    GpuKind,
    GpuProfile,
    GpuSample,
    PowerLimitResult,
    PowerLimitStatus,
    Reading,
    Unavailable,
    Unsupported,
    is_value,
)

__all__ = [
    "AmdgpuSysfsBackend",
    "amdgpu_kind",
    "gfx_target_name",
    "marketing_names",
    "rocm_uuid",
    "rocm_version",
]

_log = logging.getLogger(__name__)

_DRIVER = "amdgpu"
_MHZ = 1_000_000
_MICRO = 1_000_000
_CARVE_OUT_MAX = 2 << 30
_UMC_RAS_BIT = 1 << 0  # AMDGPU_RAS_BLOCK__UMC: ECC of the memory controller, i.e. of VRAM
_PWM_FULL = 255  # the hwmon ABI's pwm range is 0-255 where pwm1_max does not say otherwise
# One line of pp_dpm_sclk/pp_dpm_mclk: "2: 1630Mhz *" (the star marks the current level;
# some ASICs add a sleep level "S: 19Mhz").
_DPM_LEVEL = re.compile(r"^\s*\w+:\s*(\d+)\s*mhz\s*(\*?)", re.IGNORECASE | re.MULTILINE)
_RAS_COUNT = re.compile(r"^(ue|ce):\s*(\d+)", re.MULTILINE)


class _Card(msgspec.Struct):
    """A card as opened: its id, its PCI device directory, and where its sensors are."""

    id: str
    device_dir: Path
    hwmon: HwmonLocator
    pci_bus_id: str | None = None


class AmdgpuSysfsBackend(Backend):
    """Every GPU bound to the amdgpu driver, read from sysfs."""

    name: ClassVar[str] = "amdgpu"

    def __init__(self, config: HalConfig) -> None:
        super().__init__(config)
        self._cards: list[_Card] = []

    def open(self) -> list[GpuProfile]:
        """Find every amdgpu card and read its static facts."""
        root = self.config.sysfs_root
        cards = cards_bound_to(root, (_DRIVER,))
        if not cards:
            raise no_cards(root, (_DRIVER,))
        names = marketing_names(self.config.dev_root)
        profiles = []
        self._cards = []
        for card in cards:
            hwmon = HwmonLocator(card / "device", _DRIVER)
            profile = self._profile(card, hwmon.path(), names)
            bus = profile.pci_bus_id if isinstance(profile.pci_bus_id, str) else None
            self._cards.append(
                _Card(id=profile.id, device_dir=card / "device", hwmon=hwmon, pci_bus_id=bus)
            )
            profiles.append(profile)
        return profiles

    def sample(self, now: float) -> list[GpuSample]:
        """Read the fast-changing values of every card opened."""
        clients = scanner_for(self.config.proc_root).clients(now)
        return [_sample(card, clients) for card in self._cards]

    def versions(self) -> dict[str, str]:
        """The amdgpu module version, which only out-of-tree (DKMS) builds publish."""
        version = read_str(self.config.sysfs_root / "module" / _DRIVER / "version")
        return {_DRIVER: version} if isinstance(version, str) and version else {}

    def set_power_limit(self, gpu_id: str, watts: float) -> PowerLimitResult:
        """Write the card's hwmon ``power1_cap`` (root only) and read back what the driver kept."""
        card = next((c for c in self._cards if c.id == gpu_id), None)
        if card is None:
            return _refused(gpu_id, "unknown_gpu", f"amdgpu opened no GPU {gpu_id!r}")
        hwmon = card.hwmon.path()
        if hwmon is None:
            if not card.device_dir.is_dir():
                return _refused(gpu_id, "failed", f"{card.device_dir} is gone")
            return _refused(gpu_id, "unsupported", f"{card.device_dir} has no amdgpu hwmon")
        return _set_power_cap(gpu_id, hwmon, watts)

    def _profile(self, card: Path, hwmon: Path | None, names: dict[str, str]) -> GpuProfile:
        root = self.config.sysfs_root
        device = card / "device"
        bus = pci_slot(device)
        uuid = rocm_uuid(read_str(device / "unique_id"))
        return GpuProfile(
            id=uuid if isinstance(uuid, str) else f"pci:{bus}" if bus else f"drm:{card.name}",
            vendor="amd",
            backend=self.name,
            name=_name(device, bus, names),
            kind=amdgpu_kind(device),
            uuid=uuid,
            pci_bus_id=bus or UNSUPPORTED,
            render_node=render_node(device, self.config.dev_root),
            vram_total_bytes=read_int(device / "mem_info_vram_total"),
            gtt_total_bytes=read_int(device / "mem_info_gtt_total"),
            driver_version=read_str(root / "module" / _DRIVER / "version"),
            rocm_version=rocm_version(self.config.rocm_path),
            gfx_target=_kfd_gfx_target(root, bus),
            power_limit_w=_hwmon_watts(hwmon, "power1_cap"),
            power_limit_max_w=_hwmon_watts(hwmon, "power1_cap_max"),
            clock_graphics_max_hz=_dpm_max(device / "pp_dpm_sclk"),
            clock_memory_max_hz=_dpm_max(device / "pp_dpm_mclk"),
            pcie_gen_max=pcie_gen_max(device),
            pcie_width_max=read_int(device / "max_link_width"),
            ecc_enabled=_ecc_enabled(device),
            numa_node=device_numa_node(device),
        )


def rocm_version(rocm_path: Path) -> Reading[str]:
    """The installed ROCm release (``.info/version``, e.g. ``6.1.2-119``), if any."""
    version = read_str(rocm_path / ".info" / "version")
    if version == UNSUPPORTED:  # the GPU could run ROCm; this machine lacks it
        return Unavailable("not_installed", f"no ROCm under {rocm_path}")
    return version


def amdgpu_kind(device_dir: Path) -> Reading[GpuKind]:
    """Whether an amdgpu device is an APU or a discrete card (rules in the module doc)."""
    if (device_dir / "board_info").exists() or (device_dir / "mem_info_vram_vendor").exists():
        return "discrete"
    vram = read_int(device_dir / "mem_info_vram_total")
    gtt = read_int(device_dir / "mem_info_gtt_total")
    if not (isinstance(vram, int) and isinstance(gtt, int)):
        return Unavailable("undetermined", "no board_info, no VRAM vendor, no memory sizes")
    if 0 < vram <= _CARVE_OUT_MAX and gtt >= 4 * vram:
        return "integrated"
    return Unavailable("undetermined", "no board_info, no VRAM vendor, VRAM not a carve-out")


def gfx_target_name(version: int) -> str:
    """KFD's ``gfx_target_version`` as an LLVM target: 90010 is gfx90a, 100301 gfx1031."""
    major, minor, stepping = version // 10000, version // 100 % 100, version % 100
    return f"gfx{major}{minor:x}{stepping:x}"


def marketing_names(dev_root: Path) -> dict[str, str]:
    """PCI address -> marketing name, from the optional ``pyamdgpuinfo`` (libdrm's table).

    A missing module costs one import-system lookup. The library opens the real
    ``/dev/dri`` whatever ``dev_root`` says, so it is asked only when ``dev_root`` is
    ``/dev`` and its ``dri`` directory can be read.
    """
    dri = dev_root / "dri"
    if dev_root.resolve() != Path("/dev") or not os.access(dri, os.R_OK | os.X_OK):
        return {}
    if importlib.util.find_spec("pyamdgpuinfo") is None:
        return {}
    try:
        import pyamdgpuinfo

        gpus = [pyamdgpuinfo.get_gpu(i) for i in range(pyamdgpuinfo.detect_gpus())]
    except Exception as exc:  # a Cython binding over libdrm: OSError, RuntimeError, ...
        _log.debug("pyamdgpuinfo gave no names: %s", exc)
        return {}
    return {str(gpu.pci_slot).lower(): str(gpu.name) for gpu in gpus if gpu.pci_slot and gpu.name}


def rocm_uuid(unique_id: Reading[str]) -> Reading[str]:
    """ROCm's UUID of a GPU (``GPU-`` and 16 hex digits) from its hex unique id or serial."""
    if not isinstance(unique_id, str):
        return unique_id
    try:
        value = int(unique_id, 16)
    except ValueError:
        return Unavailable("bad_value", f"unique id {unique_id[:40]!r}")
    # ROCm spells a GPU without a unique id "GPU-XX"; zero is that case.
    return f"GPU-{value:016x}" if value else UNSUPPORTED


def _name(device: Path, bus: str | None, names: dict[str, str]) -> str:
    product = read_str(device / "product_name")  # from the board's FRU EEPROM, where it has one
    if isinstance(product, str) and product:
        return product
    if bus in names:
        return names[bus]
    pci_id = read_uevent(device).get("PCI_ID")
    return f"AMD GPU {pci_id}" if pci_id else "AMD GPU"


def _kfd_gfx_target(sysfs_root: Path, bus: str | None) -> Reading[str]:
    nodes_dir = sysfs_root / "class" / "kfd" / "kfd" / "topology" / "nodes"
    if bus is None:
        return UNSUPPORTED
    try:
        nodes = sorted(nodes_dir.iterdir())
    except OSError:
        return UNSUPPORTED  # no KFD: amdgpu without compute support
    domain, bus_no, slot = bus.split(":")
    device_no, function = slot.split(".")
    # KFD writes the PCI location as (bus << 8) | (device << 3) | function.
    location = int(bus_no, 16) << 8 | int(device_no, 16) << 3 | int(function)
    for node in nodes:
        props = _kfd_properties(node / "properties")
        if props.get("gfx_target_version", 0) == 0:
            continue  # a CPU node
        if props.get("location_id") == location and props.get("domain", 0) == int(domain, 16):
            return gfx_target_name(props["gfx_target_version"])
    return UNSUPPORTED


def _kfd_properties(path: Path) -> dict[str, int]:
    text = read_str(path)
    if not isinstance(text, str):
        return {}
    pairs = (line.split() for line in text.splitlines())
    return {kv[0]: int(kv[1]) for kv in pairs if len(kv) == 2 and kv[1].isdigit()}


def _hwmon_watts(hwmon: Path | None, attribute: str) -> Reading[float]:
    return UNSUPPORTED if hwmon is None else read_scaled(hwmon / attribute, _MICRO)


def _set_power_cap(gpu_id: str, hwmon: Path, watts: float) -> PowerLimitResult:
    cap = hwmon / "power1_cap"
    if not cap.is_file():
        return _refused(gpu_id, "unsupported", f"{cap} does not exist")
    if not math.isfinite(watts) or watts < 0:
        return _refused(gpu_id, "out_of_range", f"{watts:g} W is not a power limit")
    # Without both range files the driver alone checks the cap (EINVAL when outside).
    low = read_scaled(hwmon / "power1_cap_min", _MICRO)
    high = read_scaled(hwmon / "power1_cap_max", _MICRO)
    if isinstance(low, float) and isinstance(high, float) and not low <= watts <= high:
        return _refused(
            gpu_id, "out_of_range", f"{watts:g} W is outside this card's {low:g}-{high:g} W"
        )
    try:
        # No O_CREAT: sysfs attributes are never created, and a missing one is unsupported.
        fd = os.open(cap, os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, f"{round(watts * _MICRO)}\n".encode())  # one write, as sysfs wants
        finally:
            os.close(fd)
    except OSError as exc:
        return _refused(gpu_id, *_power_cap_error(cap, exc, watts))
    limit = read_scaled(cap, _MICRO)
    limit_w = limit if isinstance(limit, float) else None
    return PowerLimitResult(gpu_id=gpu_id, status="set", limit_w=limit_w)


def _power_cap_error(cap: Path, exc: OSError, watts: float) -> tuple[PowerLimitStatus, str]:
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission_denied", f"{cap}: {exc.strerror}; setting a power cap needs root"
    if exc.errno == errno.EINVAL:  # how amdgpu refuses a cap outside its range
        return "out_of_range", f"amdgpu refused {watts:g} W: {exc.strerror}"
    if exc.errno in (errno.ENOENT, errno.ENODEV, errno.EOPNOTSUPP, errno.ENOTSUP):
        return "unsupported", f"{cap}: {exc.strerror}"
    return "failed", f"{cap}: {exc.strerror}"


def _refused(gpu_id: str, status: PowerLimitStatus, detail: str) -> PowerLimitResult:
    return PowerLimitResult(gpu_id=gpu_id, status=status, limit_w=None, detail=detail)


def _dpm_levels(path: Path) -> Reading[list[tuple[int, bool]]]:
    text = read_str(path)
    if not isinstance(text, str):
        return text
    levels = [(int(m[1]) * _MHZ, m[2] == "*") for m in _DPM_LEVEL.finditer(text)]
    return levels or Unavailable("bad_value", f"{path}: {text[:40]!r}")


def _dpm_max(path: Path) -> Reading[int]:
    levels = _dpm_levels(path)
    return max(hz for hz, _ in levels) if isinstance(levels, list) else levels


def _dpm_current(path: Path) -> Reading[int]:
    levels = _dpm_levels(path)
    if not isinstance(levels, list):
        return levels
    current = [hz for hz, active in levels if active]
    return current[0] if current else Unavailable("bad_value", f"{path}: no level marked '*'")


def _ecc_enabled(device: Path) -> Reading[bool]:
    text = read_str(device / "ras" / "features")  # "feature mask: 0x3fbb"
    if not isinstance(text, str):
        return text
    try:
        mask = int(text.split()[-1], 16)
    except (IndexError, ValueError):
        return Unavailable("bad_value", f"ras/features {text[:40]!r}")
    return bool(mask & _UMC_RAS_BIT)


def _sample(card: _Card, clients: DrmClients) -> GpuSample:
    device = card.device_dir
    if not device.is_dir():
        return GpuSample(id=card.id, state="lost")
    busy = read_int(device / "gpu_busy_percent")
    memory_busy = read_int(device / "mem_busy_percent")
    sample = GpuSample(
        id=card.id,
        util_gpu_pct=float(busy) if isinstance(busy, int) else busy,
        util_memory_pct=float(memory_busy) if isinstance(memory_busy, int) else memory_busy,
        memory_used_bytes=read_int(device / "mem_info_vram_used"),
        gtt_used_bytes=read_int(device / "mem_info_gtt_used"),
        pcie_replay_count=read_int(device / "pcie_replay_count"),
        processes=clients.processes(card.pci_bus_id, (_DRIVER,)),
    )
    sample.ecc_uncorrected, sample.ecc_corrected = _ras_counts(device)
    hwmon = card.hwmon.path()
    if hwmon is not None:
        _read_hwmon(hwmon, sample)
    if not is_value(sample.clock_graphics_hz):
        sample.clock_graphics_hz = _dpm_current(device / "pp_dpm_sclk")
    if not is_value(sample.clock_memory_hz):
        sample.clock_memory_hz = _dpm_current(device / "pp_dpm_mclk")
    return sample


def _read_hwmon(hwmon: Path, sample: GpuSample) -> None:
    temps = hwmon_temperatures(hwmon)
    # amdgpu labels its sensors edge, junction and mem; kernels before 4.20 had temp1 only.
    sample.temperature_c = temps.get("edge", temps.get("temp1", UNSUPPORTED))
    sample.temperature_hotspot_c = temps.get("junction", UNSUPPORTED)
    sample.temperature_memory_c = temps.get("mem", UNSUPPORTED)
    power = read_scaled(hwmon / "power1_average", _MICRO)
    if isinstance(power, Unsupported):
        # Newer SMUs report an instantaneous power1_input instead of the average.
        power = read_scaled(hwmon / "power1_input", _MICRO)
    sample.power_w = power
    sample.energy_j = read_scaled(hwmon / "energy1_input", _MICRO)  # microjoules
    sample.clock_graphics_hz = read_int(hwmon / "freq1_input")  # sclk, in Hz already
    sample.clock_memory_hz = read_int(hwmon / "freq2_input")  # mclk
    sample.fan_pct = _fan_pct(hwmon)


def _fan_pct(hwmon: Path) -> Reading[float]:
    pwm = read_int(hwmon / "pwm1")
    if not isinstance(pwm, int):
        return pwm  # a fan reporting only fan1_input (rpm) has no percentage to give
    full = read_int(hwmon / "pwm1_max")
    full = full if isinstance(full, int) and full > 0 else _PWM_FULL
    return 100.0 * pwm / full


def _ras_counts(device: Path) -> tuple[Reading[int], Reading[int]]:
    text = read_str(device / "ras" / "umc_err_count")  # "ue: 0\nce: 0"
    if not isinstance(text, str):
        return text, text
    counts = {kind: int(count) for kind, count in _RAS_COUNT.findall(text)}
    bad = Unavailable("bad_value", f"ras/umc_err_count {text[:40]!r}")
    return counts.get("ue", bad), counts.get("ce", bad)
