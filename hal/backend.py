"""The one interface every GPU backend implements, and the configuration they share."""

from __future__ import annotations

import abc
import os
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import msgspec

from hal.errors import BadConfig
from hal.types import GpuProfile, GpuSample, HealthEvent, PowerLimitResult

__all__ = ["MAX_DISCOVERY_TIMEOUT_S", "Backend", "HalConfig"]

#: The longest ``GPU_AGENT_DISCOVERY_TIMEOUT``: an hour is far past any real discovery.
MAX_DISCOVERY_TIMEOUT_S = 3600.0


class HalConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Where the HAL looks; tests point the roots at recorded trees.

    Attributes:
        sysfs_root: the directory that stands for ``/sys``.
        dev_root: the directory that stands for ``/dev``.
        proc_root: the directory that stands for ``/proc`` (where DRM clients are found).
        nvml_library: path of ``libnvidia-ml.so.1`` to load instead of the system's.
        discovery_timeout_s: how long isolated discovery may take before it is killed.
        backends: names of the backends to run, in priority order (first wins a merge).
        rocm_path: where ROCm is installed (its ``.info/version`` names the release).
        docker_socket: the Docker engine's unix socket.
        cdi_dirs: where Container Device Interface specs live.
    """

    sysfs_root: Path = Path("/sys")
    dev_root: Path = Path("/dev")
    proc_root: Path = Path("/proc")
    nvml_library: str | None = None
    discovery_timeout_s: float = 10.0
    backends: tuple[str, ...] = ("nvml", "amdsmi", "amdgpu", "intel")
    rocm_path: Path = Path("/opt/rocm")
    docker_socket: Path = Path("/var/run/docker.sock")
    cdi_dirs: tuple[Path, ...] = (Path("/etc/cdi"), Path("/var/run/cdi"))

    @classmethod
    def from_env(cls) -> HalConfig:
        """Build a configuration from ``GPU_AGENT_*`` environment variables.

        Raises:
            BadConfig: a variable holds a value that cannot be used.
        """
        from hal.runtime import docker_socket

        env = os.environ
        return cls(
            sysfs_root=Path(env.get("GPU_AGENT_SYSFS_ROOT", "/sys")),
            dev_root=Path(env.get("GPU_AGENT_DEV_ROOT", "/dev")),
            proc_root=Path(env.get("GPU_AGENT_PROC_ROOT", "/proc")),
            nvml_library=env.get("GPU_AGENT_NVML_LIB") or None,
            discovery_timeout_s=_positive(env, "GPU_AGENT_DISCOVERY_TIMEOUT", 10.0),
            rocm_path=Path(env.get("ROCM_PATH", "/opt/rocm")),
            docker_socket=docker_socket(env),
        )


class Backend(abc.ABC):
    """A source of GPU profiles and samples for one vendor interface.

    Lifecycle: :meth:`open` once (it may raise
    :class:`~hal.errors.BackendUnavailable` with a coded reason), then :meth:`sample` and
    :meth:`events` as often as wanted, then :meth:`close`. A device that vanishes mid-run is
    reported in its sample with ``state="lost"``; :meth:`sample` itself never raises for one
    device.
    """

    name: ClassVar[str]

    def __init__(self, config: HalConfig) -> None:
        self.config = config

    @abc.abstractmethod
    def open(self) -> list[GpuProfile]:
        """Open the vendor interface and return the profile of every device found."""

    @abc.abstractmethod
    def sample(self, now: float) -> list[GpuSample]:
        """Read the fast-changing values of every device opened; ``now`` is monotonic."""

    def events(self) -> list[HealthEvent]:
        """The health events reported since the last call, oldest first; never blocks.

        The sampler thread calls it at each tick, after :meth:`sample`.
        """
        return []

    def versions(self) -> dict[str, str]:
        """Versions of the libraries and drivers behind this backend."""
        return {}

    def set_power_limit(self, gpu_id: str, watts: float) -> PowerLimitResult:
        """Set a GPU's power limit in watts and say what became of it; never raises for it.

        Only backends that can set a limit override this; the others answer ``unsupported``.
        """
        detail = f"the {self.name} backend cannot set power limits"
        return PowerLimitResult(gpu_id=gpu_id, status="unsupported", limit_w=None, detail=detail)

    def close(self) -> None:  # noqa: B027 - most backends hold nothing to release
        """Release what :meth:`open` acquired."""


def _positive(env: Mapping[str, str], key: str, default: float) -> float:
    text = env.get(key)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        raise BadConfig(f"{key}={text!r} is not a number of seconds") from None
    if not value > 0:
        raise BadConfig(f"{key}={text!r} must be greater than 0")
    if not value <= MAX_DISCOVERY_TIMEOUT_S:  # inf and 1e309 too: waits take no infinity
        raise BadConfig(f"{key}={text!r} must be at most {MAX_DISCOVERY_TIMEOUT_S:g} seconds")
    return value
