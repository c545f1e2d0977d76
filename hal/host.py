"""The host: CPU, memory, disks, network, OS, and the container runtime around them."""

from __future__ import annotations

import platform
import socket

import psutil

from hal.backend import HalConfig
from hal.runtime import RuntimeProbe, runtime_info
from hal.types import (
    UNSUPPORTED,
    CpuInfo,
    DiskInfo,
    HostProfile,
    HostSample,
    NetInterface,
    Reading,
    RuntimeInfo,
    Unavailable,
)

__all__ = ["host_profile", "host_sample"]

_PSEUDO_FS = frozenset({"squashfs", "tmpfs", "devtmpfs", "overlay", "nsfs", "proc", "sysfs"})


def host_profile(
    config: HalConfig, runtime: RuntimeInfo | RuntimeProbe | None = None
) -> HostProfile:
    """Static facts about this host; ``runtime`` when the caller asked Docker already.

    A :class:`~hal.runtime.RuntimeProbe` is read last, so the engine has the longest to answer.
    """
    uname = platform.uname()
    return HostProfile(
        hostname=uname.node,
        os=_os_name(),
        kernel=uname.release,
        cpu=_cpu(uname.machine),
        memory_total_bytes=psutil.virtual_memory().total,
        swap_total_bytes=psutil.swap_memory().total,
        disks=_disks(),
        interfaces=_interfaces(),
        runtime=_runtime(config, runtime),
    )


def _runtime(config: HalConfig, runtime: RuntimeInfo | RuntimeProbe | None) -> RuntimeInfo:
    if isinstance(runtime, RuntimeProbe):
        return runtime.result(config.cdi_dirs)
    return runtime or runtime_info(config.docker_socket, config.cdi_dirs)


def host_sample() -> HostSample:
    """Fast-changing readings of this host; CPU share is since the previous call."""
    memory = psutil.virtual_memory()
    net = psutil.net_io_counters()
    disk = psutil.disk_io_counters()
    disk_read: Reading[int] = Unavailable("no_disk_counters") if disk is None else disk.read_bytes
    disk_write: Reading[int] = Unavailable("no_disk_counters") if disk is None else disk.write_bytes
    return HostSample(
        cpu_pct=psutil.cpu_percent(interval=None),
        load_1m=psutil.getloadavg()[0],
        memory_used_bytes=memory.total - memory.available,
        memory_available_bytes=memory.available,
        net_rx_bytes=net.bytes_recv,
        net_tx_bytes=net.bytes_sent,
        disk_read_bytes=disk_read,
        disk_write_bytes=disk_write,
    )


def _os_name() -> str:
    try:
        release = platform.freedesktop_os_release()
    except OSError:
        return platform.system()
    return release.get("PRETTY_NAME") or release.get("NAME") or platform.system()


def _cpu(architecture: str) -> CpuInfo:
    freq = psutil.cpu_freq()
    cores = psutil.cpu_count(logical=False)
    return CpuInfo(
        model=_cpu_model(),
        architecture=architecture,
        cores=cores if cores else UNSUPPORTED,
        threads=psutil.cpu_count(logical=True) or 1,
        freq_max_hz=int(freq.max * 1e6) if freq and freq.max else UNSUPPORTED,
    )


def _cpu_model() -> Reading[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware"):
                    return value.strip()
    except OSError as exc:
        return Unavailable("read_error", str(exc))
    return platform.processor() or UNSUPPORTED


def _disks() -> list[DiskInfo]:
    disks = []
    for part in psutil.disk_partitions(all=False):
        if part.fstype in _PSEUDO_FS:
            continue
        try:
            usage = psutil.disk_usage(part.mountpoint)
        except OSError:
            continue
        disks.append(
            DiskInfo(
                mountpoint=part.mountpoint,
                device=part.device,
                fstype=part.fstype,
                total_bytes=usage.total,
                free_bytes=usage.free,
            )
        )
    return disks


def _interfaces() -> list[NetInterface]:
    stats = psutil.net_if_stats()
    interfaces = []
    for name, addrs in sorted(psutil.net_if_addrs().items()):
        stat = stats.get(name)
        mac = next((a.address for a in addrs if a.family == psutil.AF_LINK), None)
        interfaces.append(
            NetInterface(
                name=name,
                up=bool(stat and stat.isup),
                speed_bps=stat.speed * 1_000_000 if stat and stat.speed else UNSUPPORTED,
                mtu=stat.mtu if stat else 0,
                mac=mac,
                addresses=[
                    a.address for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6)
                ],
            )
        )
    return interfaces
