"""The boundary to NVML: the one module that imports and calls ``pynvml``.

``pynvml`` is the real ``nvidia-ml-py`` binding. Each NVML call the HAL makes is a typed
function here, or a method of a device's :class:`Handle` or of an :class:`EventSet`, that
answers a plain value in SI units (W, Hz, bytes, J, °C) or raises a HAL error;
:func:`reading` turns such a call into a reading. NVML's return codes are mapped once, in
:data:`_CODES` and :func:`_failure`::

    NVML return code                      raised                  as a reading
    GPU_IS_LOST                           DeviceLost              (raised all the same)
    NOT_SUPPORTED, FUNCTION_NOT_FOUND     CallFailed unsupported  UNSUPPORTED
    NOT_FOUND                             CallFailed not_found    UNSUPPORTED
    NO_PERMISSION                         CallFailed permission_denied
                                                                  Unavailable permission_denied
    INVALID_ARGUMENT, TIMEOUT             CallFailed invalid_argument, timeout
                                                                  Unavailable nvml_error
    any other                             CallFailed nvml_error   Unavailable nvml_error

Loading NVML, initialising it and counting its GPUs fail for the whole backend instead:
:class:`BackendUnavailable` with a code of :data:`_BACKEND_CODES`.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple, ParamSpec, TypeVar

import pynvml

from hal.errors import BackendUnavailable, CallFailed, DeviceLost
from hal.types import UNSUPPORTED, GpuProcess, Reading, Unavailable, Unsupported

__all__ = [
    "Clock",
    "Event",
    "EventSet",
    "Field",
    "Handle",
    "cuda_version",
    "device_count",
    "driver_version",
    "handle_by_bus_id",
    "handle_by_index",
    "handle_by_uuid",
    "init",
    "nvml_version",
    "reading",
    "shutdown",
]

P = ParamSpec("P")
T = TypeVar("T")

Clock = Literal["graphics", "memory"]
Field = Literal[
    "energy_j",
    "power_w",
    "temperature_memory_c",
    "ecc_corrected",
    "ecc_uncorrected",
    "pcie_replay_count",
]
"""A reading :meth:`Handle.field_values` batches, named as its :class:`~hal.types.GpuSample`
field."""

# NVML return code -> the CallFailed code; any other is "nvml_error", GPU_IS_LOST DeviceLost.
_CODES = {
    pynvml.NVML_ERROR_NOT_SUPPORTED: "unsupported",
    pynvml.NVML_ERROR_FUNCTION_NOT_FOUND: "unsupported",
    pynvml.NVML_ERROR_NOT_FOUND: "not_found",  # empty MIG slots, unknown uuids and bus ids
    pynvml.NVML_ERROR_NO_PERMISSION: "permission_denied",
    pynvml.NVML_ERROR_INVALID_ARGUMENT: "invalid_argument",  # how the driver refuses a limit
    pynvml.NVML_ERROR_TIMEOUT: "timeout",  # an event set with nothing queued
}
# CallFailed codes that mean "this device or driver cannot report this", not "failed now".
_UNSUPPORTED_CODES = frozenset({"unsupported", "not_found"})

# NVML return code -> our stable code, for errors that disable the whole backend.
_BACKEND_CODES = {
    pynvml.NVML_ERROR_LIBRARY_NOT_FOUND: "library_missing",
    pynvml.NVML_ERROR_DRIVER_NOT_LOADED: "driver_not_loaded",
    pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH: "driver_library_mismatch",
    pynvml.NVML_ERROR_NO_PERMISSION: "permission_denied",
    pynvml.NVML_ERROR_FUNCTION_NOT_FOUND: "function_missing",
    pynvml.NVML_ERROR_INSUFFICIENT_RESOURCES: "insufficient_resources",
}

_CLOCKS: dict[Clock, int] = {
    "graphics": pynvml.NVML_CLOCK_GRAPHICS,
    "memory": pynvml.NVML_CLOCK_MEM,
}

# Each batched field: (NVML field id, divisor to SI).
_FIELDS: dict[Field, tuple[int, int]] = {
    "energy_j": (pynvml.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION, 1000),  # mJ
    "power_w": (pynvml.NVML_FI_DEV_POWER_INSTANT, 1000),  # mW
    "temperature_memory_c": (pynvml.NVML_FI_DEV_MEMORY_TEMP, 1),
    "ecc_corrected": (pynvml.NVML_FI_DEV_ECC_SBE_VOL_TOTAL, 1),
    "ecc_uncorrected": (pynvml.NVML_FI_DEV_ECC_DBE_VOL_TOTAL, 1),
    "pcie_replay_count": (pynvml.NVML_FI_DEV_PCIE_REPLAY_COUNTER, 1),
}

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

_MHZ = 1_000_000
_NO_INSTANCE = 0xFFFFFFFF  # the instance id of an event outside any MIG instance


# ------------------------------------------------------------------- errors, mapped once


def _failure(exc: pynvml.NVMLError) -> DeviceLost | CallFailed:
    """The HAL error for an NVML error."""
    if exc.value == pynvml.NVML_ERROR_GPU_IS_LOST:
        return DeviceLost(str(exc))
    return CallFailed(_CODES.get(exc.value, "nvml_error"), str(exc))


def _backend_error(exc: pynvml.NVMLError) -> BackendUnavailable:
    """The backend-level error for an NVML error."""
    return BackendUnavailable(_BACKEND_CODES.get(exc.value, "library_error"), f"NVML: {exc}")


def _as_reading(failed: CallFailed) -> Unsupported | Unavailable:
    if failed.code in _UNSUPPORTED_CODES:
        return UNSUPPORTED
    reason = "permission_denied" if failed.code == "permission_denied" else "nvml_error"
    return Unavailable(reason, failed.detail)


def _nvml(call: Callable[P, T]) -> Callable[P, T]:
    """``call``, with the NVML errors it raises raised as the HAL's."""

    @functools.wraps(call)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return call(*args, **kwargs)
        except pynvml.NVMLError as exc:
            raise _failure(exc) from exc

    return guarded


def reading(call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> Reading[T]:
    """Call a function of this module: its value, or the reading that says why there is none.

    Raises:
        DeviceLost: NVML reports the GPU fell off the bus.
    """
    try:
        return call(*args, **kwargs)
    except CallFailed as failed:
        return _as_reading(failed)


# ---------------------------------------------------------------- the library as a whole


def init(library_path: str | None) -> None:
    """Load NVML (from ``library_path`` when given) and initialise it.

    Raises:
        BackendUnavailable: with the code of why NVML cannot serve.
    """
    if library_path is not None and getattr(pynvml.nvmlLib, "_name", None) != library_path:
        with pynvml.libLoadLock:
            try:
                # pynvml loads "libnvidia-ml.so.1" by name unless its handle is already set.
                pynvml.nvmlLib = ctypes.CDLL(library_path)
            except OSError as exc:
                raise BackendUnavailable("library_missing", str(exc)) from exc
            # Function pointers pynvml cached belong to the library loaded before.
            pynvml._nvmlGetFunctionPointer_cache.clear()
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise _backend_error(exc) from exc


def device_count() -> int:
    """How many GPUs NVML sees (MIG instances not counted).

    Raises:
        BackendUnavailable: NVML cannot count them.
    """
    try:
        return int(pynvml.nvmlDeviceGetCount())
    except pynvml.NVMLError as exc:
        raise _backend_error(exc) from exc


@_nvml
def shutdown() -> None:
    """Shut NVML down; handles taken before are no longer valid."""
    pynvml.nvmlShutdown()


@_nvml
def driver_version() -> str:
    """The driver's version (``nvidia-smi``'s ``driver_version``)."""
    return str(pynvml.nvmlSystemGetDriverVersion())


@_nvml
def cuda_version() -> str:
    """The CUDA version the driver supports, as ``major.minor``."""
    version = int(pynvml.nvmlSystemGetCudaDriverVersion_v2())
    return f"{version // 1000}.{version % 1000 // 10}"


@_nvml
def nvml_version() -> str:
    """NVML's own version."""
    return str(pynvml.nvmlSystemGetNVMLVersion())


# ------------------------------------------------------------------------------ devices


@_nvml
def handle_by_index(index: int) -> Handle:
    """The ``index``-th GPU."""
    return Handle(pynvml.nvmlDeviceGetHandleByIndex(index))


@_nvml
def handle_by_uuid(uuid: str) -> Handle:
    """The GPU or MIG instance with this uuid."""
    return Handle(pynvml.nvmlDeviceGetHandleByUUID(uuid))


@_nvml
def handle_by_bus_id(bus_id: str) -> Handle:
    """The GPU at this PCI bus id."""
    return Handle(pynvml.nvmlDeviceGetHandleByPciBusId(bus_id))


class Handle:
    """An NVML device handle: a GPU or a MIG instance. Each method is one NVML query
    (its ``nvidia-smi`` field named where there is one), in SI units."""

    __slots__ = ("_handle",)

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    @property
    def key(self) -> int:
        """What identifies the device, here and in :attr:`Event.device`: its address."""
        return ctypes.cast(self._handle, ctypes.c_void_p).value or 0

    # -------------------------------------------------------------- static facts

    @_nvml
    def name(self) -> str:
        """The product name (``name``)."""
        return str(pynvml.nvmlDeviceGetName(self._handle))

    @_nvml
    def uuid(self) -> str:
        """``GPU-...`` for a GPU, ``MIG-...`` for a MIG instance (``uuid``)."""
        return str(pynvml.nvmlDeviceGetUUID(self._handle))

    @_nvml
    def pci_bus_id(self) -> str:
        """The bus id as NVML writes it: ``00000000:01:00.0`` (``pci.bus_id``)."""
        return str(pynvml.nvmlDeviceGetPciInfo(self._handle).busId)

    @_nvml
    def numa_node(self) -> int:
        """The NUMA node the GPU is attached to."""
        return int(pynvml.nvmlDeviceGetNumaNodeId(self._handle))

    @_nvml
    def memory_total_bytes(self) -> int:
        """``memory.total``."""
        return int(pynvml.nvmlDeviceGetMemoryInfo(self._handle).total)

    @_nvml
    def compute_capability(self) -> str:
        """``compute_cap``: ``major.minor``."""
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(self._handle)
        return f"{major}.{minor}"

    @_nvml
    def power_limit_w(self) -> float:
        """The power limit the driver enforces (``enforced.power.limit``)."""
        return float(pynvml.nvmlDeviceGetEnforcedPowerLimit(self._handle)) / 1000

    @_nvml
    def power_limit_range_w(self) -> tuple[float, float]:
        """The lowest and highest limit one may set (``power.min_limit``, ``power.max_limit``)."""
        low, high = pynvml.nvmlDeviceGetPowerManagementLimitConstraints(self._handle)
        return low / 1000, high / 1000

    @_nvml
    def set_power_limit_w(self, watts: float) -> None:
        """Set the power management limit (root only)."""
        pynvml.nvmlDeviceSetPowerManagementLimit(self._handle, round(watts * 1000))

    @_nvml
    def max_clock_hz(self, clock: Clock) -> int:
        """``clocks.max.graphics``, ``clocks.max.memory``."""
        return int(pynvml.nvmlDeviceGetMaxClockInfo(self._handle, _CLOCKS[clock])) * _MHZ

    @_nvml
    def max_pcie_generation(self) -> int:
        """``pcie.link.gen.max``."""
        return int(pynvml.nvmlDeviceGetMaxPcieLinkGeneration(self._handle))

    @_nvml
    def max_pcie_width(self) -> int:
        """``pcie.link.width.max``."""
        return int(pynvml.nvmlDeviceGetMaxPcieLinkWidth(self._handle))

    @_nvml
    def ecc_enabled(self) -> bool:
        """``ecc.mode.current``."""
        current, _pending = pynvml.nvmlDeviceGetEccMode(self._handle)
        return bool(current)

    @_nvml
    def mig_enabled(self) -> bool:
        """``mig.mode.current``."""
        current, _pending = pynvml.nvmlDeviceGetMigMode(self._handle)
        return bool(current == pynvml.NVML_DEVICE_MIG_ENABLE)

    # ------------------------------------------------------------ MIG instances

    @_nvml
    def mig_handles(self) -> list[Handle]:
        """A GPU's MIG instances; empty slots are left out.

        Raises:
            DeviceLost: the GPU fell off the bus while its slots were read.
        """
        slots = range(pynvml.nvmlDeviceGetMaxMigDeviceCount(self._handle))
        found = [reading(self._mig_handle, index) for index in slots]
        return [mig for mig in found if not isinstance(mig, Unsupported | Unavailable)]

    @_nvml
    def _mig_handle(self, index: int) -> Handle:
        return Handle(pynvml.nvmlDeviceGetMigDeviceHandleByIndex(self._handle, index))

    @_nvml
    def mig_parent(self) -> Handle:
        """The GPU a MIG instance belongs to."""
        return Handle(pynvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self._handle))

    @_nvml
    def gpu_instance_id(self) -> int:
        """A MIG instance's GPU instance id."""
        return int(pynvml.nvmlDeviceGetGpuInstanceId(self._handle))

    @_nvml
    def compute_instance_id(self) -> int:
        """A MIG instance's compute instance id."""
        return int(pynvml.nvmlDeviceGetComputeInstanceId(self._handle))

    # ---------------------------------------------------------- readings of a tick

    @_nvml
    def memory_used_bytes(self) -> int:
        """``memory.used``."""
        return int(pynvml.nvmlDeviceGetMemoryInfo(self._handle).used)

    @_nvml
    def processes(self) -> list[GpuProcess]:
        """The processes with a compute context, then those with a graphics context."""
        compute = pynvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
        graphics = pynvml.nvmlDeviceGetGraphicsRunningProcesses(self._handle)
        return [_process(p, "compute") for p in compute] + [
            _process(p, "graphics") for p in graphics
        ]

    @_nvml
    def utilization_pct(self) -> tuple[float, float]:
        """``utilization.gpu``, ``utilization.memory``."""
        rates = pynvml.nvmlDeviceGetUtilizationRates(self._handle)
        return float(rates.gpu), float(rates.memory)

    @_nvml
    def encoder_utilization_pct(self) -> float:
        """``utilization.encoder``."""
        return float(pynvml.nvmlDeviceGetEncoderUtilization(self._handle)[0])

    @_nvml
    def decoder_utilization_pct(self) -> float:
        """``utilization.decoder``."""
        return float(pynvml.nvmlDeviceGetDecoderUtilization(self._handle)[0])

    @_nvml
    def temperature_c(self) -> float:
        """``temperature.gpu``."""
        return float(pynvml.nvmlDeviceGetTemperature(self._handle, pynvml.NVML_TEMPERATURE_GPU))

    @_nvml
    def clock_hz(self, clock: Clock) -> int:
        """``clocks.current.graphics``, ``clocks.current.memory``."""
        return int(pynvml.nvmlDeviceGetClockInfo(self._handle, _CLOCKS[clock])) * _MHZ

    @_nvml
    def throttle_reasons(self) -> list[str]:
        """The names of the active ``clocks_event_reasons``."""
        mask = pynvml.nvmlDeviceGetCurrentClocksEventReasons(self._handle)
        return [reason for bit, reason in _THROTTLE_REASONS if mask & bit]

    @_nvml
    def fan_pct(self) -> float:
        """``fan.speed``."""
        return float(pynvml.nvmlDeviceGetFanSpeed(self._handle))

    @_nvml
    def power_w(self) -> float:
        """``power.draw`` (averaged over a second; older than the instant field)."""
        return float(pynvml.nvmlDeviceGetPowerUsage(self._handle)) / 1000

    @_nvml
    def energy_j(self) -> float:
        """The energy used since the driver loaded."""
        return float(pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)) / 1000

    @_nvml
    def ecc_errors(self, kind: Literal["corrected", "uncorrected"]) -> int:
        """``ecc.errors.corrected.volatile.total``, ``ecc.errors.uncorrected...``."""
        error_type = (
            pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED
            if kind == "corrected"
            else pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
        )
        volatile = pynvml.NVML_VOLATILE_ECC
        return int(pynvml.nvmlDeviceGetTotalEccErrors(self._handle, error_type, volatile))

    @_nvml
    def pcie_replay_count(self) -> int:
        """``pcie.replay_counter``."""
        return int(pynvml.nvmlDeviceGetPcieReplayCounter(self._handle))

    @_nvml
    def field_values(self, fields: Sequence[Field]) -> list[Reading[float]]:
        """Several readings in one call (``nvmlDeviceGetFieldValues``), each its own result.

        Raises:
            DeviceLost: NVML reports the GPU fell off the bus, for the call or a field.
        """
        ids = [_FIELDS[field][0] for field in fields]
        values = pynvml.nvmlDeviceGetFieldValues(self._handle, ids)
        return [_field(value, _FIELDS[f][1]) for f, value in zip(fields, values, strict=True)]


def _process(info: Any, kind: Literal["compute", "graphics"]) -> GpuProcess:
    used = info.usedGpuMemory  # None: NVML_VALUE_NOT_AVAILABLE
    return GpuProcess(
        pid=int(info.pid), used_memory_bytes=UNSUPPORTED if used is None else int(used), kind=kind
    )


def _field(value: Any, divisor: int) -> Reading[float]:
    if value.nvmlReturn != pynvml.NVML_SUCCESS:
        failure = _failure(pynvml.NVMLError(value.nvmlReturn))
        if isinstance(failure, DeviceLost):
            raise failure
        return _as_reading(failure)
    return _field_number(value) / divisor


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


# ------------------------------------------------------------------------------- events


class Event(NamedTuple):
    """One event NVML delivered, in plain values."""

    kind: Literal["xid"] | None
    """``xid``: an Xid critical error; None: a type not registered here."""
    device: int
    """The :attr:`Handle.key` of the physical GPU it was delivered on."""
    data: int
    """The Xid, for an Xid error."""
    gpu_instance: int | None
    """The MIG GPU instance it was raised in; None: outside any."""
    compute_instance: int | None
    """The compute instance within it; None: not one in particular."""


class EventSet:
    """An NVML event set, created empty."""

    __slots__ = ("_set",)

    @_nvml
    def __init__(self) -> None:
        self._set = pynvml.nvmlEventSetCreate()

    @_nvml
    def register_xids(self, handle: Handle) -> None:
        """Have a physical GPU's Xid critical errors delivered here."""
        xid = pynvml.nvmlEventTypeXidCriticalError
        pynvml.nvmlDeviceRegisterEvents(handle._handle, xid, self._set)

    @_nvml
    def next_event(self) -> Event:
        """The oldest event queued; never waits.

        Raises:
            CallFailed: ``timeout`` when none is queued.
            DeviceLost: a registered GPU fell off the bus (after the events queued before).
        """
        data = pynvml.nvmlEventSetWait_v2(self._set, 0)
        xid = data.eventType == pynvml.nvmlEventTypeXidCriticalError
        gpu_instance, compute_instance = data.gpuInstanceId, data.computeInstanceId
        return Event(
            kind="xid" if xid else None,
            device=Handle(data.device).key,
            data=int(data.eventData),
            gpu_instance=None if gpu_instance == _NO_INSTANCE else int(gpu_instance),
            compute_instance=None if compute_instance == _NO_INSTANCE else int(compute_instance),
        )

    @_nvml
    def free(self) -> None:
        """Free the set."""
        pynvml.nvmlEventSetFree(self._set)
