"""Build a fake ``libnvidia-ml.so.1`` that serves the GPUs of a recorded nvidia-smi capture.

Usage::

    python tests/support/fakenvml/build.py --xml CAPTURE.xml --out DIR [--omit SYMBOL ...]
    python tests/support/fakenvml/build.py --txt CAPTURE.txt --out DIR [--omit SYMBOL ...]

This writes ``DIR/libnvidia-ml.so.1`` and prints its path. ``--omit`` (repeatable) leaves an
NVML function out of the library's exports, as on an older driver. Load the result with
``pynvml.nvmlLib = ctypes.CDLL(path)`` before ``pynvml.nvmlInit()``, because pynvml otherwise
loads ``libnvidia-ml.so.1`` by name.

Captures:

- ``--xml``: ``nvidia-smi -q -x`` output, old schemas without a DTD up to DTD v13. Its MIG
  devices (``<mig_devices>``) have no name or UUID in the XML: see :class:`MigDevice`.
- ``--txt``: an nvidia_gpu_exporter capture transcript. Its idle ``nvidia-smi -q`` section is
  the source of nearly every value. The ``-L`` section adds MIG names and UUIDs, the idle
  ``--query-gpu`` CSV the compute capability, and ``topo -m`` the GPU NUMA id.

:class:`Capture` holds every value the fake serves, in the units NVML uses. ``None`` means that
the capture lacks the value (absent, ``N/A``, ``[N/A]``, ``Not Supported``, deprecated...), and
the fake then answers ``NVML_ERROR_NOT_SUPPORTED``. Calls that fill a structure
(``nvmlDeviceGetPciInfo_v3``, ``nvmlDeviceGetMemoryInfo[_v2]``, ``nvmlDeviceGetUtilizationRates``,
``nvmlDeviceGetEccMode``, ``nvmlDeviceGetMigMode``, ``nvmlDeviceGetCudaComputeCapability``,
``nvmlDeviceGetPowerManagementLimitConstraints``) need every value they report.

Values the capture cannot hold are synthesised:

- energy (``nvmlDeviceGetTotalEnergyConsumption``, field 83) in mJ:
  ``ENERGY_BASE_MJ + power_usage_mw * seconds since nvmlInit`` (the first one, or the first
  after a full nvmlShutdown), only when the GPU has a ``power_usage_mw``.
- encoder/decoder sampling period: ``UTILIZATION_SAMPLING_PERIOD_US``.
- ``nvmlDeviceGetMaxMigDeviceCount``: ``MAX_MIG_DEVICES`` while MIG mode is enabled, else 0.
  The captured MIG devices take indexes 0..n-1; higher indexes give ``NVML_ERROR_NOT_FOUND``.
- ``nvmlSystemGetNVMLVersion``: ``<CUDA major>.<driver version>``, e.g. ``13.590.48.01``.

Fault injection, read from the environment by every ``nvmlInit*`` call (see fakenvml.c):

- ``FAKENVML_INIT_RESULT=<name or number>``: nvmlInit* returns that error, e.g.
  ``DRIVER_NOT_LOADED`` (9), ``NO_PERMISSION`` (4), ``LIB_RM_VERSION_MISMATCH`` (18).
- ``FAKENVML_INIT_HANG=1``: nvmlInit* never returns.
- ``FAKENVML_INIT_CRASH=1``: nvmlInit* kills the process with SIGSEGV.
- ``FAKENVML_CONTROL=/path``: device calls re-read this file whenever its mtime, size or inode
  changes (replace it atomically if the size stays the same). A line ``lost <index>`` makes
  every call on that GPU and its MIG devices return ``NVML_ERROR_GPU_IS_LOST`` until the line
  is removed. A line ``noevents <index>`` makes that GPU support no events
  (``NVML_ERROR_NOT_SUPPORTED``) while it is there. A missing file means no faults.
  A line ``xid <index> <xid> [<gpu instance> <compute instance>]`` is an event, not a state:
  each new version of the file read posts one Xid critical error per such line, in order, to
  every event set that has GPU ``<index>`` registered for Xid events. Events arrive on the
  physical GPU's handle; the instance ids (default ``0xFFFFFFFF``) name a MIG instance.
  A line ``nopermission <index>`` makes ``nvmlDeviceSetPowerManagementLimit`` on that GPU
  return ``NVML_ERROR_NO_PERMISSION`` (a user who is not root), and ``nopowercap <index>``
  ``NVML_ERROR_NOT_SUPPORTED``, while the line is there.

Power limits: ``nvmlDeviceSetPowerManagementLimit`` sets what
``nvmlDeviceGetPowerManagementLimit`` and ``nvmlDeviceGetEnforcedPowerLimit`` then report, on
GPUs whose capture has the limit constraints. A limit outside them is
``NVML_ERROR_INVALID_ARGUMENT``, as with the driver; MIG handles are ``NVML_ERROR_NOT_SUPPORTED``.
The driver keeps a limit until reboot; the fake until the last ``nvmlShutdown``, so that each
test starts from the capture.

Events (``nvmlEventSetCreate``, ``nvmlDeviceGetSupportedEventTypes``,
``nvmlDeviceRegisterEvents``, ``nvmlEventSetWait_v2``, ``nvmlEventSetFree``): physical GPUs
support Xid, P-state and clock events, plus ECC events while ECC is enabled; MIG handles
support none. A wait returns the oldest queued event; with none queued, ``GPU_IS_LOST`` when
a registered GPU is lost, else ``TIMEOUT`` once ``timeoutms`` has passed (at once for 0).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import re
import subprocess
import sys
import tempfile
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

__all__ = [
    "ENERGY_BASE_MJ",
    "EXPORTED_SYMBOLS",
    "LIBRARY_NAME",
    "MAX_MIG_DEVICES",
    "UTILIZATION_SAMPLING_PERIOD_US",
    "BuildError",
    "Capture",
    "Gpu",
    "MigDevice",
    "Process",
    "build_library",
    "generate_devices_c",
    "main",
    "parse_capture",
    "parse_txt",
    "parse_xml",
]

LIBRARY_NAME = "libnvidia-ml.so.1"
ENERGY_BASE_MJ = 1_000_000_000
"""Energy counter at nvmlInit, in mJ (1 MJ, as if the GPU had been running a while)."""
UTILIZATION_SAMPLING_PERIOD_US = 1_000_000
MAX_MIG_DEVICES = 7
"""What nvmlDeviceGetMaxMigDeviceCount reports in MIG mode (7 on every MIG-capable GPU so far)."""

EXPORTED_SYMBOLS: tuple[str, ...] = (
    "nvmlInit",
    "nvmlInit_v2",
    "nvmlInitWithFlags",
    "nvmlShutdown",
    "nvmlErrorString",
    "nvmlSystemGetDriverVersion",
    "nvmlSystemGetNVMLVersion",
    "nvmlSystemGetCudaDriverVersion",
    "nvmlSystemGetCudaDriverVersion_v2",
    "nvmlDeviceGetCount",
    "nvmlDeviceGetCount_v2",
    "nvmlDeviceGetHandleByIndex",
    "nvmlDeviceGetHandleByIndex_v2",
    "nvmlDeviceGetHandleByUUID",
    "nvmlDeviceGetHandleByPciBusId_v2",
    "nvmlDeviceGetName",
    "nvmlDeviceGetUUID",
    "nvmlDeviceGetSerial",
    "nvmlDeviceGetMinorNumber",
    "nvmlDeviceGetVbiosVersion",
    "nvmlDeviceGetPciInfo_v3",
    "nvmlDeviceGetMemoryInfo",
    "nvmlDeviceGetMemoryInfo_v2",
    "nvmlDeviceGetCudaComputeCapability",
    "nvmlDeviceGetNumaNodeId",
    "nvmlDeviceGetPowerUsage",
    "nvmlDeviceGetTotalEnergyConsumption",
    "nvmlDeviceGetEnforcedPowerLimit",
    "nvmlDeviceGetPowerManagementLimit",
    "nvmlDeviceGetPowerManagementLimitConstraints",
    "nvmlDeviceGetPowerManagementDefaultLimit",
    "nvmlDeviceSetPowerManagementLimit",
    "nvmlDeviceGetClockInfo",
    "nvmlDeviceGetMaxClockInfo",
    "nvmlDeviceGetCurrentClocksEventReasons",
    "nvmlDeviceGetCurrentClocksThrottleReasons",
    "nvmlDeviceGetPerformanceState",
    "nvmlDeviceGetMaxPcieLinkGeneration",
    "nvmlDeviceGetGpuMaxPcieLinkGeneration",
    "nvmlDeviceGetCurrPcieLinkGeneration",
    "nvmlDeviceGetMaxPcieLinkWidth",
    "nvmlDeviceGetCurrPcieLinkWidth",
    "nvmlDeviceGetPcieReplayCounter",
    "nvmlDeviceGetEccMode",
    "nvmlDeviceGetTotalEccErrors",
    "nvmlDeviceGetUtilizationRates",
    "nvmlDeviceGetEncoderUtilization",
    "nvmlDeviceGetDecoderUtilization",
    "nvmlDeviceGetTemperature",
    "nvmlDeviceGetFanSpeed",
    "nvmlDeviceGetComputeRunningProcesses_v3",
    "nvmlDeviceGetGraphicsRunningProcesses_v3",
    "nvmlDeviceGetFieldValues",
    "nvmlDeviceGetMigMode",
    "nvmlDeviceGetMaxMigDeviceCount",
    "nvmlDeviceGetMigDeviceHandleByIndex",
    "nvmlDeviceIsMigDeviceHandle",
    "nvmlDeviceGetGpuInstanceId",
    "nvmlDeviceGetComputeInstanceId",
    "nvmlDeviceGetDeviceHandleFromMigDeviceHandle",
    "nvmlEventSetCreate",
    "nvmlDeviceGetSupportedEventTypes",
    "nvmlDeviceRegisterEvents",
    "nvmlEventSetWait_v2",
    "nvmlEventSetFree",
)

_HERE = Path(__file__).resolve().parent
_MIB = 1024 * 1024


class BuildError(RuntimeError):
    """The fake library could not be compiled, or exports the wrong symbols."""


# --------------------------------------------------------------------------- the capture model


@dataclass(frozen=True)
class Process:
    """A process running on a GPU, as nvidia-smi listed it."""

    pid: int
    type: str
    """``C`` (compute), ``G`` (graphics) or ``C+G``. Compute-process calls list C and C+G;
    graphics-process calls list G and C+G."""
    name: str
    used_memory_bytes: int | None
    """None (WDDM "Not available", N/A) is served as NVML_VALUE_NOT_AVAILABLE, which pynvml
    turns into None."""
    gpu_instance_id: int | None
    """None outside MIG, served as 0xFFFFFFFF."""
    compute_instance_id: int | None


@dataclass(frozen=True)
class MigDevice:
    """A MIG device. Its handle serves the values below plus the parent's compute capability
    and the parent's processes whose GPU and compute instance ids match; every other query
    returns NVML_ERROR_NOT_SUPPORTED."""

    index: int
    """Index for nvmlDeviceGetMigDeviceHandleByIndex (nvidia-smi's "MIG Dev")."""
    gpu_instance_id: int
    compute_instance_id: int
    name: str
    """``<GPU name> MIG <profile>``, e.g. "NVIDIA H100 80GB HBM3 MIG 1g.10gb", with the profile
    from ``nvidia-smi -L``; ``<GPU name> MIG`` when -L does not list the device."""
    uuid: str
    """From ``nvidia-smi -L``; when -L does not list the device, derived as
    ``"MIG-" + uuid5(NAMESPACE_OID, "<GPU uuid>/<gpu instance id>/<compute instance id>")``."""
    memory_total_bytes: int | None
    """The GPU instance's shared framebuffer, as in "Shared FB Memory Usage"."""
    memory_reserved_bytes: int | None
    memory_used_bytes: int | None
    memory_free_bytes: int | None


@dataclass(frozen=True)
class Gpu:
    """One physical GPU and every value the fake serves for it. None = not in the capture.

    Memory: nvmlDeviceGetMemoryInfo_v2 serves total/reserved/used/free as below, where
    "used" excludes reserved memory. nvmlDeviceGetMemoryInfo (v1) serves total, free and
    ``used = total - free``, as the real v1 call counts reserved memory as used. The captured
    values are MiB-rounded, so total need not equal reserved + used + free.
    """

    index: int
    """NVML index: position in the capture."""
    name: str
    uuid: str
    serial: str | None
    vbios_version: str | None
    minor_number: int | None
    pci_bus_id: str
    """As in nvmlPciInfo_t.busId, e.g. "00000000:0C:00.0". busIdLegacy is "0000:0C:00.0"."""
    pci_domain: int
    pci_bus: int
    pci_device: int
    pci_device_id: int | None
    """Combined device and vendor id, e.g. 0x1E8110DE."""
    pci_subsystem_id: int | None
    memory_total_bytes: int | None
    memory_reserved_bytes: int | None
    memory_used_bytes: int | None
    memory_free_bytes: int | None
    cuda_compute_capability: tuple[int, int] | None
    """(major, minor); only .txt captures record it."""
    power_usage_mw: int | None
    """nvmlDeviceGetPowerUsage: the average draw where the capture has one (what newer drivers
    report), else the single "Power Draw", else the instantaneous draw."""
    power_average_mw: int | None
    """Field NVML_FI_DEV_POWER_AVERAGE (185)."""
    power_instant_mw: int | None
    """Field NVML_FI_DEV_POWER_INSTANT (186)."""
    power_limit_mw: int | None
    """nvmlDeviceGetPowerManagementLimit: "Requested Power Limit" (older: "Power Limit")."""
    enforced_power_limit_mw: int | None
    """nvmlDeviceGetEnforcedPowerLimit: "Current Power Limit" (older: "Enforced Power Limit")."""
    default_power_limit_mw: int | None
    min_power_limit_mw: int | None
    max_power_limit_mw: int | None
    clock_graphics_mhz: int | None
    clock_sm_mhz: int | None
    clock_memory_mhz: int | None
    clock_video_mhz: int | None
    max_clock_graphics_mhz: int | None
    max_clock_sm_mhz: int | None
    max_clock_memory_mhz: int | None
    max_clock_video_mhz: int | None
    pcie_link_gen_max: int | None
    """nvmlDeviceGetMaxPcieLinkGeneration ("PCIe Generation / Max")."""
    pcie_link_gen_gpu_max: int | None
    """nvmlDeviceGetGpuMaxPcieLinkGeneration ("Device Max")."""
    pcie_link_gen_current: int | None
    pcie_link_width_max: int | None
    """Lanes, e.g. 16."""
    pcie_link_width_current: int | None
    pcie_replay_counter: int | None
    ecc_mode_current: bool | None
    ecc_mode_pending: bool | None
    ecc_corrected_volatile: int | None
    """nvmlDeviceGetTotalEccErrors(CORRECTED, VOLATILE), also field 3 (ECC_SBE_VOL_TOTAL).
    The capture's "Total" where it has one (single/double-bit layout), else the sum of its
    correctable counters (SRAM + DRAM); None when all of them are N/A."""
    ecc_uncorrected_volatile: int | None
    """nvmlDeviceGetTotalEccErrors(UNCORRECTED, VOLATILE), also field 4 (ECC_DBE_VOL_TOTAL)."""
    ecc_corrected_aggregate: int | None
    ecc_uncorrected_aggregate: int | None
    mig_mode_current: bool | None
    mig_mode_pending: bool | None
    numa_node_id: int | None
    """nvmlDeviceGetNumaNodeId: "GPU NUMA ID" of ``topo -m`` (only .txt captures)."""
    performance_state: int | None
    """P-state number: "P8" -> 8."""
    utilization_gpu_pct: int | None
    utilization_memory_pct: int | None
    utilization_encoder_pct: int | None
    utilization_decoder_pct: int | None
    temperature_gpu_c: int | None
    temperature_memory_c: int | None
    """Field NVML_FI_DEV_MEMORY_TEMP (82)."""
    fan_speed_pct: int | None
    clocks_event_reasons: int | None
    """NVML bit mask (nvmlClocksEventReason*) of the reasons nvidia-smi shows as Active."""
    processes: tuple[Process, ...] | None
    """None when the capture has no process section."""
    mig_devices: tuple[MigDevice, ...]


@dataclass(frozen=True)
class Capture:
    """What nvidia-smi recorded on one machine."""

    source: Path
    driver_version: str | None
    """e.g. "590.48.01"; nvidia-smi's "[Deprecated ...]" note is dropped."""
    cuda_version: str | None
    """e.g. "13.1"."""
    gpus: tuple[Gpu, ...]

    @property
    def cuda_driver_version(self) -> int | None:
        """nvmlSystemGetCudaDriverVersion[_v2]: "13.1" -> 13010."""
        if self.cuda_version is None:
            return None
        major, minor = self.cuda_version.split(".")
        return int(major) * 1000 + int(minor) * 10

    @property
    def nvml_version(self) -> str | None:
        """nvmlSystemGetNVMLVersion: "<CUDA major>.<driver version>"."""
        if self.cuda_version is None or self.driver_version is None:
            return None
        return f"{self.cuda_version.split('.')[0]}.{self.driver_version}"


# ------------------------------------------------------------------- a tree of both formats


def _normalise(label: str) -> str:
    """Turn a -q label into an XML-like key: "Sub System Id" -> "sub_system_id"."""
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")


@dataclass
class _Node:
    """An XML element or an ``nvidia-smi -q`` line with the lines indented under it."""

    label: str
    text: str
    children: list[_Node] = field(default_factory=list)

    @property
    def key(self) -> str:
        return _normalise(self.label)

    def get(self, path: str) -> _Node | None:
        """Child lookup along ``a/b/c``; a step may list alternatives: ``a|b``."""
        node = self
        for step in path.split("/"):
            names = step.split("|")
            found = next((child for child in node.children if child.key in names), None)
            if found is None:
                return None
            node = found
        return node

    def find(self, names: str) -> _Node | None:
        """First descendant, depth first, whose key is one of ``a|b``."""
        wanted = names.split("|")
        return next((node for node in self.descendants() if node.key in wanted), None)

    def descendants(self) -> Iterator[_Node]:
        for child in self.children:
            yield child
            yield from child.descendants()

    def all(self, key: str) -> list[_Node]:
        return [child for child in self.children if child.key == key]


_UNAVAILABLE = {
    "",
    "N/A",
    "Not Supported",
    "Requested functionality has been deprecated",
    "Not available in WDDM driver model",
    "Insufficient Permissions",
    "Unknown Error",
}


def _available(text: str | None) -> str | None:
    """The text, or None for N/A, [N/A], [Not Supported] and the like."""
    if text is None:
        return None
    text = text.strip()
    if text in _UNAVAILABLE or (text.startswith("[") and text.endswith("]")):
        return None
    return text


def _text(node: _Node | None, path: str | None = None) -> str | None:
    """The text of ``node`` (or of its descendant at ``path``), None when unavailable."""
    if node is not None and path is not None:
        node = node.get(path)
    return None if node is None else _available(node.text)


def _quantity(node: _Node | None, path: str | None, unit: str) -> Decimal | None:
    """A number followed by ``unit`` ("71.27 W", "16x", "9"); None when unavailable."""
    text = _text(node, path)
    if text is None:
        return None
    match = re.fullmatch(r"(-?\d+(?:\.\d+)?)\s*(\S*)", text)
    if match is None or match.group(2) != unit:
        raise ValueError(f"expected a number in {unit or 'no unit'!r}, got {text!r}")
    return Decimal(match.group(1))


def _int(node: _Node | None, path: str | None = None, unit: str = "") -> int | None:
    value = _quantity(node, path, unit)
    return None if value is None else int(value)


def _mib(node: _Node | None, path: str | None = None) -> int | None:
    """A "<n> MiB" value, in bytes."""
    value = _quantity(node, path, "MiB")
    return None if value is None else int(value) * _MIB


def _milliwatts(node: _Node | None, path: str | None = None) -> int | None:
    """A "<x.yz> W" value, in mW."""
    value = _quantity(node, path, "W")
    return None if value is None else int(value * 1000)


def _hex(node: _Node | None, path: str) -> int | None:
    """A hex id, written "0x1E8110DE" (-q) or "1E8110DE" (XML)."""
    text = _text(node, path)
    return None if text is None else int(text, 16)


def _enabled(node: _Node | None, path: str) -> bool | None:
    text = _text(node, path)
    if text is None:
        return None
    if text not in ("Enabled", "Disabled"):
        raise ValueError(f"{path}: expected Enabled or Disabled, got {text!r}")
    return text == "Enabled"


# nvmlClocksEventReason* bits, by the -q key or the XML tag without its clocks_*_reason_ prefix.
_EVENT_REASON_BITS = {
    "idle": 0x1,
    "gpu_idle": 0x1,
    "applications_clocks_setting": 0x2,
    "sw_power_cap": 0x4,
    "hw_slowdown": 0x8,
    "sync_boost": 0x10,
    "sw_thermal_slowdown": 0x20,
    "hw_thermal_slowdown": 0x40,
    "hw_power_brake_slowdown": 0x80,
    "display_clock_setting": 0x100,
    "display_clocks_setting": 0x100,
}


def _event_reasons(node: _Node | None) -> int | None:
    if node is None:
        return None
    mask = 0
    known = False
    for reason in node.descendants():
        bit = _EVENT_REASON_BITS.get(re.sub(r"^clocks_(event|throttle)_reason_", "", reason.key))
        state = _text(reason)
        if bit is not None and state is not None:
            known = True
            if state == "Active":
                mask |= bit
    return mask if known else None


def _ecc_total(counters: _Node | None, kind: str) -> int | None:
    """Corrected ("single_bit") or uncorrected ("double_bit") errors of one counter type.

    Older schemas give a total per kind; newer ones only per-memory counters
    (sram_correctable, dram_uncorrectable, sram_uncorrectable_parity, ...), which are summed.
    """
    if counters is None:
        return None
    if counters.get(f"{kind}/total") is not None:
        return _int(counters, f"{kind}/total")
    uncorrected = kind == "double_bit"
    known = [
        value
        for counter in counters.children
        if "correctable" in counter.key and ("uncorrectable" in counter.key) == uncorrected
        if (value := _int(counter)) is not None
    ]
    return sum(known) if known else None


def _pstate(node: _Node) -> int | None:
    text = _text(node, "performance_state")
    return None if text is None else int(text.removeprefix("P"))


def _process(node: _Node) -> Process:
    pid = _int(node, "pid")
    if pid is None:
        raise ValueError("process without a pid")
    return Process(
        pid=pid,
        type=_text(node, "type") or "",
        name=_text(node, "process_name|name") or "",
        used_memory_bytes=_mib(node, "used_memory|used_gpu_memory"),
        gpu_instance_id=_int(node, "gpu_instance_id"),
        compute_instance_id=_int(node, "compute_instance_id"),
    )


def _processes(node: _Node | None) -> tuple[Process, ...] | None:
    if node is None:
        return None
    if any(child.key == "process_info" for child in node.children):  # XML
        return tuple(_process(child) for child in node.all("process_info"))
    # -q text: "GPU instance ID" and "Compute instance ID" lines come before each
    # "Process ID" line, and the process's other values are indented under it.
    processes = []
    pending: list[_Node] = []
    for child in node.children:
        if child.key == "process_id":
            fields = [*pending, _Node("pid", child.text), *child.children]
            processes.append(_process(_Node("process_info", "", fields)))
            pending = []
        else:
            pending.append(child)
    return tuple(processes)


_BUS_ID = re.compile(r"([0-9A-Fa-f]+):([0-9A-Fa-f]+):([0-9A-Fa-f]+)\.[0-7]")


@dataclass(frozen=True)
class _Extras:
    """What a .txt capture records outside its -q section, for one GPU."""

    mig_names: dict[int, tuple[str, str]] = field(default_factory=dict)
    """MIG device index -> (profile, UUID), from -L."""
    compute_capability: tuple[int, int] | None = None
    numa_node_id: int | None = None


def _gpu(index: int, node: _Node, bus_id: str, extras: _Extras) -> Gpu:
    bus_match = _BUS_ID.fullmatch(bus_id)
    if bus_match is None:
        raise ValueError(f"GPU {index}: unexpected PCI bus id {bus_id!r}")
    name = _text(node, "product_name")
    gpu_uuid = _text(node, "gpu_uuid|uuid")
    if name is None or gpu_uuid is None:
        raise ValueError(f"GPU {index}: no name or UUID")

    power = node.get("gpu_power_readings|power_readings")

    def watts(names: str) -> int | None:
        """A value of the power section, which 610+ drivers split into subsections."""
        return None if power is None else _milliwatts(power.find(names))

    average = watts("average_power_draw")
    instant = watts("instantaneous_power_draw|instant_power_draw")
    single = watts("power_draw")
    link = "pci/gpu_link_info|pci_gpu_link_info"
    generation = f"{link}/pcie_generation|pcie_gen"
    width = f"{link}/link_width|link_widths"
    volatile = node.get("ecc_errors/volatile")
    aggregate = node.get("ecc_errors/aggregate")
    memory = "fb_memory_usage"
    return Gpu(
        index=index,
        name=name,
        uuid=gpu_uuid,
        serial=_text(node, "serial_number|serial"),
        vbios_version=_text(node, "vbios_version"),
        minor_number=_int(node, "minor_number"),
        pci_bus_id=bus_id,
        pci_domain=int(bus_match.group(1), 16),
        pci_bus=int(bus_match.group(2), 16),
        pci_device=int(bus_match.group(3), 16),
        pci_device_id=_hex(node, "pci/device_id|pci_device_id"),
        pci_subsystem_id=_hex(node, "pci/sub_system_id|pci_sub_system_id"),
        memory_total_bytes=_mib(node, f"{memory}/total"),
        memory_reserved_bytes=_mib(node, f"{memory}/reserved"),
        memory_used_bytes=_mib(node, f"{memory}/used"),
        memory_free_bytes=_mib(node, f"{memory}/free"),
        cuda_compute_capability=extras.compute_capability,
        power_usage_mw=next((v for v in (average, single, instant) if v is not None), None),
        power_average_mw=average,
        power_instant_mw=instant,
        power_limit_mw=watts("requested_power_limit|power_limit"),
        enforced_power_limit_mw=watts("current_power_limit|enforced_power_limit"),
        default_power_limit_mw=watts("default_power_limit"),
        min_power_limit_mw=watts("min_power_limit"),
        max_power_limit_mw=watts("max_power_limit"),
        clock_graphics_mhz=_int(node, "clocks/graphics|graphics_clock", "MHz"),
        clock_sm_mhz=_int(node, "clocks/sm|sm_clock", "MHz"),
        clock_memory_mhz=_int(node, "clocks/memory|mem_clock", "MHz"),
        clock_video_mhz=_int(node, "clocks/video|video_clock", "MHz"),
        max_clock_graphics_mhz=_int(node, "max_clocks/graphics|graphics_clock", "MHz"),
        max_clock_sm_mhz=_int(node, "max_clocks/sm|sm_clock", "MHz"),
        max_clock_memory_mhz=_int(node, "max_clocks/memory|mem_clock", "MHz"),
        max_clock_video_mhz=_int(node, "max_clocks/video|video_clock", "MHz"),
        pcie_link_gen_max=_int(node, f"{generation}/max|max_link_gen"),
        pcie_link_gen_gpu_max=_int(node, f"{generation}/device_max|max_device_link_gen"),
        pcie_link_gen_current=_int(node, f"{generation}/current|current_link_gen"),
        pcie_link_width_max=_int(node, f"{width}/max|max_link_width", "x"),
        pcie_link_width_current=_int(node, f"{width}/current|current_link_width", "x"),
        pcie_replay_counter=_int(node, "pci/replays_since_reset|replay_counter"),
        ecc_mode_current=_enabled(node, "ecc_mode/current|current_ecc"),
        ecc_mode_pending=_enabled(node, "ecc_mode/pending|pending_ecc"),
        ecc_corrected_volatile=_ecc_total(volatile, "single_bit"),
        ecc_uncorrected_volatile=_ecc_total(volatile, "double_bit"),
        ecc_corrected_aggregate=_ecc_total(aggregate, "single_bit"),
        ecc_uncorrected_aggregate=_ecc_total(aggregate, "double_bit"),
        mig_mode_current=_enabled(node, "mig_mode/current|current_mig"),
        mig_mode_pending=_enabled(node, "mig_mode/pending|pending_mig"),
        numa_node_id=extras.numa_node_id,
        performance_state=_pstate(node),
        utilization_gpu_pct=_int(node, "utilization/gpu|gpu_util", "%"),
        utilization_memory_pct=_int(node, "utilization/memory|memory_util", "%"),
        utilization_encoder_pct=_int(node, "utilization/encoder|encoder_util", "%"),
        utilization_decoder_pct=_int(node, "utilization/decoder|decoder_util", "%"),
        temperature_gpu_c=_int(node, "temperature/gpu_current_temp|gpu_temp", "C"),
        temperature_memory_c=_int(node, "temperature/memory_current_temp|memory_temp", "C"),
        fan_speed_pct=_int(node, "fan_speed", "%"),
        clocks_event_reasons=_event_reasons(
            node.get("clocks_event_reasons|clocks_throttle_reasons")
        ),
        processes=_processes(node.get("processes")),
        mig_devices=tuple(_mig(name, gpu_uuid, mig, extras) for mig in _mig_nodes(node)),
    )


def _mig_nodes(gpu: _Node) -> list[_Node]:
    """The GPU's MIG devices: -q text lists each "MIG Device" under the GPU itself, XML
    nests its <mig_device> elements in <mig_devices> (which reads "None" without MIG)."""
    nested = gpu.get("mig_devices")
    return gpu.all("mig_device") + ([] if nested is None else nested.all("mig_device"))


def _mig(gpu_name: str, gpu_uuid: str, node: _Node, extras: _Extras) -> MigDevice:
    index = _int(node, "index")
    gpu_instance = _int(node, "gpu_instance_id")
    compute_instance = _int(node, "compute_instance_id")
    if index is None or gpu_instance is None or compute_instance is None:
        raise ValueError(f"MIG device of {gpu_uuid} without index or instance ids")
    listed = extras.mig_names.get(index)
    if listed is None:
        name = f"{gpu_name} MIG"
        key = f"{gpu_uuid}/{gpu_instance}/{compute_instance}"
        mig_uuid = f"MIG-{uuid.uuid5(uuid.NAMESPACE_OID, key)}"
    else:
        name, mig_uuid = f"{gpu_name} MIG {listed[0]}", listed[1]
    # -q text: "Shared FB Memory Usage"; XML: <fb_memory_usage>, the same values.
    memory = "shared_fb_memory_usage|fb_memory_usage"
    return MigDevice(
        index=index,
        gpu_instance_id=gpu_instance,
        compute_instance_id=compute_instance,
        name=name,
        uuid=mig_uuid,
        memory_total_bytes=_mib(node, f"{memory}/total"),
        memory_reserved_bytes=_mib(node, f"{memory}/reserved"),
        memory_used_bytes=_mib(node, f"{memory}/used"),
        memory_free_bytes=_mib(node, f"{memory}/free"),
    )


def _version(text: str | None) -> str | None:
    """Drops nvidia-smi 610's "[Deprecated; will be removed ...]" suffix."""
    return None if text is None else re.sub(r"\s*\[.*\]$", "", text)


# ------------------------------------------------------------------------------- XML captures


def _from_element(element: ET.Element) -> _Node:
    return _Node(element.tag, element.text or "", [_from_element(child) for child in element])


def parse_xml(path: str | Path) -> Capture:
    """Parse ``nvidia-smi -q -x`` output."""
    path = Path(path)
    root_element = ET.parse(path).getroot()
    root = _from_element(root_element)
    gpus = tuple(
        # The id attribute is the PCI bus id, the only one the cut-down v10 sample has.
        _gpu(index, _from_element(element), element.get("id", ""), _Extras())
        for index, element in enumerate(root_element.findall("gpu"))
    )
    return Capture(
        source=path,
        driver_version=_version(_text(root, "driver_version")),
        cuda_version=_text(root, "cuda_version"),
        gpus=gpus,
    )


# ------------------------------------------------------------------------------ text captures

_BANNER = "#" * 80


def _sections(text: str) -> dict[str, list[str]]:
    """Split a transcript into sections, by title ("idle :: query (-q)").

    Each section opens with a banner, a "# <phase> :: <name>" line, usually a "# $ <command>"
    line, and another banner; its output follows up to the next banner.
    """
    sections: dict[str, list[str]] = {}
    body: list[str] = []
    lines = iter(text.splitlines())
    for line in lines:
        if line != _BANNER:
            body.append(line)
            continue
        header = []
        for header_line in lines:
            if header_line == _BANNER:
                break
            header.append(header_line)
        body = sections.setdefault(header[0].removeprefix("# ") if header else "", [])
    return sections


def _section(sections: dict[str, list[str]], title: str) -> list[str]:
    """The lines of the section whose title starts with ``title``; empty when there is none."""
    return next((body for name, body in sections.items() if name.startswith(title)), [])


_QUERY_LINE = re.compile(r"(?P<indent> *)(?P<key>\S.*?)\s+: ?(?P<value>.*)")


def _parse_query_text(lines: Iterable[str]) -> _Node:
    """``nvidia-smi -q`` output as a tree: 4 spaces of indentation per level."""
    root = _Node("", "")
    stack: list[tuple[int, _Node]] = [(-1, root)]
    for line in lines:
        if not line.strip() or line.startswith("="):
            continue
        match = _QUERY_LINE.fullmatch(line.rstrip())
        if match is None:  # a section header such as "    Clocks"
            indent = len(line) - len(line.lstrip(" "))
            node = _Node(line.strip(), "")
        else:
            indent = len(match.group("indent"))
            node = _Node(match.group("key"), match.group("value"))
        depth = indent // 4
        while stack[-1][0] >= depth:
            stack.pop()
        stack[-1][1].children.append(node)
        stack.append((depth, node))
    return root


_LIST_GPU = re.compile(r"GPU (\d+): .* \(UUID: (\S+)\)")
_LIST_MIG = re.compile(r"\s+MIG (\S+)\s+Device\s+(\d+): \(UUID: (\S+)\)")


def _parse_list(lines: Iterable[str]) -> dict[int, dict[int, tuple[str, str]]]:
    """``nvidia-smi -L``: GPU index -> MIG device index -> (profile, UUID)."""
    migs: dict[int, dict[int, tuple[str, str]]] = {}
    current: dict[int, tuple[str, str]] = {}
    for line in lines:
        if gpu := _LIST_GPU.fullmatch(line.rstrip()):
            current = migs.setdefault(int(gpu.group(1)), {})
        elif mig := _LIST_MIG.fullmatch(line.rstrip()):
            current[int(mig.group(2))] = (mig.group(1), mig.group(3))
    return migs


def _parse_query_gpu(lines: list[str]) -> dict[str, dict[str, str]]:
    """``--query-gpu ... --format=csv``: PCI bus id -> column (without " [unit]") -> value."""
    rows = [row for row in csv.reader(lines, skipinitialspace=True) if row]
    if not rows:
        return {}
    header = [re.sub(r" \[.*\]$", "", column) for column in rows[0]]
    records = [dict(zip(header, row, strict=True)) for row in rows[1:]]
    return {record["pci.bus_id"]: record for record in records}


def _parse_topo(lines: list[str]) -> dict[int, int | None]:
    """``topo -m``: GPU index -> its "GPU NUMA ID" (the last column)."""
    plain = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in lines]
    if not plain or not plain[0].rstrip().endswith("GPU NUMA ID"):
        return {}  # e.g. the Windows 591.86 capture, where topo -m failed
    numa: dict[int, int | None] = {}
    for line in plain[1:]:
        if row := re.match(r"GPU(\d+)\t", line):
            value = _available(line.split("\t")[-1])
            numa[int(row.group(1))] = None if value is None else int(value)
    return numa


def _compute_capability(record: dict[str, str] | None) -> tuple[int, int] | None:
    text = None if record is None else _available(record.get("compute_cap"))
    if text is None:
        return None
    major, minor = text.split(".")
    return int(major), int(minor)


def parse_txt(path: str | Path) -> Capture:
    """Parse an nvidia_gpu_exporter capture transcript (its idle state)."""
    path = Path(path)
    sections = _sections(path.read_text(encoding="utf-8"))
    root = _parse_query_text(_section(sections, "idle :: query (-q)"))
    migs = _parse_list(_section(sections, "capabilities :: list (-L)"))
    query_gpu = _parse_query_gpu(_section(sections, "idle :: query-gpu"))
    numa = _parse_topo(_section(sections, "capabilities :: topo -m"))
    gpu_nodes = [node for node in root.children if node.label.startswith("GPU ")]
    gpus = []
    for index, node in enumerate(gpu_nodes):
        bus_id = node.label.removeprefix("GPU ")
        extras = _Extras(
            mig_names=migs.get(index, {}),
            compute_capability=_compute_capability(query_gpu.get(bus_id)),
            numa_node_id=numa.get(index),
        )
        gpus.append(_gpu(index, node, bus_id, extras))
    return Capture(
        source=path,
        driver_version=_version(_text(root, "driver_version")),
        cuda_version=_version(_text(root, "cuda_version")),
        gpus=tuple(gpus),
    )


def parse_capture(path: str | Path) -> Capture:
    """Parse a capture, by its suffix: ``.xml`` or ``.txt``."""
    path = Path(path)
    if path.suffix == ".xml":
        return parse_xml(path)
    if path.suffix == ".txt":
        return parse_txt(path)
    raise ValueError(f"{path}: not a .xml or .txt capture")


# ---------------------------------------------------------------------------- C device table


def _c_string(text: str | None) -> str:
    if text is None:
        return "NULL"
    chars = []
    for byte in text.encode():
        char = chr(byte)
        if char in '"\\':
            chars.append("\\" + char)
        elif 0x20 <= byte < 0x7F:
            chars.append(char)
        else:
            chars.append(f"\\{byte:03o}")
    return '"' + "".join(chars) + '"'


def _c_value(value: int | None) -> str:
    """A fake_value; bools are ints here (True -> 1)."""
    return "{0, 0}" if value is None else f"{{1, {int(value)}LL}}"


def _c_process(process: Process) -> str:
    memory = process.used_memory_bytes
    gpu_instance, compute_instance = process.gpu_instance_id, process.compute_instance_id
    values = [
        str(process.pid),
        "FAKE_VALUE_NOT_AVAILABLE" if memory is None else f"{memory}ULL",
        "FAKE_NO_INSTANCE" if gpu_instance is None else str(gpu_instance),
        "FAKE_NO_INSTANCE" if compute_instance is None else str(compute_instance),
        str(int("C" in process.type)),
        str(int("G" in process.type)),
    ]
    return "{" + ", ".join(values) + "}"


def _c_processes(
    array: str, processes: Sequence[Process] | None, arrays: list[str]
) -> list[tuple[str, str]]:
    """Device fields for a process list; appends its array definition to ``arrays``."""
    if processes is None:
        return [("processes_known", "0")]
    if processes:
        rows = "".join(f"    {_c_process(process)},\n" for process in processes)
        arrays.append(f"static const fake_process {array}[] = {{\n{rows}}};\n")
    return [
        ("processes_known", "1"),
        ("processes", array if processes else "NULL"),
        ("process_count", str(len(processes))),
    ]


def _c_memory(
    total: int | None, reserved: int | None, used: int | None, free: int | None
) -> list[tuple[str, str]]:
    return [
        ("memory_total", _c_value(total)),
        ("memory_reserved", _c_value(reserved)),
        ("memory_used", _c_value(used)),
        ("memory_free", _c_value(free)),
    ]


def _c_compute_capability(gpu: Gpu) -> list[tuple[str, str]]:
    major, minor = gpu.cuda_compute_capability or (None, None)
    return [("cuda_cc_major", _c_value(major)), ("cuda_cc_minor", _c_value(minor))]


def _c_gpu(gpu: Gpu, arrays: list[str]) -> list[tuple[str, str]]:
    def clocks(*values: int | None) -> str:
        return "{" + ", ".join(_c_value(value) for value in values) + "}"

    return [
        ("gpu_index", str(gpu.index)),
        ("name", _c_string(gpu.name)),
        ("uuid", _c_string(gpu.uuid)),
        ("serial", _c_string(gpu.serial)),
        ("vbios_version", _c_string(gpu.vbios_version)),
        ("pci_bus_id", _c_string(gpu.pci_bus_id)),
        ("pci_domain", f"{gpu.pci_domain:#x}"),
        ("pci_bus", f"{gpu.pci_bus:#x}"),
        ("pci_device", f"{gpu.pci_device:#x}"),
        ("pci_device_id", _c_value(gpu.pci_device_id)),
        ("pci_subsystem_id", _c_value(gpu.pci_subsystem_id)),
        ("minor_number", _c_value(gpu.minor_number)),
        *_c_memory(
            gpu.memory_total_bytes,
            gpu.memory_reserved_bytes,
            gpu.memory_used_bytes,
            gpu.memory_free_bytes,
        ),
        *_c_compute_capability(gpu),
        ("power_usage_mw", _c_value(gpu.power_usage_mw)),
        ("power_average_mw", _c_value(gpu.power_average_mw)),
        ("power_instant_mw", _c_value(gpu.power_instant_mw)),
        ("power_limit_mw", _c_value(gpu.power_limit_mw)),
        ("enforced_power_limit_mw", _c_value(gpu.enforced_power_limit_mw)),
        ("default_power_limit_mw", _c_value(gpu.default_power_limit_mw)),
        ("min_power_limit_mw", _c_value(gpu.min_power_limit_mw)),
        ("max_power_limit_mw", _c_value(gpu.max_power_limit_mw)),
        # Indexed by nvmlClockType_t: graphics, SM, memory, video.
        (
            "clock_mhz",
            clocks(
                gpu.clock_graphics_mhz, gpu.clock_sm_mhz, gpu.clock_memory_mhz, gpu.clock_video_mhz
            ),
        ),
        (
            "max_clock_mhz",
            clocks(
                gpu.max_clock_graphics_mhz,
                gpu.max_clock_sm_mhz,
                gpu.max_clock_memory_mhz,
                gpu.max_clock_video_mhz,
            ),
        ),
        ("pcie_link_gen_max", _c_value(gpu.pcie_link_gen_max)),
        ("pcie_link_gen_gpu_max", _c_value(gpu.pcie_link_gen_gpu_max)),
        ("pcie_link_gen_current", _c_value(gpu.pcie_link_gen_current)),
        ("pcie_link_width_max", _c_value(gpu.pcie_link_width_max)),
        ("pcie_link_width_current", _c_value(gpu.pcie_link_width_current)),
        ("pcie_replay_counter", _c_value(gpu.pcie_replay_counter)),
        ("ecc_mode_current", _c_value(gpu.ecc_mode_current)),
        ("ecc_mode_pending", _c_value(gpu.ecc_mode_pending)),
        # [nvmlMemoryErrorType_t][nvmlEccCounterType_t]
        (
            "ecc_errors",
            "{"
            + clocks(gpu.ecc_corrected_volatile, gpu.ecc_corrected_aggregate)
            + ", "
            + clocks(gpu.ecc_uncorrected_volatile, gpu.ecc_uncorrected_aggregate)
            + "}",
        ),
        ("mig_mode_current", _c_value(gpu.mig_mode_current)),
        ("mig_mode_pending", _c_value(gpu.mig_mode_pending)),
        ("numa_node_id", _c_value(gpu.numa_node_id)),
        ("performance_state", _c_value(gpu.performance_state)),
        ("utilization_gpu_pct", _c_value(gpu.utilization_gpu_pct)),
        ("utilization_memory_pct", _c_value(gpu.utilization_memory_pct)),
        ("utilization_encoder_pct", _c_value(gpu.utilization_encoder_pct)),
        ("utilization_decoder_pct", _c_value(gpu.utilization_decoder_pct)),
        ("temperature_gpu_c", _c_value(gpu.temperature_gpu_c)),
        ("temperature_memory_c", _c_value(gpu.temperature_memory_c)),
        ("fan_speed_pct", _c_value(gpu.fan_speed_pct)),
        ("clocks_event_reasons", _c_value(gpu.clocks_event_reasons)),
        *_c_processes(f"processes_{gpu.index}", gpu.processes, arrays),
    ]


def _c_mig(gpu: Gpu, mig: MigDevice, arrays: list[str]) -> list[tuple[str, str]]:
    processes = None
    if gpu.processes is not None:
        processes = [
            process
            for process in gpu.processes
            if (process.gpu_instance_id, process.compute_instance_id)
            == (mig.gpu_instance_id, mig.compute_instance_id)
        ]
    return [
        ("gpu_index", str(gpu.index)),
        ("is_mig", "1"),
        ("mig_index", str(mig.index)),
        ("gpu_instance_id", _c_value(mig.gpu_instance_id)),
        ("compute_instance_id", _c_value(mig.compute_instance_id)),
        ("name", _c_string(mig.name)),
        ("uuid", _c_string(mig.uuid)),
        *_c_memory(
            mig.memory_total_bytes,
            mig.memory_reserved_bytes,
            mig.memory_used_bytes,
            mig.memory_free_bytes,
        ),
        *_c_compute_capability(gpu),
        *_c_processes(f"processes_{gpu.index}_mig_{mig.index}", processes, arrays),
    ]


def generate_devices_c(capture: Capture) -> str:
    """The C source of the capture's device table (see fakenvml.h)."""
    if not capture.gpus:
        raise ValueError(f"{capture.source}: no GPUs in the capture")
    arrays: list[str] = []
    entries = [_c_gpu(gpu, arrays) for gpu in capture.gpus]
    entries += [_c_mig(gpu, mig, arrays) for gpu in capture.gpus for mig in gpu.mig_devices]
    table = "".join(
        "    {\n" + "".join(f"        .{name} = {value},\n" for name, value in fields) + "    },\n"
        for fields in entries
    )
    cuda = capture.cuda_driver_version
    return (
        f"/* Generated by build.py from {capture.source.name}; do not edit. */\n"
        '#include "fakenvml.h"\n\n'
        f"const char *const fake_driver_version = {_c_string(capture.driver_version)};\n"
        f"const char *const fake_nvml_version = {_c_string(capture.nvml_version)};\n"
        f"const fake_value fake_cuda_driver_version = {_c_value(cuda)};\n"
        f"const unsigned int fake_max_mig_devices = {MAX_MIG_DEVICES};\n"
        f"const unsigned long long fake_energy_base_mj = {ENERGY_BASE_MJ}ULL;\n"
        "const unsigned int fake_utilization_sampling_period_us = "
        f"{UTILIZATION_SAMPLING_PERIOD_US};\n\n"
        + "".join(f"{array}\n" for array in arrays)
        + "const struct nvmlDevice_st fake_devices[] = {\n"
        + table
        + "};\n"
        f"const unsigned int fake_device_count = {len(entries)};\n"
        f"const unsigned int fake_gpu_count = {len(capture.gpus)};\n"
    )


# ------------------------------------------------------------------------------------ build


def _exported_symbols(library: Path) -> set[str]:
    listing = subprocess.run(
        ["nm", "-D", "--defined-only", str(library)], check=True, capture_output=True, text=True
    ).stdout
    return {line.split()[-1] for line in listing.splitlines() if line.strip()}


def replicate(capture: Capture, count: int) -> Capture:
    """The capture with ``count`` copies of its first GPU, each with its own uuid and bus.

    For benchmarks of many GPUs: the captures hold at most two.
    """
    model = capture.gpus[0]
    gpus = tuple(
        dataclasses.replace(
            model,
            index=i,
            uuid=f"GPU-bench000-0000-0000-0000-{i:012d}",
            pci_bus=0x10 + i,
            pci_bus_id=f"00000000:{0x10 + i:02X}:00.0",
            minor_number=i,
        )
        for i in range(count)
    )
    return dataclasses.replace(capture, gpus=gpus)


def build_library(capture: Capture, out_dir: str | Path, omit: Iterable[str] = ()) -> Path:
    """Compile ``out_dir/libnvidia-ml.so.1`` serving ``capture``, without the ``omit`` symbols."""
    omitted = set(omit)
    if unknown := omitted - set(EXPORTED_SYMBOLS):
        raise ValueError(f"cannot omit {sorted(unknown)}: the fake does not implement them")
    exported = [symbol for symbol in EXPORTED_SYMBOLS if symbol not in omitted]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    library = out_dir / LIBRARY_NAME
    with tempfile.TemporaryDirectory(prefix="fakenvml-") as work:
        devices_c = Path(work, "devices.c")
        devices_c.write_text(generate_devices_c(capture), encoding="utf-8")
        # Only the listed functions are exported; an omitted one is hidden from dlsym().
        version_script = Path(work, "exports.map")
        exports = "".join(f"    {symbol};\n" for symbol in exported)
        version_script.write_text(f"{{\n  global:\n{exports}  local:\n    *;\n}};\n")
        command = [
            "gcc",
            "-O2",
            "-shared",
            "-fPIC",
            "-pthread",
            "-Wall",
            "-Wextra",
            "-Werror",
            f"-I{_HERE}",
            f"-Wl,--version-script={version_script}",
            "-o",
            str(library),
            str(_HERE / "fakenvml.c"),
            str(devices_c),
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise BuildError(f"gcc failed for {capture.source}:\n{result.stderr}")
    if (symbols := _exported_symbols(library)) != set(exported):
        missing = sorted(set(exported) - symbols)
        extra = sorted(symbols - set(exported))
        raise BuildError(f"{library} exports the wrong symbols: missing {missing}, extra {extra}")
    return library


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Build a fake libnvidia-ml.so.1 serving a recorded nvidia-smi capture."
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--xml", type=Path, help="nvidia-smi -q -x output")
    source.add_argument("--txt", type=Path, help="nvidia_gpu_exporter capture transcript")
    parser.add_argument("--out", type=Path, required=True, help="directory for the library")
    parser.add_argument(
        "--omit",
        action="append",
        default=[],
        metavar="SYMBOL",
        help="NVML function to leave out (repeatable)",
    )
    args = parser.parse_args(argv)
    try:
        capture = parse_xml(args.xml) if args.xml is not None else parse_txt(args.txt)
        library = build_library(capture, args.out, args.omit)
    except (BuildError, OSError, ValueError, ET.ParseError) as error:
        print(f"build.py: {error}", file=sys.stderr)
        return 1
    print(library)
    return 0


if __name__ == "__main__":
    sys.exit(main())
