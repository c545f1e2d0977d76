"""Typed hardware profile and telemetry.

Units are SI and named in the field: ``_bytes``, ``_hz``, ``_w`` (watts), ``_j`` (joules),
``_c`` (degrees Celsius), ``_pct`` (percent, 0-100). Every reading is a value,
:data:`UNSUPPORTED` (the device or driver cannot report it), or :class:`Unavailable` with a
stable reason code (it could not be read this time: permission, lost device, ...).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, TypeAlias, TypeVar

import msgspec

if TYPE_CHECKING:
    from typing_extensions import TypeIs

__all__ = [
    "UNSUPPORTED",
    "BackendReport",
    "CpuInfo",
    "DiskInfo",
    "GpuProcess",
    "GpuProfile",
    "GpuSample",
    "HealthEvent",
    "HostProfile",
    "HostSample",
    "NetInterface",
    "PowerLimitResult",
    "PowerLimitStatus",
    "Profile",
    "Reading",
    "RuntimeInfo",
    "Sample",
    "Unavailable",
    "Unsupported",
    "Vendor",
    "is_value",
    "value_or",
]

T = TypeVar("T")


class Unsupported(msgspec.Struct, frozen=True, tag_field="status", tag="unsupported"):
    """The device or its driver cannot report this reading."""


class Unavailable(msgspec.Struct, frozen=True, tag_field="status", tag="unavailable"):
    """The reading exists but could not be read now; ``reason`` is a stable code."""

    reason: str
    detail: str = ""


UNSUPPORTED = Unsupported()

Reading: TypeAlias = T | Unsupported | Unavailable
Vendor = Literal["nvidia", "amd", "intel"]
GpuKind = Literal["discrete", "integrated", "mig", "virtual"]
DeviceState = Literal["ok", "lost"]


def is_value(reading: Reading[T]) -> TypeIs[T]:
    """Tell whether a reading holds a value (not unsupported, not unavailable)."""
    return not isinstance(reading, Unsupported | Unavailable)


def value_or(reading: Reading[T], default: T) -> T:
    """The reading's value, or ``default`` when it holds none."""
    if isinstance(reading, Unsupported | Unavailable):
        return default
    return reading


class GpuProfile(msgspec.Struct, kw_only=True, omit_defaults=False):
    """Static facts about one GPU (or one MIG instance), read once at discovery."""

    id: str
    """Stable key: the uuid where the device has one, else ``pci:<bus id>``."""
    vendor: Vendor
    backend: str
    name: str
    kind: Reading[GpuKind]
    uuid: Reading[str]
    pci_bus_id: Reading[str]
    render_node: Reading[str] = UNSUPPORTED
    vram_total_bytes: Reading[int] = UNSUPPORTED
    gtt_total_bytes: Reading[int] = UNSUPPORTED
    driver_version: Reading[str] = UNSUPPORTED
    cuda_version: Reading[str] = UNSUPPORTED
    rocm_version: Reading[str] = UNSUPPORTED
    compute_capability: Reading[str] = UNSUPPORTED
    gfx_target: Reading[str] = UNSUPPORTED
    power_limit_w: Reading[float] = UNSUPPORTED
    power_limit_max_w: Reading[float] = UNSUPPORTED
    clock_graphics_max_hz: Reading[int] = UNSUPPORTED
    clock_memory_max_hz: Reading[int] = UNSUPPORTED
    pcie_gen_max: Reading[int] = UNSUPPORTED
    pcie_width_max: Reading[int] = UNSUPPORTED
    ecc_enabled: Reading[bool] = UNSUPPORTED
    mig_enabled: Reading[bool] = UNSUPPORTED
    numa_node: Reading[int] = UNSUPPORTED
    parent_uuid: str | None = None
    """For a MIG instance: the uuid of the physical GPU it belongs to."""


class GpuProcess(msgspec.Struct, frozen=True, kw_only=True):
    """A process holding a GPU context."""

    pid: int
    used_memory_bytes: Reading[int]
    kind: Literal["compute", "graphics"]


class GpuSample(msgspec.Struct, kw_only=True):
    """Fast-changing readings of one GPU at one instant."""

    id: str
    state: DeviceState = "ok"
    util_gpu_pct: Reading[float] = UNSUPPORTED
    util_memory_pct: Reading[float] = UNSUPPORTED
    util_encoder_pct: Reading[float] = UNSUPPORTED
    util_decoder_pct: Reading[float] = UNSUPPORTED
    memory_used_bytes: Reading[int] = UNSUPPORTED
    gtt_used_bytes: Reading[int] = UNSUPPORTED
    temperature_c: Reading[float] = UNSUPPORTED
    temperature_memory_c: Reading[float] = UNSUPPORTED
    temperature_hotspot_c: Reading[float] = UNSUPPORTED
    power_w: Reading[float] = UNSUPPORTED
    energy_j: Reading[float] = UNSUPPORTED
    clock_graphics_hz: Reading[int] = UNSUPPORTED
    clock_memory_hz: Reading[int] = UNSUPPORTED
    throttle_reasons: Reading[list[str]] = UNSUPPORTED
    fan_pct: Reading[float] = UNSUPPORTED
    ecc_corrected: Reading[int] = UNSUPPORTED
    ecc_uncorrected: Reading[int] = UNSUPPORTED
    pcie_replay_count: Reading[int] = UNSUPPORTED
    processes: Reading[list[GpuProcess]] = UNSUPPORTED


class HealthEvent(msgspec.Struct, frozen=True, kw_only=True):
    """A health event a GPU's driver reported, read once (NVML: an Xid critical error)."""

    gpu_id: str
    """The :attr:`GpuProfile.id` of the GPU or MIG instance it concerns."""
    kind: Literal["xid"]
    """``xid``: an Xid error; ``code`` is the Xid. New kinds are added here."""
    code: int
    at: float
    """When it was read, in seconds since the epoch."""
    detail: str = ""


PowerLimitStatus = Literal[
    "set", "unsupported", "permission_denied", "out_of_range", "unknown_gpu", "failed"
]


class PowerLimitResult(msgspec.Struct, frozen=True, kw_only=True):
    """What became of a request to set a GPU's power limit.

    ``status``: ``set`` (the driver took it), ``unsupported`` (the GPU, its driver or the
    backend cannot set one), ``permission_denied`` (it needs root), ``out_of_range`` (outside
    what the GPU allows; ``detail`` gives the range when known), ``unknown_gpu`` (no such
    id), ``failed`` (the GPU is lost, or the driver gave another error, in ``detail``).
    """

    gpu_id: str
    status: PowerLimitStatus
    limit_w: float | None
    """The limit the driver enforces, read back after setting; None when not set or unreadable."""
    detail: str = ""


class CpuInfo(msgspec.Struct, kw_only=True):
    """The host's processors."""

    model: Reading[str]
    architecture: str
    cores: Reading[int]
    threads: int
    freq_max_hz: Reading[int]


class DiskInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One mounted file system."""

    mountpoint: str
    device: str
    fstype: str
    total_bytes: int
    free_bytes: int


class NetInterface(msgspec.Struct, frozen=True, kw_only=True):
    """One network interface."""

    name: str
    up: bool
    speed_bps: Reading[int]
    mtu: int
    mac: str | None
    addresses: list[str]


class RuntimeInfo(msgspec.Struct, kw_only=True):
    """What the container runtime side of the host offers."""

    docker_reachable: Reading[bool]
    docker_version: Reading[str]
    docker_runtimes: Reading[list[str]]
    docker_cdi: Reading[bool]
    """Whether the engine resolves CDI device names (opt-in before Docker 28)."""
    nvidia_container_toolkit: Reading[str]
    """Path of ``nvidia-ctk`` or ``nvidia-container-runtime`` when installed."""
    cdi_specs: list[str]
    """CDI spec files naming NVIDIA devices (``/etc/cdi``, ``/var/run/cdi``)."""


class HostProfile(msgspec.Struct, kw_only=True):
    """Static facts about the host."""

    hostname: str
    os: str
    kernel: str
    cpu: CpuInfo
    memory_total_bytes: int
    swap_total_bytes: int
    disks: list[DiskInfo]
    interfaces: list[NetInterface]
    runtime: RuntimeInfo


class HostSample(msgspec.Struct, kw_only=True):
    """Fast-changing readings of the host."""

    cpu_pct: float
    load_1m: float
    memory_used_bytes: int
    memory_available_bytes: int
    net_rx_bytes: int
    net_tx_bytes: int
    disk_read_bytes: Reading[int]
    disk_write_bytes: Reading[int]


class BackendReport(msgspec.Struct, kw_only=True):
    """What one backend found, or the coded reason it found nothing."""

    name: str
    status: Literal["ok", "unavailable", "failed"]
    code: str | None = None
    detail: str = ""
    devices: int = 0
    versions: dict[str, str] = msgspec.field(default_factory=dict)


class Profile(msgspec.Struct, kw_only=True):
    """The whole machine: host, GPUs, and how each backend fared."""

    agent_version: str
    taken_at: float
    host: HostProfile
    gpus: list[GpuProfile]
    backends: list[BackendReport]


class Sample(msgspec.Struct, kw_only=True):
    """One telemetry tick: the host and every GPU."""

    taken_at: float
    host: HostSample
    gpus: list[GpuSample]
