"""Choosing which of this machine's GPUs a job gets, and describing them to the sandbox."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from hal.types import GpuProfile
from sandbox.gpu_mapping import DeviceFacts
from sandbox.spec import GpuRequest

__all__ = ["device_facts", "fits", "pick_gpus"]


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
