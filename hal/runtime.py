"""The container runtime around the host: is Docker reachable, can it hand out NVIDIA GPUs?

Kept apart from :mod:`hal.host` (and from psutil): the engine takes milliseconds to answer,
so a profile asks it in a thread first and reads everything else meanwhile.
"""

from __future__ import annotations

import json
import shutil
import socket
import time
from pathlib import Path

from hal.types import Reading, RuntimeInfo, Unavailable

__all__ = ["runtime_info"]

_DOCKER_TIMEOUT_S = 1.0
_TOOLKIT_BINARIES = ("nvidia-ctk", "nvidia-container-runtime", "nvidia-container-toolkit")


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
