"""Choosing which of this machine's GPUs a job gets, describing them to the sandbox, and
reading whether their memory is full."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from hal.types import GpuProfile, GpuSample, value_or
from sandbox.gpu_mapping import DeviceFacts
from sandbox.spec import GpuRequest

__all__ = ["MEMORY_FULL", "device_facts", "fits", "memory_full", "pick_gpus"]

#: The share of a GPU's memory in use from which it counts as full (an allocator's
#: slack and the driver's own reservations keep a full GPU a little under 100%).
MEMORY_FULL = 0.95


def memory_full(gpus: Iterable[GpuProfile], samples: Iterable[GpuSample]) -> bool:
    """Whether any of ``gpus`` had its memory full at its latest sample; a GPU whose
    memory is not read (unsupported, unavailable) never counts as full."""
    latest = {sample.id: sample for sample in samples}
    for gpu in gpus:
        total = value_or(gpu.vram_total_bytes, 0)
        sample = latest.get(gpu.id)
        used = value_or(sample.memory_used_bytes, 0) if sample is not None else 0
        if total > 0 and used >= MEMORY_FULL * total:
            return True
    return False


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".") if part.isdigit())


def fits(gpu: GpuProfile, request: GpuRequest, *, allow_mig: bool = False) -> bool:
    """Whether one GPU meets every constraint of a request.

    A MIG instance, or a GPU split into them, fits only with ``allow_mig``: the scheduler
    hands out the instances, never their parent.
    """
    if gpu.mig_enabled is True and gpu.kind != "mig":
        return False
    if gpu.kind == "mig" and not allow_mig:
        return False
    if request.vendor is not None and gpu.vendor != request.vendor:
        return False
    vram = gpu.vram_total_bytes
    if request.min_vram_bytes and not (isinstance(vram, int) and vram >= request.min_vram_bytes):
        return False
    if request.min_compute_capability is not None:
        capability = gpu.compute_capability
        if not isinstance(capability, str):
            return False
        if _version(capability) < _version(request.min_compute_capability):
            return False
    if request.gfx_targets:
        return gpu.gfx_target in request.gfx_targets
    return True


def pick_gpus(
    gpus: Iterable[GpuProfile], request: GpuRequest, busy: Sequence[str] = ()
) -> list[GpuProfile] | None:
    """The first ``request.count`` free GPUs that fit, or None when there are not enough."""
    if request.count == 0:
        return []
    chosen = [g for g in gpus if g.id not in busy and fits(g, request)][: request.count]
    return chosen if len(chosen) == request.count else None


def device_facts(gpu: GpuProfile) -> DeviceFacts:
    """The plain facts the sandbox maps to container devices (it never sees HAL types)."""
    return DeviceFacts(
        vendor=gpu.vendor,
        uuid=gpu.uuid if isinstance(gpu.uuid, str) else None,
        pci_bus_id=gpu.pci_bus_id if isinstance(gpu.pci_bus_id, str) else None,
        render_node=gpu.render_node if isinstance(gpu.render_node, str) else None,
    )
