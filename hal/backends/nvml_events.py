"""NVIDIA health events: an NVML event set with every physical GPU registered for Xids.

NVML delivers an event on the handle of the physical GPU it was registered with; an Xid
raised inside a MIG instance carries that instance's GPU and compute instance ids. The set
is drained with a zero timeout, so that reading events never blocks the sampler.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from hal.backends import nvml
from hal.errors import CallFailed, DeviceLost
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


class XidEvents:
    """The Xid critical errors of a set of GPUs and MIG instances, as health events."""

    def __init__(self) -> None:
        self._set: nvml.EventSet | None = None
        self._gpus: dict[int, str] = {}
        """Handle key of each registered GPU -> its id."""
        self._migs: dict[tuple[int, int, int], str] = {}
        """(parent GPU's handle key, GPU instance, compute instance) -> MIG id."""

    def open(self, devices: Iterable[tuple[str, nvml.Handle | None, bool]]) -> None:
        """Create the event set and register ``(id, handle, is_mig)`` devices in it.

        A driver without events, or a GPU that does not support them, is left out: its
        Xids are then never reported, but it is sampled like any other.
        """
        created = nvml.reading(nvml.EventSet)
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

    def watch(self, gpu_id: str, handle: nvml.Handle) -> None:
        """Register a physical GPU for Xid events, unless it already is."""
        if self._set is None or self._gpus.get(handle.key) == gpu_id:
            return
        try:
            registered = nvml.reading(self._set.register_xids, handle)
        except DeviceLost:
            return  # sample() reports it lost, and watches it again once it is back
        if isinstance(registered, Unavailable):
            _log().warning("NVML: no Xid events from %s: %s", gpu_id, registered.detail)
        elif is_value(registered):
            self._gpus[handle.key] = gpu_id

    def _map_mig(self, mig_id: str, handle: nvml.Handle) -> None:
        try:
            parent = handle.mig_parent()
            gpu_instance = handle.gpu_instance_id()
            compute_instance = handle.compute_instance_id()
        except (CallFailed, DeviceLost):
            return  # its Xids are then reported on the parent GPU
        self._migs[(parent.key, gpu_instance, compute_instance)] = mig_id

    def drain(self) -> list[HealthEvent]:
        """The events queued since the last call, oldest first; never blocks."""
        events: list[HealthEvent] = []
        if self._set is None:
            return events
        while len(events) < MAX_EVENTS_PER_DRAIN:
            try:
                event = self._set.next_event()
            except DeviceLost:
                # A GPU fell off the bus: the events queued before it were taken, and
                # sample() reports which is lost.
                return events
            except CallFailed as exc:
                if exc.code != "timeout":  # timeout: the queue is empty
                    _log().warning("NVML: reading health events failed: %s", exc.detail)
                return events
            events += self._events(event, time.time())
        return events

    def _events(self, event: nvml.Event, at: float) -> list[HealthEvent]:
        kind = event.kind
        gpu_id = self._gpus.get(event.device)
        if kind is None or gpu_id is None:
            return []  # not a type or a GPU registered here
        code = event.data
        gpu_instance, compute_instance = event.gpu_instance, event.compute_instance
        if gpu_instance is None:
            return [HealthEvent(gpu_id=gpu_id, kind=kind, code=code, at=at)]
        migs = [
            mig_id
            for (parent, gi, ci), mig_id in self._migs.items()
            if parent == event.device
            and gi == gpu_instance
            and compute_instance in (ci, None)  # no compute instance: all of them
        ]
        if migs:
            return [HealthEvent(gpu_id=mig, kind=kind, code=code, at=at) for mig in migs]
        ci = "any" if compute_instance is None else str(compute_instance)
        detail = f"MIG gpu instance {gpu_instance}, compute instance {ci}"
        return [HealthEvent(gpu_id=gpu_id, kind=kind, code=code, at=at, detail=detail)]

    def close(self) -> None:
        """Free the event set; later drains return nothing."""
        if self._set is None:
            return
        try:
            self._set.free()
        except (CallFailed, DeviceLost) as exc:
            _log().warning("NVML: freeing the event set failed: %s", exc.detail)
        self._set = None
        self._gpus.clear()
        self._migs.clear()
