"""The container runtime around the host: is Docker reachable, can it hand out NVIDIA GPUs?

Kept apart from :mod:`hal.host` (and from psutil): the engine takes milliseconds of its own
CPU to answer ``/info``, so a profile sends its question first (:class:`RuntimeProbe`) and
reads the answer after everything else. Sending needs only the socket module: msgspec and
the HAL types are imported when the answer is read, so that a caller can ask before it
imports them.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hal.types import RuntimeInfo, Unavailable

__all__ = ["RuntimeProbe", "docker_socket", "runtime_info"]

_DOCKER_HOST_DEFAULT = "unix:///var/run/docker.sock"
_DOCKER_TIMEOUT_S = 1.0
_TOOLKIT_BINARIES = ("nvidia-ctk", "nvidia-container-runtime", "nvidia-container-toolkit")


def docker_socket(env: Mapping[str, str]) -> Path:
    """The Docker engine's unix socket, as ``DOCKER_HOST`` names it (as the docker CLI reads it)."""
    return Path(env.get("DOCKER_HOST", _DOCKER_HOST_DEFAULT).removeprefix("unix://"))


def runtime_info(docker_socket: Path, cdi_dirs: tuple[Path, ...]) -> RuntimeInfo:
    """Is Docker reachable, and can it hand NVIDIA GPUs to containers?"""
    with RuntimeProbe(docker_socket) as probe:
        return probe.result(cdi_dirs)


class RuntimeProbe:
    """The runtime check with its question to the engine sent at once, answer read later.

    The engine works on ``/info`` while the caller does other work; :meth:`result` then
    waits for the answer as :func:`runtime_info` would. Close it (or use it as a context
    manager) so that an unread answer does not hold its socket open.
    """

    def __init__(self, docker_socket: Path) -> None:
        self.docker_socket = docker_socket
        self._request = _DockerRequest(docker_socket, "/info")

    def result(self, cdi_dirs: tuple[Path, ...]) -> RuntimeInfo:
        """What the engine answered, with the toolkit and the CDI specs in ``cdi_dirs``."""
        import shutil

        from hal.types import Reading, RuntimeInfo, Unavailable

        toolkit = next((p for p in map(shutil.which, _TOOLKIT_BINARIES) if p), None)
        docker = self._request.response()
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

    def close(self) -> None:
        """Drop the engine's answer if it was not read."""
        self._request.close()

    def __enter__(self) -> RuntimeProbe:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _DockerRequest:
    """One HTTP GET on the Docker engine's unix socket, without a Docker client library.

    Connecting and sending happen in the constructor, reading in :meth:`response`.
    """

    def __init__(self, sock_path: Path, path: str) -> None:
        self._sock_path = sock_path
        self._sock: socket.socket | None = None
        self._failed: OSError | None = None
        self._answer: dict[str, object] | Unavailable | None = None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(_DOCKER_TIMEOUT_S)
            sock.connect(str(sock_path))
            sock.sendall(f"GET {path} HTTP/1.0\r\nHost: docker\r\n\r\n".encode())
        except OSError as exc:
            sock.close()
            self._failed = exc
        else:
            self._sock = sock

    def response(self) -> dict[str, object] | Unavailable:
        """The engine's JSON answer, or why there is none; reads it on the first call."""
        if self._answer is None:
            try:
                self._answer = self._os_error(self._failed) if self._failed else self._read()
            finally:
                self.close()
        return self._answer

    def close(self) -> None:
        """Close the socket, read or not."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _read(self) -> dict[str, object] | Unavailable:
        import msgspec

        from hal.types import Unavailable

        assert self._sock is not None  # the constructor kept its error when it has no socket
        try:
            response = _recv_all(self._sock)
        except OSError as exc:
            return self._os_error(exc)
        head, _, body = response.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.") or b" 200 " not in head.split(b"\r\n", 1)[0] + b" ":
            return Unavailable("docker_error", head.split(b"\r\n", 1)[0].decode(errors="replace"))
        try:
            info = msgspec.json.decode(body)
        except ValueError:  # msgspec.DecodeError, or UnicodeDecodeError inside a string
            return Unavailable("docker_error", "the engine's answer is not JSON")
        return info if isinstance(info, dict) else Unavailable("docker_error", "unexpected answer")

    def _os_error(self, exc: OSError) -> Unavailable:
        from hal.types import Unavailable

        if isinstance(exc, PermissionError):
            return Unavailable("permission_denied", f"cannot open {self._sock_path}")
        if isinstance(exc, FileNotFoundError | ConnectionRefusedError):
            return Unavailable("docker_unreachable", f"no Docker engine at {self._sock_path}")
        return Unavailable("docker_unreachable", f"{self._sock_path}: {exc}")


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
