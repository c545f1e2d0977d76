"""Run every backend, merge what they found, and sample it.

Discovery runs each backend in its own forked child with a time limit (see
:mod:`hal.isolate`); only backends that came back healthy are then opened in-process
for sampling. A device seen by two backends (an AMD card through ``amdsmi`` and through
sysfs) is merged by PCI bus id: the backend listed first wins, and fills the readings it
lacks from the others.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Iterable
from functools import partial
from typing import TYPE_CHECKING, Literal, NamedTuple, TypeVar

import msgspec

from hal.backend import Backend, HalConfig
from hal.errors import DiscoveryFailed, HalError
from hal.isolate import Isolated
from hal.sysfs import driver_name, drm_cards, no_cards
from hal.types import (
    BackendReport,
    GpuProfile,
    GpuSample,
    HealthEvent,
    PowerLimitResult,
    is_value,
)

__all__ = [
    "BACKENDS",
    "Discovery",
    "Hal",
    "PendingDiscovery",
    "discover",
    "merge_profiles",
    "merge_samples",
]


if TYPE_CHECKING:
    import logging


def _log() -> logging.Logger:
    """This module's logger. ``logging`` is imported at the first message: it costs 4 ms,
    which ``gpu-agent profile`` (here only on the error paths) need not pay."""
    import logging

    return logging.getLogger(__name__)


class BackendSpec(NamedTuple):
    """Where a backend's class is, and which DRM drivers its devices are bound to."""

    target: str
    """``module:class``, imported only when the backend runs: a machine without NVIDIA
    never pays for importing the NVML binding."""
    drm_drivers: tuple[str, ...] = ()
    """When set, a backend with no DRM card bound to these drivers is not run at all:
    listing ``class/drm`` is cheap and touches no device, forking a child is not."""


BACKENDS: dict[str, BackendSpec] = {
    "nvml": BackendSpec("hal.backends.nvidia:NvidiaBackend"),
    "amdsmi": BackendSpec("hal.backends.amdsmi:AmdSmiBackend", ("amdgpu",)),
    "amdgpu": BackendSpec("hal.backends.amdgpu:AmdgpuSysfsBackend", ("amdgpu",)),
    "intel": BackendSpec("hal.backends.intel:IntelSysfsBackend", ("i915", "xe")),
}


_S = TypeVar("_S", GpuProfile, GpuSample)


class Discovery(msgspec.Struct, kw_only=True):
    """Every GPU found, merged, and one report per backend."""

    gpus: list[GpuProfile]
    backends: list[BackendReport]


class _Found(msgspec.Struct, kw_only=True):
    """What one backend's discovery child hands back."""

    report: BackendReport
    gpus: list[GpuProfile] = []


def _backend(name: str, config: HalConfig) -> Backend:
    module_name, class_name = BACKENDS[name].target.split(":")
    cls: type[Backend] = getattr(importlib.import_module(module_name), class_name)
    return cls(config)


def _open(name: str, config: HalConfig) -> tuple[_Found, Backend | None]:
    backend = _backend(name, config)
    try:
        gpus = backend.open()
    except HalError as exc:
        return _Found(
            report=BackendReport(name=name, status="unavailable", code=exc.code, detail=exc.detail)
        ), None
    report = BackendReport(name=name, status="ok", devices=len(gpus), versions=backend.versions())
    return _Found(report=report, gpus=gpus), backend


def _discover_one(name: str, config: HalConfig) -> bytes:
    found, backend = _open(name, config)
    if backend is not None:
        backend.close()
    return msgspec.msgpack.encode(found)


class PendingDiscovery:
    """Discovery under way in child processes; :meth:`result` waits for it."""

    def __init__(self, config: HalConfig) -> None:
        self._names = [name for name in config.backends if name in BACKENDS]
        # One walk of class/drm answers every backend that needs a bound card.
        needs_card = any(BACKENDS[name].drm_drivers for name in self._names)
        bound = _bound_drivers(config) if needs_card else set()
        self._absent = {name: _absent(name, config, bound) for name in self._names}
        self._children = Isolated(
            [partial(_discover_one, n, config) for n in self._names if self._absent[n] is None],
            config.discovery_timeout_s,
        )

    def result(self) -> Discovery:
        """Every GPU found, merged, with a report per backend."""
        results = iter(self._children.results())
        return _collect([(name, self._absent[name] or next(results)) for name in self._names])

    def close(self) -> None:
        """Stop the discovery children if :meth:`result` was not called."""
        self._children.close()


def _bound_drivers(config: HalConfig) -> set[str]:
    """The DRM drivers some card is bound to."""
    return {d for card in drm_cards(config.sysfs_root) if (d := driver_name(card / "device"))}


def _absent(name: str, config: HalConfig, bound: set[str]) -> HalError | None:
    """Why a backend need not run, when that can be told without touching a device."""
    drivers = BACKENDS[name].drm_drivers
    if drivers and bound.isdisjoint(drivers):
        return no_cards(config.sysfs_root, drivers)
    return None


def discover(config: HalConfig) -> Discovery:
    """Profile every GPU, each backend isolated in a child process with a time limit."""
    return PendingDiscovery(config).result()


def _collect(results: list[tuple[str, bytes | HalError]]) -> Discovery:
    found: list[_Found] = []
    for name, result in results:
        if isinstance(result, HalError):
            status: Literal["failed", "unavailable"] = (
                "failed" if isinstance(result, DiscoveryFailed) else "unavailable"
            )
            report = BackendReport(name=name, status=status, code=result.code, detail=result.detail)
            found.append(_Found(report=report))
        else:
            found.append(msgspec.msgpack.decode(result, type=_Found))
    gpus, _ = merge_profiles(gpu for item in found for gpu in item.gpus)
    return Discovery(gpus=gpus, backends=[item.report for item in found])


def merge_profiles(profiles: Iterable[GpuProfile]) -> tuple[list[GpuProfile], dict[str, str]]:
    """Merge profiles of the same physical GPU; also return ``{dropped id: kept id}``."""
    merged: list[GpuProfile] = []
    by_bus: dict[str, int] = {}
    aliases: dict[str, str] = {}
    for profile in profiles:
        bus = profile.pci_bus_id
        # MIG instances share their parent's bus id; they are distinct devices.
        if profile.kind == "mig" or not isinstance(bus, str):
            merged.append(profile)
            continue
        if bus not in by_bus:
            by_bus[bus] = len(merged)
            merged.append(profile)
            continue
        kept = merged[by_bus[bus]]
        merged[by_bus[bus]] = _fill(kept, profile)
        aliases[profile.id] = kept.id
    return merged, aliases


def merge_samples(samples: Iterable[GpuSample], aliases: dict[str, str]) -> list[GpuSample]:
    """Fold samples of merged devices into the sample of the device that was kept."""
    out: dict[str, GpuSample] = {}
    for sample in samples:
        key = aliases.get(sample.id, sample.id)
        out[key] = sample if key not in out else _fill(out[key], sample)
    return list(out.values())


def _set_power_limit(backend: Backend, gpu_id: str, watts: float) -> PowerLimitResult:
    try:
        return backend.set_power_limit(gpu_id, watts)
    except Exception as exc:
        # A backend's bug must not reach the daemon's loop; it is logged and reported.
        _log().exception("setting the power limit of %s through %s failed", gpu_id, backend.name)
        detail = f"{backend.name}: {exc!r}"
        return PowerLimitResult(gpu_id=gpu_id, status="failed", limit_w=None, detail=detail)


def _fill(kept: _S, other: _S) -> _S:
    changes = {
        name: getattr(other, name)
        for name in kept.__struct_fields__
        if name not in ("id", "backend", "state")
        and not is_value(getattr(kept, name))
        and is_value(getattr(other, name))
    }
    return msgspec.structs.replace(kept, **changes) if changes else kept


class Hal:
    """The machine's GPUs, discovered once in isolation, then sampled in-process."""

    def __init__(self, config: HalConfig) -> None:
        self.config = config
        self.discovery = Discovery(gpus=[], backends=[])
        self._backends: list[Backend] = []
        self._aliases: dict[str, str] = {}
        self._owners: dict[str, list[tuple[Backend, str]]] = {}

    def open(self) -> Discovery:
        """Discover in isolation, then open the backends that came back healthy."""
        self.discovery = discover(self.config)
        profiles: list[GpuProfile] = []
        seen_by: list[tuple[Backend, str]] = []
        for report in self.discovery.backends:
            if report.status != "ok":
                continue
            found, backend = _open(report.name, self.config)
            if backend is not None:
                self._backends.append(backend)
                profiles += found.gpus
                seen_by += [(backend, gpu.id) for gpu in found.gpus]
        _, self._aliases = merge_profiles(profiles)
        for backend, gpu_id in seen_by:  # in priority order: the merge's winner comes first
            self._owners.setdefault(self._aliases.get(gpu_id, gpu_id), []).append((backend, gpu_id))
        return self.discovery

    def sample(self) -> list[GpuSample]:
        """One reading of every GPU."""
        now = time.monotonic()
        return merge_samples(
            (sample for backend in self._backends for sample in backend.sample(now)),
            self._aliases,
        )

    def events(self) -> list[HealthEvent]:
        """Every backend's health events since the last call; one that fails is logged."""
        events: list[HealthEvent] = []
        for backend in self._backends:
            try:
                found = backend.events()
            except Exception:
                # A backend's bug must not cost the others' events, nor the sampler its tick.
                _log().exception("reading health events from %s failed", backend.name)
                continue
            events += (
                msgspec.structs.replace(e, gpu_id=self._aliases[e.gpu_id])
                if e.gpu_id in self._aliases
                else e
                for e in found
            )
        return events

    def set_power_limit(self, gpu_id: str, watts: float) -> PowerLimitResult:
        """Set a GPU's power limit in watts through the backend that owns it; never raises.

        A GPU that several backends saw is asked of each in priority order, moving on only
        while the answer is ``unsupported``: ``amdsmi`` wins the merge of an AMD card but sets
        nothing, ``amdgpu`` writes its hwmon cap. Any other answer is final, so that one
        refusal is not retried elsewhere. On ``set`` the discovered profile's
        ``power_limit_w`` becomes the limit read back.
        """
        kept = self._aliases.get(gpu_id, gpu_id)
        owners = self._owners.get(kept, [])
        if not owners:
            detail = f"no GPU {gpu_id!r} was discovered"
            return PowerLimitResult(
                gpu_id=gpu_id, status="unknown_gpu", limit_w=None, detail=detail
            )
        answers: list[PowerLimitResult] = []
        for backend, own_id in owners:
            answers.append(_set_power_limit(backend, own_id, watts))
            if answers[-1].status != "unsupported":
                break
        result = answers[-1]
        if result.status == "unsupported":
            result = msgspec.structs.replace(result, detail="; ".join(a.detail for a in answers))
        if result.status == "set" and result.limit_w is not None:
            for profile in self.discovery.gpus:
                if profile.id == kept:
                    profile.power_limit_w = result.limit_w
        return msgspec.structs.replace(result, gpu_id=kept)

    def close(self) -> None:
        """Close every backend."""
        for backend in self._backends:
            backend.close()
        self._backends = []
        self._owners = {}
