"""NVIDIA health events: an NVML event set with every physical GPU registered for Xids.

NVML delivers an event on the handle of the physical GPU it was registered with; an Xid
raised inside a MIG instance carries that instance's GPU and compute instance ids. The set
is drained with a zero timeout, so that reading events never blocks the sampler.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal

import pynvml

from hal.backends import nvml_lib
from hal.errors import DeviceLost
from hal.types import HealthEvent, Unavailable, is_value

__all__ = ["MAX_EVENTS_PER_DRAIN", "XidEvents"]


if TYPE_CHECKING:
    import logging


def _log() -> logging.Logger:
    """This module's logger. ``logging`` is imported at the first message: it costs 4 ms,
    which ``gpu-agent profile`` (here only on the error paths) need not pay."""
    import logging

    return logging.getLogger(__name__)


MAX_EVENTS_PER_DRAIN = 256
"""Events taken in one :meth:`XidEvents.drain`; more wait for the next (an Xid storm must
not hold the sampler's tick)."""

_NO_INSTANCE = 0xFFFFFFFF  # the instance id of an event outside any MIG instance

_KINDS: dict[int, Literal["xid"]] = {pynvml.nvmlEventTypeXidCriticalError: "xid"}
_REGISTERED = pynvml.nvmlEventTypeXidCriticalError


def _address(handle: Any) -> int:
    """What identifies an NVML device handle: the address it points to."""
    return ctypes.cast(handle, ctypes.c_void_p).value or 0


class XidEvents:
    """The Xid critical errors of a set of GPUs and MIG instances, as health events."""

    def __init__(self) -> None:
        self._set: Any = None
        self._gpus: dict[int, str] = {}
        """Handle address of each registered GPU -> its id."""
        self._migs: dict[tuple[int, int, int], str] = {}
        """(parent GPU's handle address, GPU instance, compute instance) -> MIG id."""

    def open(self, devices: Iterable[tuple[str, Any, bool]]) -> None:
        """Create the event set and register ``(id, handle, is_mig)`` devices in it.

        A driver without events, or a GPU that does not support them, is left out: its
        Xids are then never reported, but it is sampled like any other.
        """
        created = nvml_lib.reading(pynvml.nvmlEventSetCreate)
        if isinstance(created, Unavailable):
            _log().warning("NVML: no health events: %s", created.detail)
        if not is_value(created):
            return
        self._set = created
        for device_id, handle, is_mig in devices:
            if handle is None:  # unreadable at open; watched when sample() finds it back
                continue
            if is_mig:
                self._map_mig(device_id, handle)
            else:
                self.watch(device_id, handle)

    def watch(self, gpu_id: str, handle: Any) -> None:
        """Register a physical GPU for Xid events, unless it already is."""
        address = _address(handle)
        if self._set is None or self._gpus.get(address) == gpu_id:
            return
        try:
            registered = nvml_lib.reading(
                pynvml.nvmlDeviceRegisterEvents, handle, _REGISTERED, self._set
            )
        except DeviceLost:
            return  # sample() reports it lost, and watches it again once it is back
        if isinstance(registered, Unavailable):
            _log().warning("NVML: no Xid events from %s: %s", gpu_id, registered.detail)
        elif is_value(registered):
            self._gpus[address] = gpu_id

    def _map_mig(self, mig_id: str, handle: Any) -> None:
        try:
            parent = pynvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle)
            gpu_instance = pynvml.nvmlDeviceGetGpuInstanceId(handle)
            compute_instance = pynvml.nvmlDeviceGetComputeInstanceId(handle)
        except pynvml.NVMLError:
            return  # its Xids are then reported on the parent GPU
        self._migs[(_address(parent), gpu_instance, compute_instance)] = mig_id

    def drain(self) -> list[HealthEvent]:
        """The events queued since the last call, oldest first; never blocks."""
        events: list[HealthEvent] = []
        if self._set is None:
            return events
        while len(events) < MAX_EVENTS_PER_DRAIN:
            try:
                data = pynvml.nvmlEventSetWait_v2(self._set, 0)
            except pynvml.NVMLError as exc:
                # TIMEOUT: the queue is empty. GPU_IS_LOST: a GPU fell off the bus; the
                # events queued before it were taken, and sample() reports which is lost.
                if exc.value not in (pynvml.NVML_ERROR_TIMEOUT, pynvml.NVML_ERROR_GPU_IS_LOST):
                    _log().warning("NVML: reading health events failed: %s", exc)
                return events
            events += self._events(data, time.time())
        return events

    def _events(self, data: Any, at: float) -> list[HealthEvent]:
        kind = _KINDS.get(data.eventType)
        address = _address(data.device)
        gpu_id = self._gpus.get(address)
        if kind is None or gpu_id is None:
            return []  # not a type or a GPU registered here
        code = int(data.eventData)
        gpu_instance, compute_instance = data.gpuInstanceId, data.computeInstanceId
        if gpu_instance == _NO_INSTANCE:
            return [HealthEvent(gpu_id=gpu_id, kind=kind, code=code, at=at)]
        migs = [
            mig_id
            for (parent, gi, ci), mig_id in self._migs.items()
            if parent == address
            and gi == gpu_instance
            and compute_instance in (ci, _NO_INSTANCE)  # no compute instance: all of them
        ]
        if migs:
            return [HealthEvent(gpu_id=mig, kind=kind, code=code, at=at) for mig in migs]
        ci = "any" if compute_instance == _NO_INSTANCE else str(compute_instance)
        detail = f"MIG gpu instance {gpu_instance}, compute instance {ci}"
        return [HealthEvent(gpu_id=gpu_id, kind=kind, code=code, at=at, detail=detail)]

    def close(self) -> None:
        """Free the event set; later drains return nothing."""
        if self._set is None:
            return
        try:
            pynvml.nvmlEventSetFree(self._set)
        except pynvml.NVMLError as exc:
            _log().warning("NVML: freeing the event set failed: %s", exc)
        self._set = None
        self._gpus.clear()
        self._migs.clear()
