"""The host: CPU, memory, disks, network, OS, and the container runtime around them."""

from __future__ import annotations

import json
import platform
import shutil
import socket
import threading
import time
from pathlib import Path

import psutil

from hal.backend import HalConfig
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

__all__ = ["host_profile", "host_sample", "runtime_info"]

_PSEUDO_FS = frozenset({"squashfs", "tmpfs", "devtmpfs", "overlay", "nsfs", "proc", "sysfs"})
_DOCKER_TIMEOUT_S = 1.0
_TOOLKIT_BINARIES = ("nvidia-ctk", "nvidia-container-runtime", "nvidia-container-toolkit")


def host_profile(config: HalConfig) -> HostProfile:
    """Static facts about this host."""
    # The Docker engine takes milliseconds to answer; ask it while psutil reads the rest.
    runtime: list[RuntimeInfo] = []
    asking = threading.Thread(
        target=lambda: runtime.append(runtime_info(config.docker_socket, config.cdi_dirs)),
        name="docker-probe",
    )
    asking.start()
    uname = platform.uname()
    cpu = _cpu(uname.machine)
    disks, interfaces = _disks(), _interfaces()
    asking.join()
    return HostProfile(
        hostname=uname.node,
        os=_os_name(),
        kernel=uname.release,
        cpu=cpu,
        memory_total_bytes=psutil.virtual_memory().total,
        swap_total_bytes=psutil.swap_memory().total,
        disks=disks,
        interfaces=interfaces,
        runtime=runtime[0],
    )


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


def runtime_info(docker_socket: Path, cdi_dirs: tuple[Path, ...]) -> RuntimeInfo:
    """Is Docker reachable, and can it hand NVIDIA GPUs to containers?"""
    toolkit = next((p for p in map(shutil.which, _TOOLKIT_BINARIES) if p), None)
    docker = _docker_get(docker_socket, "/info")
    if isinstance(docker, dict):
        declared = docker.get("Runtimes")
        runtimes: Reading[list[str]] = sorted(declared) if isinstance(declared, dict) else []
        version: Reading[str] = str(docker.get("ServerVersion", ""))
        reachable: Reading[bool] = True
        cdi: Reading[bool] = bool(docker.get("CDISpecDirs"))
    else:
        runtimes = version = docker
        reachable = False if docker.reason == "docker_unreachable" else docker
        cdi = docker
    return RuntimeInfo(
        docker_reachable=reachable,
        docker_version=version,
        docker_runtimes=runtimes,
        docker_cdi=cdi,
        nvidia_container_toolkit=toolkit or Unavailable("not_installed"),
        cdi_specs=_nvidia_cdi_specs(cdi_dirs),
    )


def _docker_get(sock_path: Path, path: str) -> dict[str, object] | Unavailable:
    """One HTTP GET on the Docker engine's unix socket, without a Docker client library."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(_DOCKER_TIMEOUT_S)
            sock.connect(str(sock_path))
            sock.sendall(f"GET {path} HTTP/1.0\r\nHost: docker\r\n\r\n".encode())
            response = _recv_all(sock)
    except PermissionError:
        return Unavailable("permission_denied", f"cannot open {sock_path}")
    except (FileNotFoundError, ConnectionRefusedError):
        return Unavailable("docker_unreachable", f"no Docker engine at {sock_path}")
    except OSError as exc:
        return Unavailable("docker_unreachable", f"{sock_path}: {exc}")
    head, _, body = response.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.") or b" 200 " not in head.split(b"\r\n", 1)[0] + b" ":
        return Unavailable("docker_error", head.split(b"\r\n", 1)[0].decode(errors="replace"))
    try:
        info = json.loads(body)
    except ValueError:
        return Unavailable("docker_error", "the engine's answer is not JSON")
    return info if isinstance(info, dict) else Unavailable("docker_error", "unexpected answer")


def _recv_all(sock: socket.socket) -> bytes:
    chunks = []
    deadline = time.monotonic() + _DOCKER_TIMEOUT_S
    while time.monotonic() < deadline:
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _nvidia_cdi_specs(cdi_dirs: tuple[Path, ...]) -> list[str]:
    specs = []
    for directory in cdi_dirs:
        try:
            candidates = sorted(directory.iterdir())
        except OSError:
            continue
        for spec in candidates:
            if spec.suffix not in (".yaml", ".yml", ".json"):
                continue
            try:
                if "nvidia.com/gpu" in spec.read_text(encoding="utf-8", errors="replace"):
                    specs.append(str(spec))
            except OSError:
                continue
    return specs


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
