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
from typing import Any, ClassVar

import msgspec
import pynvml

from hal.backend import Backend
from hal.backends import nvml_lib
from hal.backends.nvml_events import XidEvents
from hal.errors import BackendUnavailable, DeviceLost
from hal.sysfs import device_numa_node, render_node
from hal.types import (
    UNSUPPORTED,
    GpuProcess,
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

_MHZ = 1_000_000

# One batched call per tick; each entry: (field id, sample attribute, divisor to SI).
_FIELDS: tuple[tuple[int, str, int], ...] = (
    (pynvml.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION, "energy_j", 1000),  # mJ
    (pynvml.NVML_FI_DEV_POWER_INSTANT, "power_w", 1000),  # mW
    (pynvml.NVML_FI_DEV_MEMORY_TEMP, "temperature_memory_c", 1),
    (pynvml.NVML_FI_DEV_ECC_SBE_VOL_TOTAL, "ecc_corrected", 1),
    (pynvml.NVML_FI_DEV_ECC_DBE_VOL_TOTAL, "ecc_uncorrected", 1),
    (pynvml.NVML_FI_DEV_PCIE_REPLAY_COUNTER, "pcie_replay_count", 1),
)
_FIELD_IDS = [field_id for field_id, _, _ in _FIELDS]
_INT_ATTRS = frozenset({"ecc_corrected", "ecc_uncorrected", "pcie_replay_count"})

_THROTTLE_REASONS = (
    (pynvml.nvmlClocksEventReasonGpuIdle, "gpu_idle"),
    (pynvml.nvmlClocksEventReasonApplicationsClocksSetting, "applications_clocks_setting"),
    (pynvml.nvmlClocksEventReasonSwPowerCap, "sw_power_cap"),
    (pynvml.nvmlClocksEventReasonHwSlowdown, "hw_slowdown"),
    (pynvml.nvmlClocksEventReasonSyncBoost, "sync_boost"),
    (pynvml.nvmlClocksEventReasonSwThermalSlowdown, "sw_thermal_slowdown"),
    (pynvml.nvmlClocksEventReasonHwThermalSlowdown, "hw_thermal_slowdown"),
    (pynvml.nvmlClocksEventReasonHwPowerBrakeSlowdown, "hw_power_brake_slowdown"),
    (pynvml.nvmlClocksEventReasonDisplayClockSetting, "display_clock_setting"),
)

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
    handle: Any
    is_mig: bool
    relocate: Callable[[], Any]
    """Finds the device's handle again after it was lost (by uuid, else by bus id)."""
    unsupported: set[str] = msgspec.field(default_factory=set)
    lost_at: float | None = None
    retry_at: float = 0.0
    backoff_s: float = _BACKOFF_FIRST_S


class NvidiaBackend(Backend):
    """Profiles and samples NVIDIA GPUs through NVML."""

    name: ClassVar[str] = "nvml"

    _devices: list[_Device]
    _versions: dict[str, str]
    _xids: XidEvents

    def open(self) -> list[GpuProfile]:
        """Initialise NVML and profile every GPU and MIG instance."""
        nvml_lib.init(self.config.nvml_library)
        try:
            count = pynvml.nvmlDeviceGetCount()
            driver = nvml_lib.reading(pynvml.nvmlSystemGetDriverVersion)
            cuda = nvml_lib.reading(pynvml.nvmlSystemGetCudaDriverVersion_v2)
            cuda_version = _cuda_version(cuda)
            self._versions = {"driver": str(driver), "cuda": str(cuda_version)}
            nvml_version = nvml_lib.reading(pynvml.nvmlSystemGetNVMLVersion)
            if isinstance(nvml_version, str):
                self._versions["nvml"] = nvml_version
        except pynvml.NVMLError as exc:
            pynvml.nvmlShutdown()
            raise nvml_lib.backend_error(exc) from exc
        if count == 0:
            pynvml.nvmlShutdown()
            raise BackendUnavailable("no_devices", "NVML found no NVIDIA GPU")
        self._devices = []
        profiles: list[GpuProfile] = []
        for index in range(count):
            # One GPU that cannot be read must not hide the others: it is reported with
            # the reason, and (when lost) looked for again like any lost GPU.
            try:
                profiles += self._open_device(index, driver, cuda_version)
            except (pynvml.NVMLError, DeviceLost) as exc:
                reason = "gpu_lost" if _is_lost(exc) else "nvml_error"
                profile = _unreadable_profile(index, Unavailable(reason, str(exc)), driver)
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
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        profile = self._profile(index, handle, driver, cuda)
        profiles = [profile]
        devices = [_Device(profile.id, handle, False, _relocator(profile, index))]
        if profile.mig_enabled is True:
            for mig_handle in _mig_handles(handle):
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
        if device.lost_at is not None:
            return _refused(gpu_id, "failed", "NVML: GPU is lost")
        try:
            low, high = pynvml.nvmlDeviceGetPowerManagementLimitConstraints(device.handle)
            if not low / 1000 <= watts <= high / 1000:  # NaN fails this too
                detail = f"{watts:g} W is outside this GPU's {low / 1000:g}-{high / 1000:g} W"
                return _refused(gpu_id, "out_of_range", detail)
            pynvml.nvmlDeviceSetPowerManagementLimit(device.handle, round(watts * 1000))
        except pynvml.NVMLError as exc:
            if _is_lost(exc):
                device.lost_at = 0.0  # the sampler looks for it again at its next tick
            return _power_limit_error(gpu_id, exc, watts)
        limit_w: float | None
        try:
            limit_w = pynvml.nvmlDeviceGetEnforcedPowerLimit(device.handle) / 1000
        except pynvml.NVMLError:
            limit_w = None  # set all the same; only reading it back failed
        return PowerLimitResult(gpu_id=gpu_id, status="set", limit_w=limit_w)

    def close(self) -> None:
        """Free the event set and shut NVML down."""
        self._xids.close()
        pynvml.nvmlShutdown()

    def _profile(
        self, index: int, handle: Any, driver: Reading[str], cuda: Reading[str]
    ) -> GpuProfile:
        read = nvml_lib.reading
        uuid = read(pynvml.nvmlDeviceGetUUID, handle)
        pci = read(pynvml.nvmlDeviceGetPciInfo, handle)
        bus_id: Reading[str] = pci if not is_value(pci) else normalise_bus_id(pci.busId)
        numa = read(pynvml.nvmlDeviceGetNumaNodeId, handle)
        render: Reading[str] = UNSUPPORTED
        if isinstance(bus_id, str):
            # nvidia-drm registers a render node like any DRM driver; NVML does not name it.
            device_dir = self.config.sysfs_root / "bus" / "pci" / "devices" / bus_id
            render = render_node(device_dir, self.config.dev_root)
            if not is_value(numa):
                numa = device_numa_node(device_dir)
        constraints = read(pynvml.nvmlDeviceGetPowerManagementLimitConstraints, handle)
        ecc = read(pynvml.nvmlDeviceGetEccMode, handle)
        mig = read(pynvml.nvmlDeviceGetMigMode, handle)
        return GpuProfile(
            id=_device_id(uuid, bus_id, index),
            vendor="nvidia",
            backend=self.name,
            name=str(pynvml.nvmlDeviceGetName(handle)),
            kind="discrete",
            uuid=uuid,
            pci_bus_id=bus_id,
            render_node=render,
            vram_total_bytes=_map(read(pynvml.nvmlDeviceGetMemoryInfo, handle), _total),
            driver_version=driver,
            cuda_version=cuda,
            compute_capability=_map(
                read(pynvml.nvmlDeviceGetCudaComputeCapability, handle), _capability
            ),
            power_limit_w=_map(read(pynvml.nvmlDeviceGetEnforcedPowerLimit, handle), _watts),
            power_limit_max_w=_map(constraints, lambda c: c[1] / 1000),
            clock_graphics_max_hz=_map(
                read(pynvml.nvmlDeviceGetMaxClockInfo, handle, pynvml.NVML_CLOCK_GRAPHICS), _hz
            ),
            clock_memory_max_hz=_map(
                read(pynvml.nvmlDeviceGetMaxClockInfo, handle, pynvml.NVML_CLOCK_MEM), _hz
            ),
            pcie_gen_max=read(pynvml.nvmlDeviceGetMaxPcieLinkGeneration, handle),
            pcie_width_max=read(pynvml.nvmlDeviceGetMaxPcieLinkWidth, handle),
            ecc_enabled=_map(ecc, lambda modes: bool(modes[0])),
            mig_enabled=_map(mig, lambda modes: modes[0] == pynvml.NVML_DEVICE_MIG_ENABLE),
            numa_node=numa,
        )

    def _mig_profile(self, handle: Any, parent: GpuProfile) -> GpuProfile:
        read = nvml_lib.reading
        uuid = read(pynvml.nvmlDeviceGetUUID, handle)
        gpu_instance = read(pynvml.nvmlDeviceGetGpuInstanceId, handle)
        compute_instance = read(pynvml.nvmlDeviceGetComputeInstanceId, handle)
        return msgspec.structs.replace(
            parent,
            id=uuid if isinstance(uuid, str) else f"{parent.id}/{gpu_instance}/{compute_instance}",
            name=str(pynvml.nvmlDeviceGetName(handle)),
            kind="mig",
            uuid=uuid,
            vram_total_bytes=_map(read(pynvml.nvmlDeviceGetMemoryInfo, handle), _total),
            mig_enabled=UNSUPPORTED,
            parent_uuid=parent.id,
        )

    def sample(self, now: float) -> list[GpuSample]:
        """Read every device; a lost one is reported lost and looked for with backoff."""
        samples: list[GpuSample] = []
        for device in self._devices:
            if device.lost_at is not None and not self._recover(device, now):
                samples.append(_lost_sample(device.id))
                continue
            try:
                samples.append(self._sample_device(device))
            except DeviceLost as exc:
                device.lost_at = now
                device.retry_at = now + device.backoff_s
                samples.append(_lost_sample(device.id, exc.detail))
        return samples

    def _recover(self, device: _Device, now: float) -> bool:
        if now < device.retry_at:
            return False
        try:
            handle = device.relocate()
            pynvml.nvmlDeviceGetMemoryInfo(handle)
        except pynvml.NVMLError:
            device.backoff_s = min(device.backoff_s * 2, _BACKOFF_MAX_S)
            device.retry_at = now + device.backoff_s
            return False
        device.handle = handle
        if not device.is_mig:  # a GPU unreadable at open was never registered for events
            self._xids.watch(device.id, handle)
        device.lost_at = None
        device.backoff_s = _BACKOFF_FIRST_S
        return True

    def _sample_device(self, device: _Device) -> GpuSample:
        handle = device.handle
        sample = GpuSample(id=device.id)
        self._read_into(sample, device, "memory_used_bytes", pynvml.nvmlDeviceGetMemoryInfo, _used)
        self._read_into(sample, device, "processes", _processes, lambda p: p)
        if device.is_mig:
            return sample
        util = self._read(device, "util", pynvml.nvmlDeviceGetUtilizationRates, handle)
        sample.util_gpu_pct = _map(util, lambda u: float(u.gpu))
        sample.util_memory_pct = _map(util, lambda u: float(u.memory))
        self._read_into(
            sample, device, "util_encoder_pct", pynvml.nvmlDeviceGetEncoderUtilization, _first
        )
        self._read_into(
            sample, device, "util_decoder_pct", pynvml.nvmlDeviceGetDecoderUtilization, _first
        )
        self._read_into(sample, device, "temperature_c", _gpu_temperature, float)
        self._read_into(sample, device, "clock_graphics_hz", _graphics_clock, _hz)
        self._read_into(sample, device, "clock_memory_hz", _memory_clock, _hz)
        self._read_into(
            sample,
            device,
            "throttle_reasons",
            pynvml.nvmlDeviceGetCurrentClocksEventReasons,
            _reasons,
        )
        self._read_into(sample, device, "fan_pct", pynvml.nvmlDeviceGetFanSpeed, float)
        self._read_fields(sample, device)
        return sample

    def _read_fields(self, sample: GpuSample, device: _Device) -> None:
        values = self._read(
            device, "fields", pynvml.nvmlDeviceGetFieldValues, device.handle, _FIELD_IDS
        )
        if not is_value(values):
            self._read_fields_one_by_one(sample, device)
            return
        for (_, attr, divisor), value in zip(_FIELDS, values, strict=True):
            if value.nvmlReturn == pynvml.NVML_SUCCESS:
                number = _field_number(value) / divisor
                setattr(sample, attr, int(number) if attr in _INT_ATTRS else number)
            elif value.nvmlReturn == pynvml.NVML_ERROR_GPU_IS_LOST:
                raise DeviceLost("NVML: GPU is lost")
            else:
                setattr(sample, attr, nvml_lib.error_reading(pynvml.NVMLError(value.nvmlReturn)))
        if not is_value(sample.power_w):
            # Older drivers lack the instant-power field; nvmlDeviceGetPowerUsage is older.
            self._read_into(sample, device, "power_w", pynvml.nvmlDeviceGetPowerUsage, _watts)

    def _read_fields_one_by_one(self, sample: GpuSample, device: _Device) -> None:
        """What the batched call gives, for drivers without ``nvmlDeviceGetFieldValues``."""
        self._read_into(
            sample,
            device,
            "energy_j",
            pynvml.nvmlDeviceGetTotalEnergyConsumption,
            lambda mj: mj / 1000,
        )
        self._read_into(sample, device, "power_w", pynvml.nvmlDeviceGetPowerUsage, _watts)
        self._read_into(sample, device, "ecc_corrected", _ecc_corrected, int)
        self._read_into(sample, device, "ecc_uncorrected", _ecc_uncorrected, int)
        self._read_into(
            sample, device, "pcie_replay_count", pynvml.nvmlDeviceGetPcieReplayCounter, int
        )

    def _read(self, device: _Device, key: str, fn: Callable[..., Any], *args: Any) -> Reading[Any]:
        """One NVML call, skipped for good once the device said it does not support it."""
        if key in device.unsupported:
            return UNSUPPORTED
        try:
            return fn(*args)
        except pynvml.NVMLError as exc:
            result = nvml_lib.error_reading(exc)
            if result is UNSUPPORTED:
                device.unsupported.add(key)
            return result

    def _read_into(
        self,
        sample: GpuSample,
        device: _Device,
        attr: str,
        fn: Callable[[Any], Any],
        convert: Callable[[Any], Any],
    ) -> None:
        setattr(sample, attr, _map(self._read(device, attr, fn, device.handle), convert))


def _mig_handles(handle: Any) -> list[Any]:
    handles = []
    for index in range(pynvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
        mig = nvml_lib.reading(pynvml.nvmlDeviceGetMigDeviceHandleByIndex, handle, index)
        if is_value(mig):  # empty slots answer NOT_FOUND
            handles.append(mig)
    return handles


def _is_lost(exc: Exception) -> bool:
    if isinstance(exc, DeviceLost):
        return True
    return isinstance(exc, pynvml.NVMLError) and exc.value == pynvml.NVML_ERROR_GPU_IS_LOST


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


def _relocator(profile: GpuProfile, index: int | None) -> Callable[[], Any]:
    uuid, bus_id = profile.uuid, profile.pci_bus_id
    if isinstance(uuid, str):
        return partial(pynvml.nvmlDeviceGetHandleByUUID, uuid)
    if index is None:  # a MIG instance without a uuid cannot be told from its siblings
        return partial(_raise, pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND))
    if isinstance(bus_id, str):
        return partial(pynvml.nvmlDeviceGetHandleByPciBusId, bus_id)
    return partial(pynvml.nvmlDeviceGetHandleByIndex, index)


def _refused(gpu_id: str, status: PowerLimitStatus, detail: str) -> PowerLimitResult:
    return PowerLimitResult(gpu_id=gpu_id, status=status, limit_w=None, detail=detail)


def _power_limit_error(gpu_id: str, exc: pynvml.NVMLError, watts: float) -> PowerLimitResult:
    code = exc.value
    if code == pynvml.NVML_ERROR_NO_PERMISSION:
        return _refused(gpu_id, "permission_denied", f"NVML: {exc}; setting a limit needs root")
    if code in (pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND):
        return _refused(gpu_id, "unsupported", f"NVML: {exc}")
    if code == pynvml.NVML_ERROR_INVALID_ARGUMENT:  # how the driver refuses a limit
        return _refused(gpu_id, "out_of_range", f"NVML refused {watts:g} W: {exc}")
    return _refused(gpu_id, "failed", f"NVML: {exc}")


def _raise(exc: Exception) -> Any:
    raise exc


def _device_id(uuid: Reading[str], bus_id: Reading[str], index: int) -> str:
    if isinstance(uuid, str):
        return uuid
    return f"pci:{bus_id}" if isinstance(bus_id, str) else f"nvml:{index}"


def _lost_sample(device_id: str, detail: str = "") -> GpuSample:
    lost = Unavailable("gpu_lost", detail)
    return GpuSample(id=device_id, state="lost", **dict.fromkeys(_READING_FIELDS, lost))


def _map(value: Reading[Any], convert: Callable[[Any], Any]) -> Reading[Any]:
    return convert(value) if is_value(value) else value


def _cuda_version(value: Reading[int]) -> Reading[str]:
    return _map(value, lambda v: f"{v // 1000}.{v % 1000 // 10}")


def _capability(value: tuple[int, int]) -> str:
    return f"{value[0]}.{value[1]}"


def _total(memory: Any) -> int:
    return int(memory.total)


def _used(memory: Any) -> int:
    return int(memory.used)


def _watts(milliwatts: int) -> float:
    return milliwatts / 1000


def _hz(mhz: int) -> int:
    return int(mhz) * _MHZ


def _first(pair: Any) -> float:
    return float(pair[0])


def _reasons(mask: int) -> list[str]:
    return [name for bit, name in _THROTTLE_REASONS if mask & bit]


def _gpu_temperature(handle: Any) -> int:
    return int(pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU))


def _graphics_clock(handle: Any) -> int:
    return int(pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_GRAPHICS))


def _memory_clock(handle: Any) -> int:
    return int(pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM))


def _ecc_corrected(handle: Any) -> int:
    return int(
        pynvml.nvmlDeviceGetTotalEccErrors(
            handle, pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, pynvml.NVML_VOLATILE_ECC
        )
    )


def _ecc_uncorrected(handle: Any) -> int:
    return int(
        pynvml.nvmlDeviceGetTotalEccErrors(
            handle, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC
        )
    )


def _processes(handle: Any) -> list[GpuProcess]:
    processes = [
        _process(p, "compute") for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
    ]
    processes += [
        _process(p, "graphics") for p in pynvml.nvmlDeviceGetGraphicsRunningProcesses(handle)
    ]
    return processes


def _process(info: Any, kind: Any) -> GpuProcess:
    used = info.usedGpuMemory
    return GpuProcess(
        pid=int(info.pid),
        used_memory_bytes=UNSUPPORTED if used is None else int(used),
        kind=kind,
    )


def _field_number(value: Any) -> float:
    kind = value.valueType
    union = value.value
    if kind == pynvml.NVML_VALUE_TYPE_DOUBLE:
        return float(union.dVal)
    if kind == pynvml.NVML_VALUE_TYPE_UNSIGNED_INT:
        return float(union.uiVal)
    if kind == pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG:
        return float(union.ulVal)
    if kind == pynvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG:
        return float(union.sllVal)
    if kind == pynvml.NVML_VALUE_TYPE_SIGNED_INT:
        return float(union.siVal)
    if kind == pynvml.NVML_VALUE_TYPE_UNSIGNED_SHORT:
        return float(union.usVal)
    return float(union.ullVal)
