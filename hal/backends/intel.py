"""Intel GPUs through the i915 and xe kernel drivers' sysfs files.

Every ``class/drm/cardN`` bound to ``i915`` or ``xe`` is one GPU. Where the two drivers
keep what this backend reads (checked against the kernel sources and Intel's i915
backport):

- i915 puts its frequency files on the DRM card, not on the PCI device: ``cardN/
  gt_RP0_freq_mhz`` (hardware maximum), ``gt_act_freq_mhz`` (actual; 0 while the GT sleeps
  in RC6), ``gt_cur_freq_mhz`` (requested), and per GT ``cardN/gt/gtN/throttle_reason_*``.
- xe puts them under the PCI device, per tile and GT: ``device/tile0/gt0/freq0/`` holds
  ``rp0_freq``, ``max_freq`` (the user's cap), ``act_freq`` and ``cur_freq`` in MHz, and
  ``freq0/throttle/reason_*``.
- Local memory: mainline i915 publishes no total; Intel's out-of-tree i915 writes
  ``cardN/lmem_total_bytes`` (``prelim_lmem_total_bytes`` in older releases), and xe wrote
  ``device/tileN/physical_vram_size_bytes`` in the kernels that had it.
- Both drivers register an hwmon device (named ``i915`` or ``xe``) for discrete GPUs only:
  ``energy1_input`` in microjoules (xe on DG2 has only the package counter,
  ``energy2_input``), ``power1_max`` (the sustained PL1 limit, microwatts; 0 when disabled),
  and ``temp*_input`` on recent kernels.

Rules this backend chooses:

- ``kind`` is ``discrete`` when the card has local memory or an i915/xe hwmon device;
  ``integrated`` at ``0000:00:02.0``, the slot Intel's integrated graphics always takes;
  ``discrete`` on any bus but 0, since a card sits behind a PCIe port; else ``undetermined``.
- Power is the energy counter's change over the time between two samples, so the first
  sample after :meth:`IntelSysfsBackend.open` has energy but no power yet.
- Intel's sysfs names no product and no UUID: the name carries the PCI id, the id the bus.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import msgspec

from hal.backend import Backend, HalConfig
from hal.drm_clients import DrmClients, scanner_for
from hal.sysfs import (
    HwmonLocator,
    cards_bound_to,
    device_numa_node,
    driver_name,
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
    Reading,
    Unavailable,
    Unsupported,
)

__all__ = ["IntelSysfsBackend", "intel_kind"]

_DRIVERS = ("i915", "xe")
_MHZ = 1_000_000
_MICRO = 1_000_000
_INTEGRATED_SLOT = "0000:00:02.0"

# Frequency files in order of preference; i915's are under the DRM card, xe's under the
# PCI device.
_MAX_FREQ = {
    "i915": ("gt_RP0_freq_mhz", "gt/gt0/rps_RP0_freq_mhz"),
    "xe": ("tile0/gt0/freq0/rp0_freq", "tile0/gt0/freq0/max_freq"),
}
_ACT_FREQ = {
    "i915": ("gt_act_freq_mhz", "gt/gt0/rps_act_freq_mhz", "gt_cur_freq_mhz"),
    "xe": ("tile0/gt0/freq0/act_freq", "tile0/gt0/freq0/cur_freq"),
}
_THROTTLE_FILES = {
    "i915": ("gt/gt*/throttle_reason_*", "throttle_reason_"),
    "xe": ("tile*/gt*/freq0/throttle/reason_*", "reason_"),
}


class _Card(msgspec.Struct):
    """A card as opened, and the energy reading the next sample's power is measured from."""

    id: str
    card_dir: Path
    driver: str
    hwmon: HwmonLocator
    pci_bus_id: str | None = None
    last_energy: tuple[float, float] | None = None
    """Joules and the monotonic time they were read at."""

    @property
    def device_dir(self) -> Path:
        """The card's PCI device directory."""
        return self.card_dir / "device"

    @property
    def freq_dir(self) -> Path:
        """Where this card's driver keeps its frequency and throttle files."""
        return _freq_base(self.card_dir, self.driver)


class IntelSysfsBackend(Backend):
    """Every GPU bound to the i915 or xe driver, read from sysfs."""

    name: ClassVar[str] = "intel"

    def __init__(self, config: HalConfig) -> None:
        super().__init__(config)
        self._cards: list[_Card] = []

    def open(self) -> list[GpuProfile]:
        """Find every i915 and xe card and read its static facts."""
        root = self.config.sysfs_root
        self._cards = []
        profiles = []
        for card_dir in cards_bound_to(root, _DRIVERS):
            driver = str(driver_name(card_dir / "device"))
            hwmon = HwmonLocator(card_dir / "device", driver)
            profile = self._profile(card_dir, driver, hwmon.path())
            bus = profile.pci_bus_id if isinstance(profile.pci_bus_id, str) else None
            self._cards.append(
                _Card(id=profile.id, card_dir=card_dir, driver=driver, hwmon=hwmon, pci_bus_id=bus)
            )
            profiles.append(profile)
        if not profiles:
            raise no_cards(root, _DRIVERS)
        return profiles

    def sample(self, now: float) -> list[GpuSample]:
        """Read the fast-changing values of every card opened; ``now`` times the power."""
        clients = scanner_for(self.config.proc_root).clients(now)
        return [_sample(card, now, clients) for card in self._cards]

    def versions(self) -> dict[str, str]:
        """Module versions, which only out-of-tree (backport) builds publish."""
        found = {d: read_str(self.config.sysfs_root / "module" / d / "version") for d in _DRIVERS}
        return {d: v for d, v in found.items() if isinstance(v, str) and v}

    def _profile(self, card_dir: Path, driver: str, hwmon: Path | None) -> GpuProfile:
        device = card_dir / "device"
        bus = pci_slot(device)
        pci_id = read_uevent(device).get("PCI_ID")
        memory = _local_memory(card_dir)
        return GpuProfile(
            id=f"pci:{bus}" if bus else f"drm:{card_dir.name}",
            vendor="intel",
            backend=self.name,
            name=f"Intel GPU {pci_id}" if pci_id else "Intel GPU",
            kind=intel_kind(bus, memory, has_hwmon=hwmon is not None),
            uuid=UNSUPPORTED,
            pci_bus_id=bus or UNSUPPORTED,
            render_node=render_node(device, self.config.dev_root),
            vram_total_bytes=memory,
            driver_version=read_str(self.config.sysfs_root / "module" / driver / "version"),
            power_limit_w=_power_limit(hwmon),
            clock_graphics_max_hz=_first_mhz(_freq_base(card_dir, driver), _MAX_FREQ[driver]),
            pcie_gen_max=pcie_gen_max(device),
            pcie_width_max=read_int(device / "max_link_width"),
            numa_node=device_numa_node(device),
        )


def intel_kind(bus: str | None, local_memory: Reading[int], *, has_hwmon: bool) -> Reading[GpuKind]:
    """Whether an Intel GPU is integrated or discrete (rules in the module doc)."""
    if has_hwmon or (isinstance(local_memory, int) and local_memory > 0):
        return "discrete"
    if bus == _INTEGRATED_SLOT:
        return "integrated"
    if bus is not None and bus.split(":")[1] != "00":
        return "discrete"
    return Unavailable("undetermined", f"no local memory, no hwmon, at {bus}")


def _freq_base(card_dir: Path, driver: str) -> Path:
    return card_dir if driver == "i915" else card_dir / "device"


def _local_memory(card_dir: Path) -> Reading[int]:
    for name in ("lmem_total_bytes", "prelim_lmem_total_bytes"):
        total = read_int(card_dir / name)
        if not isinstance(total, Unsupported):
            # The backport writes 0 for a GPU without local memory.
            return total if total != 0 else UNSUPPORTED
    tiles = [read_int(p) for p in sorted(card_dir.glob("device/tile*/physical_vram_size_bytes"))]
    sizes = [size for size in tiles if isinstance(size, int)]
    return sum(sizes) if sizes else UNSUPPORTED


def _power_limit(hwmon: Path | None) -> Reading[float]:
    if hwmon is None:
        return UNSUPPORTED
    limit = read_scaled(hwmon / "power1_max", _MICRO)
    return UNSUPPORTED if limit == 0 else limit  # 0: the PL1 limit is disabled


def _first_mhz(base: Path, candidates: tuple[str, ...]) -> Reading[int]:
    for relative in candidates:
        reading = read_int(base / relative, scale=_MHZ)
        if not isinstance(reading, Unsupported):
            return reading
    return UNSUPPORTED


def _throttle_reasons(card: _Card) -> Reading[list[str]]:
    pattern, prefix = _THROTTLE_FILES[card.driver]
    files = sorted(card.freq_dir.glob(pattern))
    if not files:
        return UNSUPPORTED
    reasons = {path.name.removeprefix(prefix) for path in files if read_int(path) == 1}
    # i915's throttle_reason_status is only the OR of the others.
    return sorted(reasons - {"status"})


def _sample(card: _Card, now: float, clients: DrmClients) -> GpuSample:
    if not card.device_dir.is_dir():
        card.last_energy = None
        return GpuSample(id=card.id, state="lost")
    sample = GpuSample(
        id=card.id,
        clock_graphics_hz=_first_mhz(card.freq_dir, _ACT_FREQ[card.driver]),
        throttle_reasons=_throttle_reasons(card),
        processes=clients.processes(card.pci_bus_id, _DRIVERS),
    )
    hwmon = card.hwmon.path()
    if hwmon is not None:
        temps = hwmon_temperatures(hwmon)
        # xe labels its sensors (pkg, vram, and more on newer parts); i915 has one, unlabelled.
        sample.temperature_memory_c = temps.pop("vram", UNSUPPORTED)
        sample.temperature_c = temps.get("pkg", next(iter(temps.values()), UNSUPPORTED))
        energy = read_scaled(hwmon / "energy1_input", _MICRO)
        if isinstance(energy, Unsupported):
            energy = read_scaled(hwmon / "energy2_input", _MICRO)
        sample.energy_j = energy
        sample.power_w = _power(card, energy, now)
    return sample


def _power(card: _Card, energy: Reading[float], now: float) -> Reading[float]:
    if not isinstance(energy, float):
        card.last_energy = None
        return energy
    last, card.last_energy = card.last_energy, (energy, now)
    if last is None:
        return Unavailable("warming_up", "power needs a second energy reading")
    joules, then = last
    if now <= then:
        return Unavailable("warming_up", "no time has passed since the last energy reading")
    if energy < joules:
        return Unavailable("counter_reset", "the energy counter went backwards")
    return (energy - joules) / (now - then)
