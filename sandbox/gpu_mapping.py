"""From the plain facts of a job's GPUs to the container settings that give it those GPUs.

Pure, and free of the HAL: the caller hands in :class:`DeviceFacts`. A job sees exactly
the GPUs it was given:

- NVIDIA by a device request naming each GPU's UUID (``--gpus device=<uuid>``), or, where
  the engine supports the Container Device Interface, by the CDI names
  ``nvidia.com/gpu=<uuid>``. Docker 20.10 (Debian 12) has no CDI.
- AMD by ``/dev/kfd`` plus each GPU's own render node, never all of ``/dev/dri``: ROCm
  skips the KFD nodes whose render node it cannot open.
- Intel by its render node.

Render nodes belong to the host's ``render`` (and, for ``/dev/kfd`` on older hosts,
``video``) group. The image's /etc/group often lacks those groups or numbers them
differently, so the container is added to the host's numeric group ids.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Literal

import msgspec

from sandbox.engine_types import DeviceMapping, DeviceRequest
from sandbox.errors import RunError

__all__ = ["ContainerGpus", "DeviceFacts", "HostGroups", "host_groups", "map_gpus"]

_RENDER_NODE = re.compile(r"renderD[0-9]+")


class DeviceFacts(msgspec.Struct, frozen=True, kw_only=True):
    """What the mapping needs to know of one GPU; None where the GPU has no such thing."""

    vendor: Literal["nvidia", "amd", "intel"]
    uuid: str | None
    pci_bus_id: str | None
    render_node: str | None
    """The host path of the GPU's render node, e.g. ``/dev/dri/renderD128``."""


class HostGroups(msgspec.Struct, frozen=True, kw_only=True):
    """The host's numeric ids of the groups that own GPU device nodes; None if absent."""

    video_gid: int | None
    render_gid: int | None


class ContainerGpus(msgspec.Struct, frozen=True, kw_only=True):
    """Settings for Docker's ``POST /containers/create``, in the Engine API's shapes.

    Attributes:
        device_requests: ``HostConfig.DeviceRequests``.
        devices: ``HostConfig.Devices``: PathOnHost, PathInContainer, CgroupPermissions.
        group_add: ``HostConfig.GroupAdd``: numeric group ids, as strings.
        env: variables to set in the container, over the image's own.
    """

    device_requests: list[DeviceRequest] = []
    devices: list[DeviceMapping] = []
    group_add: list[str] = []
    env: dict[str, str] = {}


def map_gpus(
    devices: list[DeviceFacts], *, cdi: bool, groups: HostGroups, kfd_path: str = "/dev/kfd"
) -> ContainerGpus:
    """The container settings that give a job exactly ``devices``.

    Raises:
        RunError: ``gpu_unmappable``, a GPU lacks what its vendor's mapping needs (an
            NVIDIA GPU its UUID, an AMD or Intel GPU its render node).
    """
    nvidia = [device for device in devices if device.vendor == "nvidia"]
    uuids = list(dict.fromkeys(_need(device, device.uuid, "UUID") for device in nvidia))
    nodes: list[DeviceMapping] = []
    gids: list[int | None] = []
    if any(device.vendor == "amd" for device in devices):
        nodes.append(_node(kfd_path, "/dev/kfd"))
        # Older hosts give /dev/kfd to video, newer ones to render: add both.
        gids += [groups.video_gid, groups.render_gid]
    for device in devices:
        if device.vendor != "nvidia":
            host = _need(device, device.render_node, "render node")
            name = PurePosixPath(host).name
            if not _RENDER_NODE.fullmatch(name):
                raise RunError("gpu_unmappable", f"{_name(device)}: {host} is not a render node")
            nodes.append(_node(host, f"/dev/dri/{name}"))
            # A host without a render group gives render nodes to video.
            gids.append(groups.render_gid if groups.render_gid is not None else groups.video_gid)
    requests: list[DeviceRequest] = []
    env: dict[str, str] = {}
    if uuids and cdi:
        requests.append({"Driver": "cdi", "DeviceIDs": [f"nvidia.com/gpu={u}" for u in uuids]})
    elif uuids:
        requests.append({"Driver": "nvidia", "DeviceIDs": uuids, "Capabilities": [["gpu"]]})
    if uuids:
        # The image may ask for every driver capability (graphics, display, video): a job
        # gets compute and the management library only.
        env["NVIDIA_DRIVER_CAPABILITIES"] = "compute,utility"
    return ContainerGpus(
        device_requests=requests,
        devices=list({node["PathOnHost"]: node for node in nodes}.values()),
        group_add=[str(gid) for gid in dict.fromkeys(gids) if gid is not None],
        env=env,
    )


def host_groups(group_file: Path = Path("/etc/group")) -> HostGroups:
    """The host's ``video`` and ``render`` group ids, from its group file."""
    gids: dict[str, int] = {}
    try:
        lines = group_file.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        lines = []
    for line in lines:
        fields = line.split(":")
        if len(fields) >= 3 and fields[0] in ("video", "render") and fields[2].isdigit():
            gids.setdefault(fields[0], int(fields[2]))
    return HostGroups(video_gid=gids.get("video"), render_gid=gids.get("render"))


def _need(device: DeviceFacts, value: str | None, what: str) -> str:
    if not value:
        raise RunError("gpu_unmappable", f"{_name(device)} has no {what} to map it by")
    return value


def _name(device: DeviceFacts) -> str:
    where = device.uuid or device.pci_bus_id or "unknown location"
    return f"{device.vendor} GPU {where}"


def _node(host: str, container: str) -> DeviceMapping:
    return {"PathOnHost": host, "PathInContainer": container, "CgroupPermissions": "rw"}
