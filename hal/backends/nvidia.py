"""NVIDIA GPUs (and their MIG instances) through NVML.

NVML is initialised once; handles and static facts are read once at :meth:`open` and
cached; each tick reads the fast-changing values, batching what it can into one
``nvmlDeviceGetFieldValues`` call. A reading NVML says is not supported is not asked for
again. A GPU that falls off the bus is reported ``lost`` and looked for again with backoff.
Xid critical errors come from an NVML event set (:mod:`hal.backends.nvml_events`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import ClassVar, ParamSpec, TypeVar

import msgspec

from hal.backend import Backend
from hal.backends import nvml
from hal.backends.nvml_events import XidEvents
from hal.errors import BackendUnavailable, CallFailed, DeviceLost
from hal.sysfs import device_numa_node, render_node
from hal.types import (
    UNSUPPORTED,
    GpuProfile,
    GpuSample,
    HealthEvent,
    PowerLimitResult,
    PowerLimitStatus,
    Reading,
    Unavailable,
    is_value,
)

__all__ = ["NvidiaBackend", "normalise_bus_id"]

P = ParamSpec("P")
T = TypeVar("T")
U = TypeVar("U")

# Read in one batched call each tick.
_FIELDS: tuple[nvml.Field, ...] = (
    "energy_j",
    "power_w",
    "temperature_memory_c",
    "ecc_corrected",
    "ecc_uncorrected",
    "pcie_replay_count",
)
_INT_FIELDS = frozenset({"ecc_corrected", "ecc_uncorrected", "pcie_replay_count"})

_BACKOFF_FIRST_S = 1.0
_BACKOFF_MAX_S = 60.0

# The names alone: msgspec.structs.fields() would also resolve every field's type hints.
_READING_FIELDS = tuple(name for name in GpuSample.__struct_fields__ if name not in ("id", "state"))


def normalise_bus_id(nvml_bus_id: str) -> str:
    """NVML's ``00000000:01:00.0`` as the kernel writes it: ``0000:01:00.0``."""
    domain, rest = nvml_bus_id.lower().split(":", 1)
    return f"{int(domain, 16):04x}:{rest}"


class _Device(msgspec.Struct):
    """A GPU or MIG instance as opened: its handle, and what it was found not to support."""

    id: str
    handle: nvml.Handle | None
    """None for a GPU unreadable at open, until it is found again."""
    is_mig: bool
    relocate: Callable[[], nvml.Handle]
    """Finds the device's handle again after it was lost (by uuid, else by bus id)."""
    unsupported: set[str] = msgspec.field(default_factory=set)
    lost_at: float | None = None
    retry_at: float = 0.0
    backoff_s: float = _BACKOFF_FIRST_S

    def read(self, key: str, call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> Reading[T]:
        """One NVML query, skipped for good once the device said it does not support it."""
        if key in self.unsupported:
            return UNSUPPORTED
        result = nvml.reading(call, *args, **kwargs)
        if result is UNSUPPORTED:
            self.unsupported.add(key)
        return result


class NvidiaBackend(Backend):
    """Profiles and samples NVIDIA GPUs through NVML."""

    name: ClassVar[str] = "nvml"

    _devices: list[_Device]
    _versions: dict[str, str]
    _xids: XidEvents

    def open(self) -> list[GpuProfile]:
        """Initialise NVML and profile every GPU and MIG instance."""
        nvml.init(self.config.nvml_library)
        try:
            count = nvml.device_count()
        except BackendUnavailable:
            nvml.shutdown()
            raise
        driver = nvml.reading(nvml.driver_version)
        cuda = nvml.reading(nvml.cuda_version)
        self._versions = {"driver": str(driver), "cuda": str(cuda)}
        nvml_version = nvml.reading(nvml.nvml_version)
        if isinstance(nvml_version, str):
            self._versions["nvml"] = nvml_version
        if count == 0:
            nvml.shutdown()
            raise BackendUnavailable("no_devices", "NVML found no NVIDIA GPU")
        self._devices = []
        profiles: list[GpuProfile] = []
        for index in range(count):
            # One GPU that cannot be read must not hide the others: it is reported with
            # the reason, and (when lost) looked for again like any lost GPU.
            try:
                profiles += self._open_device(index, driver, cuda)
            except (CallFailed, DeviceLost) as exc:
                reason = "gpu_lost" if isinstance(exc, DeviceLost) else "nvml_error"
                profile = _unreadable_profile(index, Unavailable(reason, exc.detail), driver)
                profiles.append(profile)
                device = _Device(profile.id, None, False, _relocator(profile, index))
                device.lost_at = 0.0
                self._devices.append(device)
        self._xids = XidEvents()
        self._xids.open((d.id, d.handle, d.is_mig) for d in self._devices)
        return profiles

    def _open_device(
        self, index: int, driver: Reading[str], cuda: Reading[str]
    ) -> list[GpuProfile]:
        handle = nvml.handle_by_index(index)
        profile = self._profile(index, handle, driver, cuda)
        profiles = [profile]
        devices = [_Device(profile.id, handle, False, _relocator(profile, index))]
        if profile.mig_enabled is True:
            for mig_handle in handle.mig_handles():
                mig = self._mig_profile(mig_handle, profile)
                profiles.append(mig)
                devices.append(_Device(mig.id, mig_handle, True, _relocator(mig, None)))
        self._devices += devices
        return profiles

    def versions(self) -> dict[str, str]:
        """Driver, CUDA and NVML versions."""
        return dict(self._versions)

    def events(self) -> list[HealthEvent]:
        """The Xid critical errors reported since the last call; never blocks."""
        return self._xids.drain()

    def set_power_limit(self, gpu_id: str, watts: float) -> PowerLimitResult:
        """Set a GPU's power management limit (root only) and read back the one enforced.

        A MIG instance has no limit of its own: it shares its GPU's.
        """
        device = next((d for d in self._devices if d.id == gpu_id), None)
        if device is None:
            return _refused(gpu_id, "unknown_gpu", f"NVML opened no GPU {gpu_id!r}")
        if device.is_mig:
            return _refused(gpu_id, "unsupported", "a MIG instance shares its GPU's power limit")
        if device.lost_at is not None or device.handle is None:
            return _refused(gpu_id, "failed", "NVML: GPU is lost")
        handle = device.handle
        try:
            low, high = handle.power_limit_range_w()
            if not low <= watts <= high:  # NaN fails this too
                detail = f"{watts:g} W is outside this GPU's {low:g}-{high:g} W"
                return _refused(gpu_id, "out_of_range", detail)
            handle.set_power_limit_w(watts)
        except DeviceLost as exc:
            device.lost_at = 0.0  # the sampler looks for it again at its next tick
            return _refused(gpu_id, "failed", f"NVML: {exc.detail}")
        except CallFailed as exc:
            return _power_limit_error(gpu_id, exc, watts)
        limit_w: float | None
        try:
            limit_w = handle.power_limit_w()
        except (CallFailed, DeviceLost):
            limit_w = None  # set all the same; only reading it back failed
        return PowerLimitResult(gpu_id=gpu_id, status="set", limit_w=limit_w)

    def close(self) -> None:
        """Free the event set and shut NVML down."""
        self._xids.close()
        nvml.shutdown()

    def _profile(
        self, index: int, handle: nvml.Handle, driver: Reading[str], cuda: Reading[str]
    ) -> GpuProfile:
        read = nvml.reading
        uuid = read(handle.uuid)
        bus_id = _map(read(handle.pci_bus_id), normalise_bus_id)
        numa = read(handle.numa_node)
        render: Reading[str] = UNSUPPORTED
        if isinstance(bus_id, str):
            # nvidia-drm registers a render node like any DRM driver; NVML does not name it.
            device_dir = self.config.sysfs_root / "bus" / "pci" / "devices" / bus_id
            render = render_node(device_dir, self.config.dev_root)
            if not is_value(numa):
                numa = device_numa_node(device_dir)
        limits = read(handle.power_limit_range_w)
        ecc = read(handle.ecc_enabled)
        mig = read(handle.mig_enabled)
        return GpuProfile(
            id=_device_id(uuid, bus_id, index),
            vendor="nvidia",
            backend=self.name,
            name=handle.name(),
            kind="discrete",
            uuid=uuid,
            pci_bus_id=bus_id,
            render_node=render,
            vram_total_bytes=read(handle.memory_total_bytes),
            driver_version=driver,
            cuda_version=cuda,
            compute_capability=read(handle.compute_capability),
            power_limit_w=read(handle.power_limit_w),
            power_limit_max_w=_map(limits, lambda low_high: low_high[1]),
            clock_graphics_max_hz=read(handle.max_clock_hz, "graphics"),
            clock_memory_max_hz=read(handle.max_clock_hz, "memory"),
            pcie_gen_max=read(handle.max_pcie_generation),
            pcie_width_max=read(handle.max_pcie_width),
            ecc_enabled=ecc,
            mig_enabled=mig,
            numa_node=numa,
        )

    def _mig_profile(self, handle: nvml.Handle, parent: GpuProfile) -> GpuProfile:
        read = nvml.reading
        uuid = read(handle.uuid)
        gpu_instance = read(handle.gpu_instance_id)
        compute_instance = read(handle.compute_instance_id)
        return msgspec.structs.replace(
            parent,
            id=uuid if isinstance(uuid, str) else f"{parent.id}/{gpu_instance}/{compute_instance}",
            name=handle.name(),
            kind="mig",
            uuid=uuid,
            vram_total_bytes=read(handle.memory_total_bytes),
            mig_enabled=UNSUPPORTED,
            parent_uuid=parent.id,
        )

    def sample(self, now: float) -> list[GpuSample]:
        """Read every device; a lost one is reported lost and looked for with backoff."""
        samples: list[GpuSample] = []
        for device in self._devices:
            handle = device.handle if device.lost_at is None else self._recover(device, now)
            if handle is None:
                samples.append(_lost_sample(device.id))
                continue
            try:
                samples.append(self._sample_device(device, handle))
            except DeviceLost as exc:
                device.lost_at = now
                device.retry_at = now + device.backoff_s
                samples.append(_lost_sample(device.id, exc.detail))
        return samples

    def _recover(self, device: _Device, now: float) -> nvml.Handle | None:
        """The device's handle if it answers again, else None and the next retry later."""
        if now < device.retry_at:
            return None
        try:
            handle = device.relocate()
            handle.memory_used_bytes()  # found is not enough: it must answer
        except (CallFailed, DeviceLost):
            device.backoff_s = min(device.backoff_s * 2, _BACKOFF_MAX_S)
            device.retry_at = now + device.backoff_s
            return None
        device.handle = handle
        if not device.is_mig:  # a GPU unreadable at open was never registered for events
            self._xids.watch(device.id, handle)
        device.lost_at = None
        device.backoff_s = _BACKOFF_FIRST_S
        return handle

    def _sample_device(self, device: _Device, handle: nvml.Handle) -> GpuSample:
        read = device.read
        sample = GpuSample(id=device.id)
        sample.memory_used_bytes = read("memory_used_bytes", handle.memory_used_bytes)
        sample.processes = read("processes", handle.processes)
        if device.is_mig:
            return sample
        util = read("util", handle.utilization_pct)
        sample.util_gpu_pct = _map(util, lambda gpu_memory: gpu_memory[0])
        sample.util_memory_pct = _map(util, lambda gpu_memory: gpu_memory[1])
        sample.util_encoder_pct = read("util_encoder_pct", handle.encoder_utilization_pct)
        sample.util_decoder_pct = read("util_decoder_pct", handle.decoder_utilization_pct)
        sample.temperature_c = read("temperature_c", handle.temperature_c)
        sample.clock_graphics_hz = read("clock_graphics_hz", handle.clock_hz, "graphics")
        sample.clock_memory_hz = read("clock_memory_hz", handle.clock_hz, "memory")
        sample.throttle_reasons = read("throttle_reasons", handle.throttle_reasons)
        sample.fan_pct = read("fan_pct", handle.fan_pct)
        self._read_fields(sample, device, handle)
        return sample

    def _read_fields(self, sample: GpuSample, device: _Device, handle: nvml.Handle) -> None:
        values = device.read("fields", handle.field_values, _FIELDS)
        if not is_value(values):
            self._read_fields_one_by_one(sample, device, handle)
            return
        for field, value in zip(_FIELDS, values, strict=True):
            number = int(value) if field in _INT_FIELDS and is_value(value) else value
            setattr(sample, field, number)
        if not is_value(sample.power_w):
            # Older drivers lack the instant-power field; nvmlDeviceGetPowerUsage is older.
            sample.power_w = device.read("power_w", handle.power_w)

    def _read_fields_one_by_one(
        self, sample: GpuSample, device: _Device, handle: nvml.Handle
    ) -> None:
        """What the batched call gives, for drivers without ``nvmlDeviceGetFieldValues``."""
        read = device.read
        sample.energy_j = read("energy_j", handle.energy_j)
        sample.power_w = read("power_w", handle.power_w)
        sample.ecc_corrected = read("ecc_corrected", handle.ecc_errors, "corrected")
        sample.ecc_uncorrected = read("ecc_uncorrected", handle.ecc_errors, "uncorrected")
        sample.pcie_replay_count = read("pcie_replay_count", handle.pcie_replay_count)


def _unreadable_profile(index: int, why: Unavailable, driver: Reading[str]) -> GpuProfile:
    """A GPU NVML counts but cannot read: there, with the reason, not silently gone."""
    return GpuProfile(
        id=f"nvml:{index}",
        vendor="nvidia",
        backend=NvidiaBackend.name,
        name=f"NVIDIA GPU {index}",
        kind=why,
        uuid=why,
        pci_bus_id=why,
        driver_version=driver,
    )


def _relocator(profile: GpuProfile, index: int | None) -> Callable[[], nvml.Handle]:
    uuid, bus_id = profile.uuid, profile.pci_bus_id
    if isinstance(uuid, str):
        return partial(nvml.handle_by_uuid, uuid)
    if index is None:
        return _not_found
    if isinstance(bus_id, str):
        return partial(nvml.handle_by_bus_id, bus_id)
    return partial(nvml.handle_by_index, index)


def _not_found() -> nvml.Handle:
    raise CallFailed("not_found", "a MIG instance without a uuid cannot be told from its siblings")


def _refused(gpu_id: str, status: PowerLimitStatus, detail: str) -> PowerLimitResult:
    return PowerLimitResult(gpu_id=gpu_id, status=status, limit_w=None, detail=detail)


def _power_limit_error(gpu_id: str, failed: CallFailed, watts: float) -> PowerLimitResult:
    if failed.code == "permission_denied":
        detail = f"NVML: {failed.detail}; setting a limit needs root"
        return _refused(gpu_id, "permission_denied", detail)
    if failed.code == "unsupported":
        return _refused(gpu_id, "unsupported", f"NVML: {failed.detail}")
    if failed.code == "invalid_argument":  # how the driver refuses a limit
        return _refused(gpu_id, "out_of_range", f"NVML refused {watts:g} W: {failed.detail}")
    return _refused(gpu_id, "failed", f"NVML: {failed.detail}")


def _device_id(uuid: Reading[str], bus_id: Reading[str], index: int) -> str:
    if isinstance(uuid, str):
        return uuid
    return f"pci:{bus_id}" if isinstance(bus_id, str) else f"nvml:{index}"


def _lost_sample(device_id: str, detail: str = "") -> GpuSample:
    lost = Unavailable("gpu_lost", detail)
    return GpuSample(id=device_id, state="lost", **dict.fromkeys(_READING_FIELDS, lost))


def _map(value: Reading[T], convert: Callable[[T], U]) -> Reading[U]:
    return convert(value) if is_value(value) else value
