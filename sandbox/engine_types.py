"""The Docker Engine API's shapes that the sandbox sends and reads, as types.

Pure: no I/O. Requests are ``msgspec.Struct``s encoded with the engine's PascalCase
names; answers are decoded into Structs that name only the fields we read (unknown
fields are the engine's business and ignored), so that an answer of the wrong shape is
one decode error at the boundary, never a ``KeyError`` in the runner. Where the engine's
shape is open (device requests, device mappings), a TypedDict.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import NotRequired, TypedDict

import msgspec

__all__ = [
    "ContainerConfig",
    "ContainerInfo",
    "ContainerState",
    "ContainerSummary",
    "CreatedContainer",
    "DeviceMapping",
    "DeviceRequest",
    "EngineInfo",
    "HostConfig",
    "ImageInfo",
    "LogConfig",
    "Mount",
    "MountPoint",
    "NetworkConfig",
    "NetworkSummary",
    "PullMessage",
    "PullProgressDetail",
    "RegistryAuth",
    "Ulimit",
    "VersionInfo",
]


# ------------------------------------------------------------------ requests


class NetworkConfig(msgspec.Struct, frozen=True, kw_only=True, rename="pascal"):
    """The body of ``POST /networks/create``."""

    name: str
    driver: str = "bridge"
    internal: bool = True
    """No route out: its containers reach each other and the host's bridge address only."""
    attachable: bool = False
    labels: dict[str, str] = {}
    options: dict[str, str] = {}


class DeviceMapping(TypedDict):
    """``HostConfig.Devices[]``: a host device node given to the container."""

    PathOnHost: str
    PathInContainer: str
    CgroupPermissions: str


class DeviceRequest(TypedDict):
    """``HostConfig.DeviceRequests[]``: devices a driver (``nvidia``, ``cdi``) provides."""

    Driver: str
    DeviceIDs: list[str]
    Capabilities: NotRequired[list[list[str]]]


class Ulimit(msgspec.Struct, frozen=True, rename="pascal"):
    """``HostConfig.Ulimits[]``."""

    name: str
    soft: int
    hard: int


class Mount(msgspec.Struct, frozen=True, kw_only=True, rename="pascal"):
    """``HostConfig.Mounts[]``: a host file bound at ``target`` (no ``:`` parsing, unlike
    ``Binds``, so any target path is safe)."""

    type: str
    source: str
    target: str
    read_only: bool


class LogConfig(msgspec.Struct, frozen=True, rename="pascal"):
    """``HostConfig.LogConfig``: the log driver and its options."""

    type: str
    config: dict[str, str]


class HostConfig(msgspec.Struct, frozen=True, kw_only=True, rename="pascal", omit_defaults=True):
    """``HostConfig`` of ``POST /containers/create``: every field the sandbox sets.

    All are sent, explicit even where they equal the engine's default, except
    ``CgroupParent`` when None (the engine's own parent) and ``Mounts`` when empty.
    """

    privileged: bool
    cap_drop: list[str]
    security_opt: list[str]
    readonly_rootfs: bool
    init: bool
    ipc_mode: str
    network_mode: str
    memory: int
    memory_swap: int
    nano_cpus: int
    pids_limit: int
    shm_size: int
    tmpfs: dict[str, str]
    ulimits: list[Ulimit]
    binds: list[str]
    devices: list[DeviceMapping]
    device_requests: list[DeviceRequest]
    group_add: list[str]
    log_config: LogConfig
    runtime: str
    auto_remove: bool
    mounts: list[Mount] = []
    """Sent only when not empty: the fetched inputs' files, read-only."""
    cgroup_parent: str | None = None


class ContainerConfig(
    msgspec.Struct, frozen=True, kw_only=True, rename="pascal", omit_defaults=True
):
    """The body of ``POST /containers/create``.

    ``Entrypoint`` and ``Cmd`` are sent only when not None: None keeps the image's own.
    """

    image: str
    env: list[str]
    working_dir: str
    user: str
    labels: dict[str, str]
    network_disabled: bool
    stop_signal: str
    stop_timeout: int
    attach_stdout: bool
    attach_stderr: bool
    tty: bool
    host_config: HostConfig
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None


# ------------------------------------------------------------------ answers


class VersionInfo(msgspec.Struct, frozen=True, rename="pascal"):
    """``GET /version``: the API version the engine speaks."""

    api_version: str = "1.41"
    version: str = ""


class EngineInfo(msgspec.Struct, frozen=True, rename="pascal"):
    """``GET /info``: how the engine is set up."""

    cgroup_driver: str = "cgroupfs"
    runtimes: dict[str, object] | None = None
    cdi_spec_dirs: list[str] | None = msgspec.field(default=None, name="CDISpecDirs")
    docker_root_dir: str = "/var/lib/docker"

    def runtime_args(self, runtime: str) -> list[str]:
        """The arguments the engine gives ``runtime`` (``runtimeArgs`` in daemon.json)."""
        entry = (self.runtimes or {}).get(runtime)
        args = entry.get("runtimeArgs") if isinstance(entry, dict) else None
        return [str(arg) for arg in args] if isinstance(args, list) else []


class _ImageConfig(msgspec.Struct, frozen=True, rename="pascal"):
    volumes: dict[str, object] | None = None


class ImageInfo(msgspec.Struct, frozen=True, rename="pascal"):
    """``GET /images/{name}/json``: the image's id, the volumes it declares, the
    ``repository@digest`` names it was pulled by, and its unpacked size."""

    id: str
    config: _ImageConfig | None = None
    repo_digests: list[str] | None = None
    size: int = 0

    @property
    def volumes(self) -> list[str]:
        """The paths the image declares as ``VOLUME``, sorted."""
        return sorted((self.config.volumes or {}) if self.config else {})


class RegistryAuth(msgspec.Struct, frozen=True, kw_only=True):
    """Credentials for one registry, sent as ``X-Registry-Auth``; never shown: ``repr``
    hides the password, and nothing logs or stores the header."""

    username: str
    password: str
    serveraddress: str

    def __repr__(self) -> str:
        return f"RegistryAuth(username={self.username!r}, serveraddress={self.serveraddress!r})"


class PullProgressDetail(msgspec.Struct, frozen=True):
    """Bytes done and in all of one layer's download or extraction."""

    current: int = 0
    total: int = 0


class _PullErrorDetail(msgspec.Struct, frozen=True):
    message: str = ""


class PullMessage(msgspec.Struct, frozen=True, rename="camel"):
    """One line of ``POST /images/create``'s answer: a layer's progress, or the error
    that ends the pull (the answer's status is 200 by then)."""

    status: str = ""
    id: str = ""
    progress_detail: PullProgressDetail | None = None
    error: str = ""
    error_detail: _PullErrorDetail | None = None


class CreatedContainer(msgspec.Struct, frozen=True, rename="pascal"):
    """``POST /containers/create``: the new container's id."""

    id: str


class MountPoint(msgspec.Struct, frozen=True, rename="pascal"):
    """``Mounts[]`` of a container: what is mounted where."""

    type: str = ""
    destination: str = ""


class ContainerState(msgspec.Struct, frozen=True, rename="pascal"):
    """``State`` of a container: how its process ended."""

    exit_code: int = -1
    oom_killed: bool = msgspec.field(default=False, name="OOMKilled")
    started_at: str | None = None
    finished_at: str | None = None

    @property
    def started(self) -> float | None:
        """When its process started, in seconds since the epoch; None if it did not."""
        return _epoch(self.started_at)

    @property
    def finished(self) -> float | None:
        """When its process ended, in seconds since the epoch; None if it did not."""
        return _epoch(self.finished_at)


class EndpointSettings(msgspec.Struct, frozen=True, rename="pascal"):
    """``NetworkSettings.Networks.<name>`` of a container: its address there."""

    ip_address: str = msgspec.field(default="", name="IPAddress")


class NetworkSettings(msgspec.Struct, frozen=True, rename="pascal"):
    """``NetworkSettings`` of a container: the networks it is on."""

    networks: dict[str, EndpointSettings] | None = None


class ContainerInfo(msgspec.Struct, frozen=True, rename="pascal"):
    """``GET /containers/{id}/json``: its state, mounts and addresses."""

    state: ContainerState
    mounts: list[MountPoint] | None = None
    network_settings: NetworkSettings | None = None

    def address(self, network: str) -> str:
        """Its IP address on ``network``; empty if it has none there."""
        networks = self.network_settings.networks if self.network_settings else None
        endpoint = (networks or {}).get(network)
        return endpoint.ip_address if endpoint is not None else ""

    @property
    def volumes(self) -> list[str]:
        """Where the engine mounted a volume (host disk) into the container."""
        return [mount.destination for mount in self.mounts or [] if mount.type == "volume"]


class NetworkSummary(msgspec.Struct, frozen=True, rename="pascal"):
    """One network of ``GET /networks``: its name and labels."""

    name: str
    labels: dict[str, str] | None = None

    def label(self, name: str) -> str:
        """The value of label ``name``; empty if it has none."""
        return (self.labels or {}).get(name, "")


class ContainerSummary(msgspec.Struct, frozen=True, rename="pascal"):
    """One container of ``GET /containers/json``: its id and labels."""

    id: str
    labels: dict[str, str] | None = None

    def label(self, name: str) -> str:
        """The value of label ``name``; empty if it has none."""
        return (self.labels or {}).get(name, "")


def _epoch(stamp: str | None) -> float | None:
    """Docker's RFC 3339 time with nanoseconds as seconds since the epoch; its zero
    time (``0001-01-01...``) and what does not parse are None."""
    if stamp is None or stamp.startswith("0001-"):
        return None
    # datetime keeps microseconds: cut the nanoseconds' last three digits.
    text = re.sub(r"(\.\d{6})\d*", r"\1", stamp.replace("Z", "+00:00"))
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None
